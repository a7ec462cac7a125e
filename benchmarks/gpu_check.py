"""GPU check: inference latency, training throughput and FAISS GPU parity, written as JSON.

Usage (from the repository root)::

    python benchmarks/gpu_check.py --out gpu_check.json [--data DIR] [--device auto]
    python benchmarks/gpu_check.py --out /tmp/check.json --quick     # seconds, also on a CPU

Measures, on the chosen device (``auto``: CUDA when present):

1. **Inference latency** of the J-RAS engine per 256x256 slice and per volume, for fp32, AMP
   (bf16 or fp16), AMP + channels-last and AMP + channels-last + ``torch.compile`` (compile
   only on CUDA, or with ``--compile`` elsewhere), with the label agreement of each variant
   against fp32.
2. **Training throughput** (samples/s) of J-RAS and of the same U-Net without retrieval.
3. **FAISS**: search time of the CPU index and, with ``faiss-gpu`` and a GPU, of the GPU index,
   and their parity (same ids, largest similarity difference).

Without a GPU the CPU numbers are reported and ``gpu_available`` is false. ``--data`` is a
folder of ACDC-like ``*_image``/``*_label`` cases; without it synthetic discs are used.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

from napari_jras.core.checkpoint import atomic_write_json
from napari_jras.core.data import SliceSample, load_slices
from napari_jras.core.device import amp_dtype, select_device
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.index import EmbeddingIndex, faiss_gpu_available
from napari_jras.core.io import find_cases
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.pipeline import build_bank
from napari_jras.core.provenance import provenance
from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig, seed_everything

FULL = {"size": 256, "unet": {"base_channels": 32, "depth": 4}, "retriever_width": 32,
        "slices": 64, "volume": 10, "repeats": 10, "train_steps": 40, "batch": 8,
        "faiss_n": 100_000, "faiss_q": 256}
QUICK = {"size": 64, "unet": {"base_channels": 4, "depth": 2}, "retriever_width": 4,
         "slices": 12, "volume": 3, "repeats": 2, "train_steps": 4, "batch": 4,
         "faiss_n": 2_000, "faiss_q": 16}


def synthetic_samples(n: int, size: int, seed: int = 0) -> list[SliceSample]:
    """Noisy discs and rings (3 classes) of varying position and radius, 4 slices a patient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    samples = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = size * rng.uniform(0.08, 0.18)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        disc, ring = d2 < r * r, (d2 < (1.4 * r) ** 2) & (d2 >= r * r)
        label = (disc * 2 + ring).astype(np.uint8)
        image = (0.2 + 0.6 * disc + 0.3 * ring + rng.normal(0, 0.05, (size, size))).clip(0, 1)
        samples.append(SliceSample(image.astype(np.float32), label, f"syn{i // 4}_slice{i % 4}",
                                   f"syn{i // 4}", i % 4, "synthetic"))
    return samples


def load_samples(data: str | None, size: int, limit: int) -> tuple[list[SliceSample], str]:
    """Slices of ``data`` at ``size`` (at most ``limit``), or synthetic ones."""
    if data is None:
        return synthetic_samples(limit, size), "synthetic"
    samples = load_slices(find_cases(data), size=size)[:limit]
    return samples, str(data)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(median(times), 3)


def make_model(samples: list[SliceSample], cfg: dict, use_retrieval: bool) -> JRASModel:
    """A U-Net J-RAS (or baseline) model sized by ``cfg``."""
    num_classes = int(max(int(s.label.max()) for s in samples)) + 1
    return JRASModel(ModelConfig(
        num_classes=max(num_classes, 2), size=cfg["size"], use_retrieval=use_retrieval,
        backbone="unet", backbone_options=dict(cfg["unet"]),
        retriever={"encoder": "cnn", "embed_dim": 128, "width": cfg["retriever_width"]}))


