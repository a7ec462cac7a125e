"""Training settings and the names of the training API.

:class:`TrainConfig` holds a run's optimisation settings; the joint trainer itself lives in
:mod:`.joint_trainer`, what it trains on in :mod:`.train_sampling`, its losses in
:mod:`.train_losses`, its learning-rate schedule in :mod:`.train_schedule` and its checkpoints in
:mod:`.train_checkpoint`. The names used across the package are importable from here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .errors import JRASError
from .fusion import MAX_TAU, MIN_TAU
from .joint_trainer import JointTrainer
from .progress import CancelFn, ProgressFn
from .train_losses import mask_relevance, segmentation_loss
from .train_sampling import SliceSet, corrupted_copy

__all__ = ["CURRICULUM", "MAX_BATCH", "MAX_STEPS", "CancelFn", "JointTrainer", "ProgressFn",
           "SliceSet", "TrainConfig", "corrupted_copy", "mask_relevance", "seed_everything",
           "segmentation_loss"]
from .settings import check_settings, setting

MAX_STEPS = 10_000_000
MAX_BATCH = 4096


#: guide curriculum per fusion: fractions of supervised samples trained with no exemplar
#: (guide_dropout), with adjacent slices / the other frame of their own patient
#: (neighbour_guides), with their own slice warped and its mask corrupted (own_guides); the
#: rest retrieve other patients' exemplars, the paper's case. The readout's: 30 % without
#: exemplars keeps its image path as good as the baseline's (docs/benchmarks.md, "a curriculum
#: that keeps the image path"); the guided 70 % split 0.35 : 0.2 : 0.35 as before.
CURRICULUM = {
    "concat": {"guide_dropout": 0.5, "neighbour_guides": 0.0, "own_guides": 0.0},
    "readout": {"guide_dropout": 0.3, "neighbour_guides": 0.272222, "own_guides": 0.155556},
}
_R, _C = CURRICULUM["readout"], CURRICULUM["concat"]  # for the settings' help


@dataclass
class TrainConfig:
    """Optimisation settings of a training or fine-tuning run (saved as ``train_config.json``).

    ``batch_size`` is the global batch: under torchrun it is split across the processes, so
    steps, epochs and the learning-rate schedule mean the same at every world size.
    The guide curriculum (``guide_dropout``, ``neighbour_guides``, ``own_guides``) left at
    None takes the model's fusion's defaults (:data:`CURRICULUM`, see :meth:`resolved`).
    ``class_sampling`` is the fraction of each batch drawn from slices that contain a
    foreground class chosen at random (rare classes are seen in every batch);
    ``readout_weight`` weighs the readout fusion's own loss on its propagated mask;
    ``image_dropout`` is the fraction of queries with exemplars whose deep image features are
    dropped in a readout step (:meth:`JRASModel.forward_readout`), so the decoder learns to
    rely on the readout where the image path alone would not know.
    Each field but ``extra`` is a setting (:func:`~napari_jras.core.settings.setting`): its
    help, range and command-line flag feed the checks, ``napari-jras train`` and the panel.
    """

    steps: int = setting(2000, low=1, high=MAX_STEPS, step=100, panel=True,
                         help="optimisation steps")
    batch_size: int = setting(8, low=1, high=MAX_BATCH, panel=True,
                              help="slices per step; the global batch: under torchrun it is "
                                   "split across the processes")
    lr: float = setting(1e-2, low=0.0, high=1.0, open_low=True,
                        help="AdamW learning rate (5 % linear warm-up, then cosine decay)")
    weight_decay: float = setting(1e-4, low=0.0, high=1.0, flag=None, help="AdamW weight decay")
    warmup_fraction: float = setting(0.05, low=0.0, high=1.0, flag=None,
                                     help="fraction of the steps of linear learning-rate warm-up")
    contrastive_every: int = setting(
        1, low=0, high=MAX_STEPS,
        help="a contrastive retriever step every N supervised steps (0: off)")
    contrastive_candidates: int = setting(
        64, low=2, high=MAX_BATCH, flag=None,
        help="candidate exemplars per query of a contrastive step")
    contrastive_positives: int = setting(
        2, low=1, high=MAX_BATCH, flag=None,
        help="positives among the candidates (those whose masks overlap most with the query's)")
    contrastive_tau: float = setting(0.1, low=MIN_TAU, high=MAX_TAU, flag=None,
                                     help="temperature of the contrastive loss")
    retriever_warmup_steps: int = setting(0, low=0, high=MAX_STEPS, flag="--warmup-steps",
                                          help="NT-Xent retriever warm-up steps")
    refresh_every: int = setting(0, low=0, high=MAX_STEPS, flag=None,
                                 help="steps between bank embedding refreshes (0: once per epoch)")
    freeze_retriever: bool = setting(False, help="ablation: no retriever training")
    guide_dropout: float | None = setting(
        None, low=0.0, high=1.0, open_high=True,
        help="fraction of supervised samples trained without exemplars, in [0, 1) "
             f"(default: {_R['guide_dropout']:.2g} readout, {_C['guide_dropout']:.2g} concat)")
    neighbour_guides: float | None = setting(
        None, low=0.0, high=1.0,
        help="fraction of supervised samples guided by adjacent slices (and the other frame) "
             "of their own volume, as after an accepted correction; lifts the own-patient "
             "exclusion for those samples only (never at evaluation) "
             f"(default: {_R['neighbour_guides']:.2g} readout, {_C['neighbour_guides']:.2g} concat)")
    own_guides: float | None = setting(
        None, low=0.0, high=1.0,
        help="fraction of supervised samples whose first exemplar is their own slice, warped, "
             f"with a corrupted mask (default: {_R['own_guides']:.2g} readout, "
             f"{_C['own_guides']:.2g} concat)")
    class_sampling: float = setting(
        0.33, low=0.0, high=1.0,
        help="fraction of each batch drawn from slices holding a randomly chosen foreground "
             "class")
    readout_weight: float = setting(
        0.5, low=0.0, high=100.0,
        help="weight of the readout fusion's loss on its propagated mask")
    image_dropout: float = setting(
        0.0, low=0.0, high=1.0, open_high=True,
        help="readout fusion: fraction of queries with exemplars trained without their deep "
             "image features, in [0, 1)")
    augment: bool = setting(True, flag="--no-augment",
                            help="random affine / intensity augmentation")
    amp: bool = setting(True, flag="--no-amp",
                        help="mixed precision on CUDA (bf16 where supported, else fp16)")
    seed: int = setting(0, low=0, high=2**63 - 1, help="random seed")
    log_every: int = setting(10, low=0, high=MAX_STEPS,
                             help="steps between log lines (0: only the last step)")
    checkpoint_every: int = setting(
        200, low=0, high=MAX_STEPS,
        help="steps between resumable checkpoints (0: only when training stops)")
    val_every: int = setting(
        0, low=0, high=MAX_STEPS,
        help="validation Dice (needs --val) at logged steps that are multiples of N (0: never)")
    device: str = setting("auto", check=False, panel=True,
                          help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field's type and range (docs/cli.md) before anything is built."""
        check_settings(self, JRASError)
        if self.contrastive_positives >= self.contrastive_candidates:
            raise JRASError(f"contrastive_positives ({self.contrastive_positives}) must be "
                            f"fewer than contrastive_candidates ({self.contrastive_candidates})")
        given = [v for v in (self.guide_dropout, self.neighbour_guides, self.own_guides)
                 if v is not None]
        if sum(given) > 1.0 + 1e-9:
            raise JRASError("guide_dropout + neighbour_guides + own_guides must not exceed 1, "
                            f"got {sum(given):.3g}")
        if not isinstance(self.device, str) or not self.device:
            raise JRASError(f"device must be a name such as auto, cpu or cuda, got {self.device!r}")
        if not isinstance(self.extra, dict):
            raise JRASError(f"extra must be a JSON object, got {type(self.extra).__name__}")


    def resolved(self, fusion: str) -> TrainConfig:
        """This config with the curriculum fractions left at None set for ``fusion``.

        Unset fractions take :data:`CURRICULUM`'s, scaled so that the parts of the default
        curriculum that were not overridden keep their proportions (e.g. ``guide_dropout=0.5``
        with the readout fusion: neighbour 0.19, own 0.11, retrieved 0.19).
        """
        defaults = CURRICULUM.get(fusion, CURRICULUM["concat"])
        given = {k: getattr(self, k) for k in defaults if getattr(self, k) is not None}
        rest = 1.0 - sum(defaults[k] for k in given)
        scale = (1.0 - sum(given.values())) / rest if rest > 0 else 0.0
        return replace(self, **{k: given.get(k, round(v * scale, 6))
                                for k, v in defaults.items()})


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; deterministic algorithms where cheap."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
