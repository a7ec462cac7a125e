"""Crash safety: processes SIGKILLed at random points of bank writes, training and fine-tuning.

The killing is done by ``tests/reliability_worker.py`` (one subprocess that forks a child per
round and kills it after a seeded random delay). The seed is drawn afresh for every test run
(``NAPARI_JRAS_CRASH_SEED`` fixes it) and printed with the kill counts of each test
(``pytest -s`` shows them; a failure always does); with ``NAPARI_JRAS_CRASH_COUNTS=FILE`` each
test appends its counts to FILE as a JSON line (``benchmarks/reliability/soak.py`` uses that). Afterwards every committed exemplar must load
with its exact pixels and embedding, the search index must agree with the stored embeddings, the
newest complete checkpoint must load and training / fine-tuning must resume to the end.
See docs/reliability.md ("Crash safety").
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL
from reliability_worker import check_bank, read_log, run_worker, seed_bank

import napari_jras.core.train_checkpoint as train_checkpoint
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.checkpoint import load_model, load_tensors
from napari_jras.core.pipeline import train_run
from napari_jras.core.train import TrainConfig
from napari_jras.core.workspace import Workspace

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

SEED = int(os.environ.get("NAPARI_JRAS_CRASH_SEED") or random.SystemRandom().randrange(2**31))
BANK_KILLS = 15
TRAIN_KILLS = 12
FINETUNE_KILLS = 10
TRAIN = {"steps": 24, "batch_size": 4, "checkpoint_every": 3, "log_every": 3, "seed": 0}
REGEX = r"^(p\d+)_"


def record(test: str, counts: dict, record_property) -> None:
    """Print (and with NAPARI_JRAS_CRASH_COUNTS, append to that file) the seed and the counts."""
    line = {"test": test, "seed": SEED, **counts}
    print(f"crash test {json.dumps(line)}")
    record_property("crash_counts", json.dumps(line))
    if os.environ.get("NAPARI_JRAS_CRASH_COUNTS"):
        with open(os.environ["NAPARI_JRAS_CRASH_COUNTS"], "a") as fh:
            fh.write(json.dumps(line) + "\n")


def test_bank_writes_survive_random_kills(tmp_path, record_property):
    seed_bank(tmp_path / "bank")
    counts = run_worker("kill", job="bank", bank=str(tmp_path / "bank"),
                        log=str(tmp_path / "log"), kills=BANK_KILLS, seed=SEED, delay=[0.05, 0.5])
    record("bank", counts, record_property)
    assert counts["killed"] == BANK_KILLS, f"seed {SEED}"
    log = read_log(tmp_path / "log")
    assert sum(r["op"] == "add" for r in log) > BANK_KILLS  # the kills met real work
    assert check_bank(tmp_path / "bank", log) > BANK_KILLS


def newest_checkpoint(root: Path) -> Path:
    """The newest complete checkpoint under ``root/checkpoints``, checked to load."""
    done = sorted(p for p in (root / "checkpoints").glob("step_*") if (p / "trainer.json").is_file())
    assert done, f"no complete checkpoint in {root}"
    newest = done[-1]
    state = json.loads((newest / "trainer.json").read_text())
    assert state["step"] == int(newest.name.removeprefix("step_"))
    load_model(newest)
    assert "rng.torch" in load_tensors(newest / "trainer.safetensors")
    return newest


def test_training_survives_random_kills(acdc_slices_dir, tmp_path, record_property):
    run = tmp_path / "run"
    model = dict(TINY_MODEL, use_retrieval=True, modality="mri")
    args = {"data": str(acdc_slices_dir), "run": str(run), "model": model, "train": TRAIN,
            "patient_regex": REGEX}
    counts = run_worker("kill", job="train", kills=TRAIN_KILLS, seed=SEED + 1,
                        delay=[0.02, 0.35], calibrate={"run": str(tmp_path / "scratch")},
                        log=str(tmp_path / "log"), **args)
    record("train", counts, record_property)
    assert counts["killed"] + counts["finished"] == TRAIN_KILLS + 1, f"seed {SEED}"
    assert counts["killed"] >= 3, f"seed {SEED}: {counts}"
    newest_checkpoint(run)
    # the next run resumes from it and completes the run folder
    train_run(acdc_slices_dir, run, model, TrainConfig(**TRAIN), patient_regex=REGEX)
    assert json.loads((run / "train_config.json").read_text())["steps_done"] == TRAIN["steps"]
    load_model(run)
    with ExemplarBank.open(run / "bank") as bank:
        assert len(bank) == 8 and bank.load_all()[0].size == 8


def test_checkpoint_replaced_by_a_killed_save_is_never_half_there(tmp_path, monkeypatch):
    """A kill while an old checkpoint folder is deleted must not leave half of it as 'newest'."""
    from napari_jras.core.data import SliceSample
    from napari_jras.core.model import JRASModel, ModelConfig
    from napari_jras.core.train import JointTrainer, SliceSet

    rng = np.random.default_rng(0)
    samples = [SliceSample(rng.random((32, 32), dtype=np.float32),
                           rng.integers(0, 2, (32, 32)).astype(np.uint8), f"p{i}_slice0",
                           f"p{i}", 0) for i in range(4)]
    config = ModelConfig(num_classes=2, use_retrieval=False, size=32,
                         backbone_options={"base_channels": 4, "depth": 2})
    trainer = JointTrainer(JRASModel(config), SliceSet(samples, 2),
                           TrainConfig(steps=2, batch_size=2, checkpoint_every=1), run_dir=tmp_path)
    trainer.fit()  # checkpoints step 1 and 2, then step 2 once more at the end
    real_rmtree = shutil.rmtree

    def killed_half_way(path, ignore_errors=False):
        path = Path(path)
        if path.is_dir() and not path.name.endswith(".partial"):
            files = sorted(path.iterdir())
            for f in files[: len(files) // 2]:
                f.unlink()
            raise KeyboardInterrupt  # the process dies here
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(train_checkpoint.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    fresh = JointTrainer(JRASModel(config), SliceSet(samples, 2),
                         TrainConfig(steps=2, batch_size=2, checkpoint_every=1), run_dir=tmp_path)
    assert fresh.resume() and fresh.step in (1, 2)
    newest_checkpoint(tmp_path)


def test_finetune_survives_random_kills(tiny_run, tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    with Workspace.open(shutil.copytree(tiny_run, tmp_path / "run")) as ws:
        path = ws.path
        before = ws.bank.load_all()
    scratch = shutil.copytree(path, tmp_path / "scratch")
    counts = run_worker("kill", job="finetune", workspace=str(path), steps=30,
                        kills=FINETUNE_KILLS, seed=SEED + 2, delay=[0.02, 0.4],
                        calibrate={"workspace": str(scratch)}, log=str(tmp_path / "log"))
    record("finetune", counts, record_property)
    assert counts["killed"] + counts["finished"] == FINETUNE_KILLS + 1, f"seed {SEED}"
    assert counts["killed"] >= 3, f"seed {SEED}: {counts}"
    with Workspace.open(path) as ws:
        for version in ws.versions():
            load_model(version.path)
        after = ws.bank.load_all()
        for got, want in zip(after, before, strict=True):
            np.testing.assert_array_equal(got, want)
        if ws.pending_finetune() is not None:
            newest_checkpoint(path / "finetune")
        count = len(ws.versions())
        version = ws.finetune(steps=30, batch_size=2, device="cpu")
        assert ws.active.name == version.name and len(ws.versions()) == count + 1