def training_throughput(samples: list[SliceSample], cfg: dict, device: torch.device,
                        use_retrieval: bool) -> tuple[dict[str, Any], JRASModel]:
    """Samples/s of ``train_steps`` joint (or baseline) steps; the first two are not timed."""
    seed_everything(0)
    model = make_model(samples, cfg, use_retrieval)
    steps = cfg["train_steps"]
    times: list[float] = []
    trainer = JointTrainer(model, SliceSet(samples, model.num_classes),
                           TrainConfig(steps=steps, batch_size=cfg["batch"], log_every=1,
                                       checkpoint_every=0, device=str(device)),
                           progress=lambda p: times.append(time.perf_counter())
                           if p.stage == "train" else None)
    trainer.fit()
    warm = min(2, len(times) - 1)
    timed_steps = len(times) - 1 - warm
    elapsed = times[-1] - times[warm]
    rate = cfg["batch"] * timed_steps / elapsed if timed_steps and elapsed > 0 else None
    return {"steps_timed": timed_steps, "batch_size": cfg["batch"],
            "samples_per_s": round(rate, 2) if rate else None,
            "peak_memory_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                               if device.type == "cuda" else None)}, model


def inference_latency(model: JRASModel, samples: list[SliceSample], cfg: dict,
                      device: torch.device, compile_too: bool) -> dict[str, Any]:
    """Per-slice and per-volume latency of the engine variants, and their agreement with fp32."""
    size = cfg["size"]
    rng = np.random.default_rng(1)
    picks = rng.choice(len(samples), cfg["volume"], replace=len(samples) < cfg["volume"])
    volume = np.stack([samples[i].image for i in picks])
    variants = {"fp32": {"amp": False, "channels_last": False},
                "amp": {"amp": True, "channels_last": False},
                "amp_channels_last": {"amp": True, "channels_last": True}}
    if compile_too:
        variants["amp_channels_last_compile"] = {"amp": True, "channels_last": True,
                                                 "compile_model": True}
    results: dict[str, Any] = {"slice_size": size, "volume_slices": int(volume.shape[0]),
                               "amp_dtype": str(amp_dtype(device)) if amp_dtype(device) else None}
    with tempfile.TemporaryDirectory() as tmp:
        bank = build_bank(Path(tmp) / "bank", model.cpu(), samples)
        reference = None
        for name, options in variants.items():
            engine = InferenceEngine(model, bank, device=device, batch_size=16,
                                     on_warning=lambda m: results.setdefault("warnings", [])
                                     .append(m), **options)
            start = time.perf_counter()
            labels = engine.predict(volume, modality="mri").labels  # includes compilation
            first_ms = (time.perf_counter() - start) * 1000
            reference = labels if reference is None else reference
            results[name] = {
                "slice_ms": timed(lambda e=engine: e.predict(volume[0], modality="mri"),
                                  cfg["repeats"], device),
                "volume_ms": timed(lambda e=engine: e.predict(volume, modality="mri"),
                                   cfg["repeats"], device),
                "first_call_ms": round(first_ms, 1),
                "label_agreement_vs_fp32": round(float((labels == reference).mean()), 5),
            }
            results[name]["volume_ms_per_slice"] = round(
                results[name]["volume_ms"] / volume.shape[0], 3)
        bank.close()
    results["image_size"] = [size, size]
    return results


def faiss_check(cfg: dict) -> dict[str, Any]:
    """CPU (and GPU) flat search time and GPU/CPU parity on random unit vectors."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((cfg["faiss_n"], 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(len(x), cfg["faiss_q"], replace=False)] + 0.1 * rng.standard_normal(
        (cfg["faiss_q"], 128)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ids = np.arange(len(x))
    out: dict[str, Any] = {"vectors": len(x), "queries": len(q), "k": 10,
                           "faiss_gpu_available": faiss_gpu_available()}
    cpu = EmbeddingIndex(ids, x, use_gpu=False, approx_threshold=len(x) + 1)
    out["cpu_search_ms"] = timed(lambda: cpu.search(q, 10), 3, torch.device("cpu"))
    if out["faiss_gpu_available"]:
        gpu = EmbeddingIndex(ids, x, use_gpu=True, approx_threshold=len(x) + 1)
        out["gpu_search_ms"] = timed(lambda: gpu.search(q, 10), 3, torch.device("cpu"))
        (cs, ci), (gs, gi) = cpu.search(q, 10), gpu.search(q, 10)
        out["ids_identical_fraction"] = round(float((ci == gi).mean()), 6)
        out["max_similarity_difference"] = float(np.abs(cs - gs).max())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All measurements as one JSON-ready dict."""
    cfg = dict(QUICK if args.quick else FULL)
    device = select_device(args.device)
    gpu = device.type == "cuda"
    report: dict[str, Any] = {
        "provenance": provenance(data=args.data, device=str(device)),
        "quick": args.quick, "device": str(device), "gpu_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(device) if gpu else None,
        "bf16_supported": bool(gpu and torch.cuda.is_bf16_supported()),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "notes": []}
    if not torch.cuda.is_available():
        report["notes"].append("GPU not available: the numbers are CPU numbers (AMP is "
                               "CUDA-only, so 'amp' runs in fp32 here)")
    samples, source = load_samples(args.data, cfg["size"], cfg["slices"])
    report["data"] = {"source": source, "slices": len(samples), "size": cfg["size"]}
    train = {}
    for name, use_retrieval in (("jras", True), ("baseline", False)):
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        train[name], model = training_throughput(samples, cfg, device, use_retrieval)
        if use_retrieval:
            jras_model = model
    if train["jras"]["samples_per_s"] and train["baseline"]["samples_per_s"]:
        train["jras_time_over_baseline"] = round(
            train["baseline"]["samples_per_s"] / train["jras"]["samples_per_s"], 3)
    report["training"] = train
    compile_too = gpu or args.compile
    if not compile_too:
        report["notes"].append("torch.compile not measured on the CPU (use --compile)")
    report["inference"] = inference_latency(jras_model, samples, cfg, device, compile_too)
    report["faiss"] = faiss_check(cfg)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; writes the JSON report to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--data", help="folder of *_image/*_label cases (default: synthetic)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile on the CPU (slow to compile)")
    args = parser.parse_args(argv)
    report = run(args)
    atomic_write_json(Path(args.out), report)
    inf = report["inference"]
    print(f"device {report['device']}  train samples/s J-RAS "
          f"{report['training']['jras']['samples_per_s']} baseline "
          f"{report['training']['baseline']['samples_per_s']}  slice ms fp32 "
          f"{inf['fp32']['slice_ms']} amp {inf['amp']['slice_ms']}  -> {args.out}")
    for note in report["notes"]:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
