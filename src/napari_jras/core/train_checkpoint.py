"""Resumable training checkpoints: ``<run>/checkpoints/step_NNNNNNNN/``.

Each holds ``config.json`` + ``model.safetensors`` (the model), ``trainer.safetensors`` (the
optimizer's tensors, the RNG states, the bank embeddings) and ``trainer.json`` (step, optimizer
groups, learning-rate scheduler, gradient scaler, training settings). A checkpoint is written
into a ``.partial`` folder and renamed; replaced ones are renamed before they are deleted, so the
newest ``step_*`` folder with a ``trainer.json`` is always complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .checkpoint import atomic_write_json, load_tensors, save_model, save_tensors
from .model import JRASModel
from .run_files import (
    CHECKPOINT_GLOB,
    CHECKPOINTS_DIR,
    TRAINER_STATE_FILE,
    TRAINER_TENSORS_FILE,
    WEIGHTS_FILE,
    checkpoint_name,
)


@dataclass
class TrainingState:
    """What a checkpoint saves and restores of a trainer (the objects themselves, in place)."""

    model: JRASModel
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator


def save_checkpoint(run_dir: Path, step: int, state: TrainingState,
                    bank_embeddings: torch.Tensor | None, train_config: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``step``; the newest ``keep`` checkpoints are kept.

    Args:
        run_dir: the run folder (the checkpoint goes under its ``checkpoints/``).
        step: the steps done.
        state: the model, optimizer, scheduler, scaler and generator to save.
        bank_embeddings: the bank's current embeddings (None when not computed).
        train_config: the training settings, as plain values.
        keep: how many checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    ckpt_root = run_dir / CHECKPOINTS_DIR
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".{checkpoint_name(step)}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, state.model)
    tensors, groups = _optimizer_tensors(state.optimizer)
    tensors["rng.generator"] = state.generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if bank_embeddings is not None:
        tensors["bank_embeddings"] = bank_embeddings
    save_tensors(tmp / TRAINER_TENSORS_FILE, tensors)
    atomic_write_json(tmp / TRAINER_STATE_FILE, {
        "step": step, "param_groups": groups,
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        "train_config": train_config})
    _retire(final)
    tmp.rename(final)
    for old in sorted(ckpt_root.glob(CHECKPOINT_GLOB))[:-keep]:
        _retire(old)
    return final


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir`` (None when there is none)."""
    done = sorted(p for p in (run_dir / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB)
                  if (p / TRAINER_STATE_FILE).exists())
    return done[-1] if done else None


@dataclass
class Restored:
    """What :func:`load_checkpoint` read besides the state it restored in place."""

    step: int
    scheduler: dict[str, Any] | int  # the scheduler's state_dict; an old checkpoint's: its step
    bank_embeddings: torch.Tensor | None


def load_checkpoint(ckpt: Path, state: TrainingState) -> Restored:
    """Load a checkpoint folder into ``state``: weights, optimizer, RNG states, scaler.

    The scheduler is left to the caller (:func:`~.train_schedule.restore_schedule`), which
    knows the schedule an old checkpoint's step count refers to.

    Args:
        ckpt: the checkpoint folder.
        state: the objects to restore (in place).

    Returns:
        The step, the saved scheduler state and the bank embeddings (if saved).
    """
    saved = json.loads((ckpt / TRAINER_STATE_FILE).read_text())
    state.model.load_state_dict(load_tensors(ckpt / WEIGHTS_FILE))
    tensors = load_tensors(ckpt / TRAINER_TENSORS_FILE)
    _load_optimizer(state.optimizer, tensors, saved["param_groups"])
    state.generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if saved.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(saved["scaler"])
    return Restored(int(saved["step"]), saved["scheduler"], tensors.get("bank_embeddings"))


def _retire(folder: Path) -> None:
    """Delete a checkpoint folder, renamed first: a crash never leaves half of it under its name."""
    if folder.exists():
        trash = folder.with_name(f".{folder.name}.deleting")
        shutil.rmtree(trash, ignore_errors=True)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _optimizer_tensors(optimizer: Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"opt.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def _load_optimizer(optimizer: Optimizer, tensors: dict[str, torch.Tensor],
                    groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
