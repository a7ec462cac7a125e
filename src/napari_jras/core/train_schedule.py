"""The learning-rate schedule: linear warm-up multiplied by a cosine decay, PyTorch's schedulers.

The learning rate after ``s`` steps is ``lr * min(1, (s + 1) / warm) * (1 + cos(pi * s / steps)) / 2``
with ``warm = max(1, int(steps * warmup_fraction))``: :class:`~torch.optim.lr_scheduler.LinearLR`
and :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` chained (their factors multiply, the
cosine starts at step 0 as before the schedulers were used). A checkpoint stores the scheduler's
``state_dict``; checkpoints written before (a step count only) resume at the same position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, CosineAnnealingLR, LinearLR


def warmup_steps(steps: int, warmup_fraction: float) -> int:
    """Steps of the linear warm-up (at least 1: the first step already uses ``lr / warm``)."""
    return max(1, int(steps * warmup_fraction))


def warmup_cosine(optimizer: Optimizer, steps: int, warmup_fraction: float) -> ChainedScheduler:
    """The trainer's schedule on ``optimizer`` (see the module docstring).

    Args:
        optimizer: the optimizer whose learning rates (its ``lr``) the schedule scales.
        steps: the run's total steps (the cosine reaches 0 there).
        warmup_fraction: share of ``steps`` spent warming up linearly from ``lr / warm``.

    Returns:
        The scheduler, at step 0 (``optimizer``'s learning rates already set for the first step).
    """
    warm = warmup_steps(steps, warmup_fraction)
    return ChainedScheduler([LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0,
                                      total_iters=max(1, warm - 1)),
                             CosineAnnealingLR(optimizer, T_max=steps)], optimizer=optimizer)


def restore_schedule(scheduler: ChainedScheduler, saved: dict[str, Any] | int, steps: int,
                     warmup_fraction: float) -> None:
    """Put ``scheduler`` (made by :func:`warmup_cosine`) where a checkpoint left it.

    Call it after the optimizer's state (and so its current learning rates) has been loaded.

    Args:
        scheduler: the scheduler to restore.
        saved: its ``state_dict`` as saved, or, in checkpoints written before it was saved, the
            number of steps the schedule had made.
        steps: the run's total steps.
        warmup_fraction: the run's warm-up share.
    """
    if isinstance(saved, dict):
        scheduler.load_state_dict(saved)
        return
    # an old checkpoint: replay the schedule on a stand-in optimizer up to that step and take
    # its state; the learning rates themselves come from the loaded optimizer
    groups = scheduler.optimizer.param_groups
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)],
                                 "lr": g.get("initial_lr", g["lr"])} for g in groups])
    replay = warmup_cosine(stand_in, steps, warmup_fraction)
    stand_in.step()  # the schedule is stepped after the optimizer, as in training
    for _ in range(int(saved)):
        replay.step()
    scheduler.load_state_dict(replay.state_dict())
