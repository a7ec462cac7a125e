"""GPU code paths: out-of-memory recovery, torch.compile fallback, FAISS GPU, AMP, gpu_check.

What can run on a CPU does (the OOM halving with a forward that raises CUDA OOM, the compile
fallback, the FAISS GPU switch with a stand-in GPU, the benchmark script in ``--quick`` mode);
the rest is marked ``gpu`` and skipped without CUDA / faiss-gpu.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import napari_jras.core.index as index_module
from napari_jras.core.engine import EngineWarning, InferenceEngine
from napari_jras.core.errors import JRASError
from napari_jras.core.index import EmbeddingIndex, faiss_gpu_available
from napari_jras.core.io import read_volume

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_faiss_gpu = pytest.mark.skipif(not faiss_gpu_available(),
                                     reason="FAISS without GPU support or no GPU")
BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def volume(data_dir) -> np.ndarray:
    """The raw ACDC test volume (8, 112, 112) the tiny runs were trained on."""
    return read_volume(data_dir / "acdc" / "patient045_frame01_image.tif").data


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny J-RAS run."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def raise_oom_above(engine: InferenceEngine, limit: int, calls: list[int]) -> None:
    """Make the network raise CUDA out-of-memory for batches larger than ``limit``."""
    forward = engine.model.forward

    def fake(query, guide=None):
        calls.append(query.shape[0])
        if query.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(query, guide)

    engine.model.forward = fake


def dice_agreement(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean Dice of two label maps over the classes present in either (1.0 when none is)."""
    scores = []
    for c in range(1, num_classes):
        x, y = a == c, b == c
        if x.any() or y.any():
            scores.append(2 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores)) if scores else 1.0


# --- out-of-memory recovery (CPU, simulated) ------------------------------------------------
def test_oom_halves_the_batch_and_gives_the_same_result(run, volume):
    reference = InferenceEngine.from_run(run, device="cpu").predict(volume, return_probabilities=True)
    warned: list[str] = []
    engine = InferenceEngine.from_run(run, device="cpu", batch_size=16, on_warning=warned.append)
    calls: list[int] = []
    raise_oom_above(engine, 2, calls)
    pred = engine.predict(volume, return_probabilities=True)
    # first pass, 8 slices: 8 -> 4 -> 2 fits, then 3 more batches of 2; the self-guided
    # second pass keeps batches of 2
    assert calls == [8, 4, 2, 2, 2, 2] + [2] * 4
    assert engine.batch_size == 2 and engine.device.type == "cpu" and not warned
    np.testing.assert_array_equal(pred.labels, reference.labels)
    np.testing.assert_allclose(pred.probabilities.astype(np.float32),  # batch-size rounding
                               reference.probabilities.astype(np.float32), atol=1e-3)
    assert sorted(pred.exemplars) == list(range(8))
    assert [e.id for e in pred.exemplars[5]] == [e.id for e in reference.exemplars[5]]


def test_oom_of_one_slice_on_the_cpu_is_a_clear_error(run, volume):
    engine = InferenceEngine.from_run(run, device="cpu", batch_size=4)
    raise_oom_above(engine, 0, [])
    with pytest.raises(JRASError, match="Out of memory on the CPU even for one slice"):
        engine.predict(volume)


# --- torch.compile fallback ---------------------------------------------------------------
def test_compile_failure_falls_back_with_a_warning(run, volume, monkeypatch):
    reference = InferenceEngine.from_run(run, device="cpu").predict(volume).labels

    def broken_compile(module, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no working compiler (simulated)")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = InferenceEngine.from_run(run, device="cpu", compile_model=True)
    assert set(engine._compiled) == {"model", "retriever"}
    with pytest.warns(EngineWarning, match="torch.compile failed .*simulated"):
        labels = engine.predict(volume).labels
    np.testing.assert_array_equal(labels, reference)
    assert engine._compiled == {}  # fallen back for good: no warning on the next call
    np.testing.assert_array_equal(engine.predict(volume).labels, reference)


def test_cli_inference_flags(run, volume, tmp_path, monkeypatch, capsys):
    from napari_jras.cli import main
    from napari_jras.core.io import write_volume

    write_volume(tmp_path / "in" / "case_image.tif", volume)
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: object())  # calling it fails
    argv = ["predict", "--model", str(run), "--input", str(tmp_path / "in"), "--device", "cpu",
            "--quiet", "--output"]
    with pytest.warns(EngineWarning, match="torch.compile failed"):
        assert main([*argv, str(tmp_path / "a"), "--batch-size", "3", "--compile",
                     "--faiss-cpu"]) == 0
    assert main([*argv, str(tmp_path / "b")]) == 0
    a, b = (read_volume(tmp_path / d / "case_label.tif").data for d in ("a", "b"))
    np.testing.assert_array_equal(a, b)
    capsys.readouterr()


