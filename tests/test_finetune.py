"""Workspace fine-tuning: versions, roll-back, cancel/resume, threads, oversampling, baseline."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_jras.core.checkpoint import load_model, load_tensors
from napari_jras.core.data import SliceSample
from napari_jras.core.errors import CancelledError, DataError, JRASError
from napari_jras.core.finetune import _job_dir, correction_weights, finetune_config
from napari_jras.core.io import read_volume
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.progress import Progress
from napari_jras.core.retrieval import retriever_version
from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig
from napari_jras.core.workspace import Workspace

NIFTI = Path(__file__).parent / "data" / "nifti"
STEPS = 3


@pytest.fixture(scope="module")
def frame02() -> tuple[np.ndarray, np.ndarray]:
    image = read_volume(NIFTI / "patient045_frame02_image.nii.gz").data
    label = read_volume(NIFTI / "patient045_frame02_label.nii.gz").data
    return image, label.astype(np.uint8)


@pytest.fixture
def ws(tiny_run, tmp_path, frame02):
    image, label = frame02
    with Workspace.open(tiny_run, home=tmp_path) as workspace:
        workspace.accept(image, label, slices=[2, 3], case_id="patient045_frame02")
        yield workspace


def weights_of(version) -> dict[str, torch.Tensor]:
    return load_tensors(version.path / "model.safetensors")


def predict_all(ws, image):
    pred = ws.predict(image, return_probabilities=True)
    hits = {z: [(e.id, e.score, e.weight) for e in items] for z, items in pred.exemplars.items()}
    return pred.labels, pred.probabilities, hits


def test_finetune_makes_a_new_active_version_and_rolls_back_exactly(ws, frame02, tiny_run):
    image = frame02[0][:4]
    original = predict_all(ws, image)
    old_version = ws.bank.retriever_version
    records = []
    v1 = ws.finetune(steps=STEPS, batch_size=2, device="cpu", progress=records.append)
    assert v1.name == "v001" and ws.active == v1 and v1.parent == "v000"
    assert [v.name for v in ws.versions()] == ["v000", "v001"]
    assert v1.metrics["corrections_used"] == 2 and v1.metrics["exemplars"] == 10
    assert ws.corrections_since_finetune == 0
    info = json.loads((v1.path / "finetune.json").read_text())
    assert info["steps"] == STEPS and len(info["correction_ids"]) == 2 and info["losses"]
    phases = [r.stage for r in records]
    assert phases.count("finetune") == STEPS and phases[-1] == "embed"
    assert records[0].done and records[0].total == STEPS
    assert "loss" in records[0].metrics and records[0].eta_s is not None
    old, new = weights_of(ws.versions()[0]), weights_of(v1)
    assert any(not torch.equal(old[k], new[k]) for k in old)
    new_version = ws.bank.retriever_version
    assert new_version != old_version and new_version == ws.engine().version
    assert new_version == retriever_version(load_model(v1.path).retriever)
    assert not ws.bank.needs_embedding(new_version)
    tuned = predict_all(ws, image)
    assert not np.array_equal(tuned[1], original[1])
    assert not (ws.path / "finetune").exists()
    assert not [p for p in (ws.path / "versions").iterdir() if p.name.startswith(".")]

    ws.activate("v000")
    restored = predict_all(ws, image)
    assert np.array_equal(restored[0], original[0]) and np.array_equal(restored[1], original[1])
    assert restored[2] == original[2] and ws.bank.retriever_version == old_version
    ws.activate("v001")
    assert np.array_equal(predict_all(ws, image)[1], tuned[1])
    ws.close()
    with Workspace.open(tiny_run, home=ws.path.parent.parent) as again:
        assert again.active.name == "v001" and again.active.metrics == v1.metrics


def test_cancel_keeps_the_active_version_and_resume_continues(ws, frame02):
    image = frame02[0][3]
    before = ws.predict(image).labels
    version = ws.bank.retriever_version
    seen = []
    with pytest.raises(CancelledError, match="cancelled"):
        ws.finetune(steps=STEPS, batch_size=2, device="cpu", progress=seen.append,
                    cancel=lambda: len(seen) >= 1)
    assert [v.name for v in ws.versions()] == ["v000"] and ws.active.name == "v000"
    assert ws.bank.retriever_version == version
    assert np.array_equal(ws.predict(image).labels, before)
    assert sorted(p.name for p in (ws.path / "versions").iterdir()) == ["v000"]
    assert ws.pending_finetune() == {"parent": "v000", "steps": STEPS, "step": 1}
    resumed = []
    v1 = ws.finetune(steps=STEPS, batch_size=2, device="cpu", progress=resumed.append)
    steps = [r.done for r in resumed if r.stage == "finetune"]
    assert steps == list(range(2, STEPS + 1)) and v1.metrics["steps"] == STEPS
    assert ws.pending_finetune() is None


def test_a_damaged_checkpoint_starts_afresh(ws):
    seen = []
    with pytest.raises(CancelledError):
        ws.finetune(steps=STEPS, batch_size=2, device="cpu", progress=seen.append,
                    cancel=lambda: len(seen) >= 1)
    for file in (ws.path / "finetune" / "checkpoints").glob("step_*/model.safetensors"):
        file.write_bytes(b"damaged")
    fresh = []
    version = ws.finetune(steps=STEPS, batch_size=2, device="cpu", progress=fresh.append)
    assert version.name == "v001"
    assert [r.done for r in fresh if r.stage == "finetune"][0] == 1
    ws.discard_finetune()


def test_checkpoints_of_another_job_are_discarded(tmp_path):
    root = tmp_path / "finetune"
    job = {"parent": "v000", "ids": [1, 2], "train": {"steps": 3}}
    _job_dir(root, job, resume=True)
    (root / "checkpoints").mkdir()
    assert (_job_dir(root, dict(job), resume=True) / "checkpoints").is_dir()  # same job: kept
    assert not (_job_dir(root, {**job, "ids": [1, 2, 3]}, resume=True) / "checkpoints").exists()
    (root / "checkpoints").mkdir()
    assert not (_job_dir(root, {**job, "ids": [1, 2, 3]}, resume=False) / "checkpoints").exists()
    assert json.loads((root / "job.json").read_text())["ids"] == [1, 2, 3]


def test_finetune_in_a_thread_while_predicting_and_accepting(ws, frame02):
    image, label = frame02
    started, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def progress(record: Progress) -> None:
        if record.stage == "finetune" and not started.is_set():
            started.set()
            go.wait(30)

    def work() -> None:
        try:
            ws.finetune(steps=STEPS, batch_size=2, device="cpu", progress=progress)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    assert started.wait(30)
    with pytest.raises(JRASError, match="already running"):
        ws.finetune(steps=STEPS)
    with pytest.raises(JRASError, match="is running"):
        ws.discard_finetune()
    ws.predict(image[1])  # the GUI thread keeps working during the fine-tune
    late = ws.accept(image[5], label[5], case_id="late")
    go.set()
    worker.join(60)
    assert not worker.is_alive() and errors == []
    assert ws.active.name == "v001" and ws.corrections_since_finetune == 1
    assert not ws.bank.needs_embedding(ws.engine().version)
    assert ws.predict(image[5]).exemplars[0][0].id == late[0]


def test_oversampling_draws_corrections_more_often():
    origins = ["training"] * 8 + ["correction"] * 2
    weights = correction_weights(origins, 4.0)
    assert weights.tolist() == [1.0] * 8 + [4.0] * 2
    with pytest.raises(DataError, match="oversample"):
        correction_weights(origins, 0.5)
    rng = np.random.default_rng(0)
    samples = [SliceSample(rng.random((16, 16), dtype=np.float32),
                           (rng.random((16, 16)) > 0.5).astype(np.uint8), f"p{i}", f"p{i}", 0)
               for i in range(10)]
    model = JRASModel(ModelConfig(num_classes=2, size=16, use_retrieval=False,
                                  backbone_options={"base_channels": 4, "depth": 2}))
    trainer = JointTrainer(model, SliceSet(samples, 2), TrainConfig(steps=1, device="cpu"),
                           sample_weights=weights.tolist())
    counts = np.bincount(trainer.sampler.sample(40000).numpy(), minlength=10)
    per_training, per_correction = counts[:8].mean(), counts[8:].mean()
    assert per_correction / per_training == pytest.approx(4.0, rel=0.1)


def test_finetune_config_starts_from_the_training_settings(ws):
    trained = json.loads((ws.versions()[0].path / "train_config.json").read_text())["train"]
    config = finetune_config(ws, steps=50, batch_size=2, device="cpu", lr=None)
    assert config.lr == pytest.approx(trained["lr"] * 0.2)
    assert config.steps == 50 and config.batch_size == 2 and config.retriever_warmup_steps == 0
    assert finetune_config(ws, 50, 2, "cpu", lr=1e-5).lr == 1e-5


def test_baseline_finetunes_on_its_corrections(tiny_baseline_run, tmp_path, frame02):
    image, label = frame02
    with Workspace.open(tiny_baseline_run, home=tmp_path) as ws:
        with pytest.raises(DataError, match="nothing to fine-tune"):
            ws.finetune(steps=STEPS, device="cpu")
        ws.accept(image, label, slices=[1, 2, 3], case_id="c")
        before = ws.predict(image[2], return_probabilities=True).probabilities
        v1 = ws.finetune(steps=STEPS, batch_size=2, device="cpu")
        assert ws.active == v1 and v1.metrics["corrections_used"] == 3 and ws.bank is None
        after = ws.predict(image[2], return_probabilities=True).probabilities
        assert not np.array_equal(before, after)
        ws.activate("v000")
        assert np.array_equal(ws.predict(image[2], return_probabilities=True).probabilities, before)
