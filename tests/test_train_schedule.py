"""The learning-rate schedule: PyTorch's schedulers give the warm-up x cosine formula, and
resuming (from new checkpoints and from those written before the scheduler state was saved)
continues it."""

import json
import math

import pytest
import torch
from test_jras_core import synthetic_samples, tiny_model

from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig
from napari_jras.core.train_schedule import restore_schedule, warmup_cosine


def formula(step: int, steps: int, warmup_fraction: float, lr: float) -> float:
    """The learning rate after ``step`` steps as the hand-written LambdaLR computed it."""
    warm = max(1, int(steps * warmup_fraction))
    return lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g == w == 0.0) or abs(g - w) <= 1e-9 * abs(w), f"step {i}: {g} != {w}"


@pytest.mark.parametrize("steps,warmup_fraction,lr", [
    (20, 0.3, 1e-3), (2000, 0.05, 1e-3), (100, 0.1, 2e-4), (7, 0.0, 0.5),  # no warm-up
    (3, 1.0, 1e-3),  # the warm-up takes every step
    (1, 0.05, 1e-3), (10, 0.99, 1e-2), (30000, 0.5, 1e-3)])
def test_schedule_matches_the_warmup_cosine_formula(steps, warmup_fraction, lr):
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = warmup_cosine(optimizer, steps, warmup_fraction)
    got = []
    for _ in range(steps):
        got.append(optimizer.param_groups[0]["lr"])
        assert scheduler.get_last_lr() == [got[-1]]
        optimizer.step()
        scheduler.step()
    got.append(scheduler.get_last_lr()[0])
    assert_close(got, [formula(s, steps, warmup_fraction, lr) for s in range(steps + 1)])
    assert got[-1] == 0.0


def trainer(run_dir, steps=8, cancel_at=None, **config) -> JointTrainer:
    config = TrainConfig(steps=steps, batch_size=2, warmup_fraction=0.5, log_every=1,
                         checkpoint_every=0, device="cpu", **config)
    holder = []
    cancel = None if cancel_at is None else (lambda: holder[0].step >= cancel_at)
    holder.append(JointTrainer(tiny_model(use_retrieval=False), SliceSet(synthetic_samples(), 3),
                               config, run_dir=run_dir, cancel=cancel))
    return holder[0]


def lrs(history: list[dict]) -> list[float]:
    return [r["lr"] for r in history if r.get("phase") == "train"]


def test_training_logs_the_formula_and_resumes_with_the_scheduler_state(tmp_path):
    whole = trainer(tmp_path / "whole")
    expected = lrs(whole.fit())
    assert_close(expected, [formula(s, 8, 0.5, TrainConfig().lr) for s in range(1, 9)])
    first = trainer(tmp_path / "run", cancel_at=3)
    first.fit()  # cancelled after step 3: its checkpoint holds the scheduler's state_dict
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/trainer.json"))
                       .read_text())
    assert saved["step"] == 3 and saved["scheduler"]["_schedulers"][1]["last_epoch"] == 3
    resumed = trainer(tmp_path / "run")
    assert resumed.resume() and resumed.step == 3
    assert resumed.scheduler.get_last_lr() == [expected[2]]
    assert lrs(resumed.fit()) == expected[3:]  # bit for bit: the recursion continues exactly


def test_checkpoints_without_the_scheduler_state_resume_on_the_same_learning_rates(tmp_path):
    """Checkpoints written before the PyTorch schedulers saved only the step (the LambdaLR's
    ``last_epoch``), and the optimizer's learning rate of the formula at that step."""
    trainer(tmp_path, cancel_at=2).fit()  # step 2: still warming up (4 warm-up steps)
    file = next((tmp_path / "checkpoints").glob("step_*/trainer.json"))
    old = json.loads(file.read_text())
    old["scheduler"] = 2
    for group in old["param_groups"]:
        group["lr"] = formula(2, 8, 0.5, group["initial_lr"])
    file.write_text(json.dumps(old))
    resumed = trainer(tmp_path)
    assert resumed.resume() and resumed.step == 2
    assert_close(resumed.scheduler.get_last_lr(), [formula(2, 8, 0.5, TrainConfig().lr)])
    assert_close(lrs(resumed.fit()), [formula(s, 8, 0.5, TrainConfig().lr) for s in range(3, 9)])


def test_restoring_an_old_step_count_replays_the_schedule():
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    walked = warmup_cosine(reference, 50, 0.2)
    for _ in range(17):
        reference.step()
        walked.step()
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    restored = warmup_cosine(optimizer, 50, 0.2)
    optimizer.param_groups[0]["lr"] = reference.param_groups[0]["lr"]  # as a loaded optimizer
    restore_schedule(restored, 17, 50, 0.2)
    assert restored.state_dict() == walked.state_dict()
