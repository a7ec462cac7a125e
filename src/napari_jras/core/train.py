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
from .joint_trainer import CancelFn, JointTrainer, ProgressFn
from .ranges import check_bool, check_int, check_number
from .train_losses import mask_relevance, segmentation_loss
from .train_sampling import SliceSet, corrupted_copy

__all__ = ["CURRICULUM", "MAX_BATCH", "MAX_STEPS", "CancelFn", "JointTrainer", "ProgressFn",
           "SliceSet", "TrainConfig", "corrupted_copy", "mask_relevance", "seed_everything",
           "segmentation_loss"]

MAX_STEPS = 10_000_000
MAX_BATCH = 4096


#: guide curriculum per fusion: fractions of supervised samples trained with no exemplar
#: (guide_dropout), with adjacent slices / the other frame of their own patient
#: (neighbour_guides), with their own slice warped and its mask corrupted (own_guides); the
#: rest retrieve other patients' exemplars, the paper's case
CURRICULUM = {
    "concat": {"guide_dropout": 0.5, "neighbour_guides": 0.0, "own_guides": 0.0},
    "readout": {"guide_dropout": 0.1, "neighbour_guides": 0.35, "own_guides": 0.2},
}


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
    """

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    contrastive_every: int = 1
    contrastive_candidates: int = 64
    contrastive_positives: int = 2
    contrastive_tau: float = 0.1
    retriever_warmup_steps: int = 0
    refresh_every: int = 0
    freeze_retriever: bool = False
    guide_dropout: float | None = None
    neighbour_guides: float | None = None
    own_guides: float | None = None
    class_sampling: float = 0.33
    readout_weight: float = 0.5
    image_dropout: float = 0.3
    augment: bool = True
    amp: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    val_every: int = 0
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field's type and range (docs/cli.md) before anything is built."""
        for name, low, high in (
                ("steps", 1, MAX_STEPS), ("batch_size", 1, MAX_BATCH),
                ("contrastive_every", 0, MAX_STEPS), ("contrastive_candidates", 2, MAX_BATCH),
                ("contrastive_positives", 1, MAX_BATCH), ("retriever_warmup_steps", 0, MAX_STEPS),
                ("refresh_every", 0, MAX_STEPS), ("seed", 0, 2**63 - 1),
                ("log_every", 0, MAX_STEPS), ("checkpoint_every", 0, MAX_STEPS),
                ("val_every", 0, MAX_STEPS)):
            check_int(getattr(self, name), name, low, high, JRASError)
        if self.contrastive_positives >= self.contrastive_candidates:
            raise JRASError(f"contrastive_positives ({self.contrastive_positives}) must be "
                            f"fewer than contrastive_candidates ({self.contrastive_candidates})")
        check_number(self.lr, "lr", 0.0, 1.0, JRASError, open_low=True)
        check_number(self.weight_decay, "weight_decay", 0.0, 1.0, JRASError)
        check_number(self.warmup_fraction, "warmup_fraction", 0.0, 1.0, JRASError)
        check_number(self.contrastive_tau, "contrastive_tau", MIN_TAU, MAX_TAU, JRASError)
        for name in ("guide_dropout", "neighbour_guides", "own_guides"):  # None: the fusion's
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, 0.0, 1.0, JRASError,
                             open_high=name == "guide_dropout")
        given = [v for v in (self.guide_dropout, self.neighbour_guides, self.own_guides)
                 if v is not None]
        if sum(given) > 1.0 + 1e-9:
            raise JRASError("guide_dropout + neighbour_guides + own_guides must not exceed 1, "
                            f"got {sum(given):.3g}")
        check_number(self.class_sampling, "class_sampling", 0.0, 1.0, JRASError)
        check_number(self.readout_weight, "readout_weight", 0.0, 100.0, JRASError)
        check_number(self.image_dropout, "image_dropout", 0.0, 1.0, JRASError, open_high=True)
        for name in ("freeze_retriever", "augment", "amp"):
            check_bool(getattr(self, name), name, JRASError)
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