def test_channels_last_is_a_cuda_default_only(run):
    engine = InferenceEngine.from_run(run, device="cpu")
    conv = next(m for m in engine.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()
    nhwc = InferenceEngine.from_run(run, device="cpu", channels_last=True)
    conv = next(m for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


# --- FAISS GPU switch (stand-in GPU) --------------------------------------------------------
def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_faiss_gpu_default_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(index_module, "faiss_gpu_available", lambda: True)
    monkeypatch.setattr(index_module, "copy_to_gpu", faiss.clone_index)
    x, ids = unit(300, 8), np.arange(300)
    assert EmbeddingIndex(ids, x).on_gpu
    assert not EmbeddingIndex(ids, x, use_gpu=False).on_gpu
    monkeypatch.setenv(index_module.GPU_ENV, "0")
    index = EmbeddingIndex(ids, x)
    assert not index.on_gpu and index.approx_threshold == index_module.DEFAULT_APPROX_THRESHOLD
    monkeypatch.delenv(index_module.GPU_ENV)
    hnsw = EmbeddingIndex(ids, x, approx_threshold=100)  # HNSW has no GPU version
    assert hnsw.kind == "hnsw" and not hnsw.on_gpu


# --- benchmark script -------------------------------------------------------------------------
def test_gpu_check_quick_runs_on_any_machine(tmp_path, acdc_slices_dir):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    assert module.main(["--quick", "--out", str(out), "--data", str(acdc_slices_dir)]) == 0
    report = json.loads(out.read_text())
    assert report["gpu_available"] == torch.cuda.is_available()
    assert report["data"]["slices"] == 8 and report["data"]["source"] == str(acdc_slices_dir)
    for mode in ("jras", "baseline"):
        assert report["training"][mode]["samples_per_s"] > 0
    for variant in ("fp32", "amp", "amp_channels_last"):
        timing = report["inference"][variant]
        assert timing["slice_ms"] > 0 and timing["volume_ms"] > 0
        assert timing["label_agreement_vs_fp32"] > 0.9
    assert report["faiss"]["cpu_search_ms"] > 0
    if not torch.cuda.is_available():
        assert any("GPU not available" in note for note in report["notes"])


# --- on a GPU -------------------------------------------------------------------------------
@gpu
@needs_faiss_gpu
def test_faiss_gpu_and_cpu_give_the_same_neighbours():
    x, ids = unit(5_000, 64), np.arange(5_000) * 3 + 1
    q = unit(100, 64, seed=1)
    on_gpu = EmbeddingIndex(ids, x, use_gpu=True)
    on_cpu = EmbeddingIndex(ids, x, use_gpu=False)
    assert on_gpu.on_gpu and not on_cpu.on_gpu and on_gpu.kind == on_cpu.kind == "flat"
    assert "Gpu" in type(on_gpu._gpu).__name__
    for exclude in (None, [{int(ids[i])} for i in range(100)]):
        gpu_scores, gpu_ids = on_gpu.search(q, 10, exclude)
        cpu_scores, cpu_ids = on_cpu.search(q, 10, exclude)
        np.testing.assert_array_equal(gpu_ids, cpu_ids)
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-5)
    hnsw = EmbeddingIndex(ids, x, use_gpu=True, approx_threshold=1_000)
    assert hnsw.kind == "hnsw" and not hnsw.on_gpu


@gpu
@needs_cuda
def test_amp_prediction_agrees_with_fp32(tiny_run, volume):
    fp32 = InferenceEngine.from_run(tiny_run, device="cuda", amp=False)
    amp = InferenceEngine.from_run(tiny_run, device="cuda", amp=True)
    conv = next(m for m in amp.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = amp.predict(volume).labels, fp32.predict(volume).labels
    assert dice_agreement(a, b, fp32.model.num_classes) >= 0.99
    assert (a == b).mean() >= 0.99


@gpu
@needs_cuda
def test_compiled_prediction_agrees_with_eager(tiny_run, volume):
    warned: list[str] = []
    eager = InferenceEngine.from_run(tiny_run, device="cuda").predict(volume).labels
    engine = InferenceEngine.from_run(tiny_run, device="cuda", compile_model=True,
                                      on_warning=warned.append)
    labels = engine.predict(volume).labels
    assert (labels == eager).mean() >= 0.99
    assert bool(engine._compiled) != bool(warned)  # compiled, or fell back with a warning


@gpu
@needs_cuda
def test_cuda_oom_of_one_slice_moves_to_the_cpu(tiny_run, volume):
    reference = InferenceEngine.from_run(tiny_run, device="cpu").predict(volume).labels
    warned: list[str] = []
    engine = InferenceEngine.from_run(tiny_run, device="cuda", amp=False, batch_size=4,
                                      on_warning=warned.append)
    forward = engine.model.forward

    def fake(query, guide=None):
        if query.is_cuda:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(query, guide)

    engine.model.forward = fake
    labels = engine.predict(volume).labels
    assert engine.device.type == "cpu" and engine.batch_size == 1
    assert len(warned) == 1 and "continuing on the CPU" in warned[0]
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    np.testing.assert_array_equal(labels, reference)
