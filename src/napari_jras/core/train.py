"""Joint trainer: alternating supervised (Dice + CE) and segmentation-aware contrastive steps.

* Supervised step: the query is embedded, its top-K exemplars (never its own patient) are fused
  into a guide, the segmenter predicts; the loss updates the segmenter and, through the fusion
  weights, the retriever.
* Contrastive step (retriever only): InfoNCE where, for each query, the candidate exemplars whose
  masks overlap most with the query's ground truth are the positives.
* Optional warm-up: NT-Xent on two augmented views of each slice.
* Bank embeddings are refreshed with the current retriever on a schedule, not per step.

Under torchrun (see ``docs/multi_gpu.md``) the trainer runs DistributedDataParallel: every rank
draws the same global batch from the shared seeded generator and trains on its own contiguous
part of it, gradients are averaged, bank embeddings are computed shard-wise and all-gathered,
and only rank 0 writes logs, checkpoints and progress. With one process nothing changes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as ddp
from .augment import augment, random_affine
from .checkpoint import atomic_write_json, load_tensors, save_model, save_tensors
from .data import SliceSample
from .device import autocast
from .errors import DataError, JRASError
from .fusion import MAX_TAU, MIN_TAU, Guide, make_guide, shift_exemplars, soft_topk_guide
from .memory import RELEVANCE_SIZE, check_training_memory
from .metrics import mean_dice
from .model import JRASModel
from .progress import CancelFn, Progress, ProgressFn
from .ranges import check_bool, check_int, check_number
from .readout import readout_loss
from .retrieval import embed_images, retriever_version

MAX_STEPS = 10_000_000
MAX_BATCH = 4096
NEIGHBOUR_RANGE = 2  # neighbour guides: slices at most this far from the query, same volume


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


def every(step: int, period: int) -> bool:
    """Whether something done every ``period`` steps happens at ``step`` (never when 0)."""
    return period > 0 and step % period == 0


class SliceSet:
    """Slices stacked as tensors at the model size, with patient ids for leakage control."""

    def __init__(self, samples: Sequence[SliceSample], num_classes: int):
        if not samples:
            raise DataError("No slices to train on")
        shapes = {s.image.shape for s in samples}
        if len(shapes) != 1:
            raise DataError(f"Slices must share one size (resize them first), got {sorted(shapes)[:3]}")
        if any(s.label is None for s in samples):
            raise DataError("Every training slice needs a label")
        self.samples = list(samples)
        self.images = torch.from_numpy(np.stack([s.image for s in samples]).astype(np.float32))
        labels = np.stack([s.label for s in samples])
        if labels.max() >= num_classes:
            raise DataError(f"Labels contain class {int(labels.max())} but the model has "
                            f"{num_classes} classes (0..{num_classes - 1})")
        self.labels = torch.from_numpy(labels.astype(np.int64))
        names = sorted({s.patient_id for s in samples})
        lookup = {p: i for i, p in enumerate(names)}
        self.patients = torch.tensor([lookup[s.patient_id] for s in samples])
        self.patient_names = names
        case_lookup = {c: i for i, c in enumerate(sorted({s.case_id for s in samples}))}
        self.cases = torch.tensor([case_lookup[s.case_id] for s in samples])
        self.slice_indices = torch.tensor([s.slice_index for s in samples])
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; deterministic algorithms where cheap."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice.mean())


def drop_guides(guide: Guide, keep: torch.Tensor) -> Guide:
    """Zero the guide image and mask (and empty the slots) of the queries where ``keep`` is False.

    Guide dropout: a segmenter that sometimes trains without its guide has to learn the image
    itself instead of copying the guide mask, the shortcut that makes it trust a misaligned guide.
    """
    k = keep.to(guide.image.dtype).view(-1, 1, 1, 1)
    present = None if guide.present is None else guide.present & keep[:, None]
    return replace(guide, image=guide.image * k, mask=guide.mask * k, present=present)


def corrupted_copy(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slice (B,H,W) warped, and its mask warped, shifted and sometimes missing a class.

    The "own slice" exemplar of the guide curriculum: aligned enough to be informative, wrong
    enough (a few pixels off at the boundary, a structure dropped) that copying it is not right.
    """
    images, masks = random_affine(x, y, generator, max_rotation=20.0, scale=(0.85, 1.15),
                                  max_shift=0.06)
    b, h, w = masks.shape
    shift = torch.randint(-3, 4, (b, 1, 2), generator=generator).to(masks.device)
    _, masks = shift_exemplars(images[:, None], masks[:, None], shift)
    masks = masks[:, 0]
    drop = torch.rand(b, generator=generator) < 0.25
    classes = int(y.max()) + 1
    if classes > 1 and bool(drop.any()):
        gone = torch.randint(1, classes, (b,), generator=generator).to(masks.device)
        hit = drop.to(masks.device)[:, None, None] & (masks == gone[:, None, None])
        masks = masks.masked_fill(hit, 0)
    return images, masks


def with_own_exemplar(guide: Guide, own: torch.Tensor, images: torch.Tensor,
                      masks: torch.Tensor, num_classes: int) -> Guide:
    """``guide`` with the first exemplar slot of the queries where ``own`` (B,) is set replaced
    by ``images``/``masks`` (B,H,W), at the weight of the best retrieved exemplar."""
    ex_images, ex_masks = guide.exemplars.clone(), guide.exemplar_masks.clone()
    ex_images[own, 0] = images[own].to(ex_images.dtype)
    ex_masks[own, 0] = masks[own].to(ex_masks.dtype)
    fused = make_guide(ex_images, ex_masks, guide.weights, guide.scores, guide.indices,
                       num_classes)
    return replace(fused, present=guide.present)


def relevance_masks(labels: torch.Tensor, num_classes: int, chunk: int = 64) -> torch.Tensor:
    """One-hot (N,C,32,32) area-downsampled masks of labels (N,H,W), made ``chunk`` at a time
    (the full-resolution one-hot of every slice at once would take N*H*W*C*8 bytes)."""
    parts = [F.interpolate(F.one_hot(labels[i:i + chunk], num_classes).permute(0, 3, 1, 2).float(),
                           size=(RELEVANCE_SIZE, RELEVANCE_SIZE), mode="area")
             for i in range(0, len(labels), chunk)]
    return torch.cat(parts)


def mask_relevance(query_masks: torch.Tensor, cand_masks: torch.Tensor) -> torch.Tensor:
    """Mean foreground Dice between (B,C,h,w) and (M,C,h,w) one-hot masks -> (B, M).

    A class absent from both masks counts as a perfect match, so empty slices find empty slices.
    """
    q = query_masks.flatten(2)  # B,C,P
    c = cand_masks.flatten(2)  # M,C,P
    inter = torch.einsum("bcp,mcp->bmc", q, c)
    sums = q.sum(-1)[:, None, :] + c.sum(-1)[None, :, :]
    dice = torch.where(sums > 0, 2 * inter / sums.clamp_min(1e-6), torch.ones_like(sums))
    return dice[..., 1:].mean(-1)


def info_nce(q: torch.Tensor, c: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Multi-positive InfoNCE: -log(sum_pos exp(s/tau) / sum_valid exp(s/tau)), mean over rows."""
    logits = (q @ c.t()) / tau
    logits = logits.masked_fill(~valid, -torch.inf)
    pos = logits.masked_fill(~(positives & valid), -torch.inf)
    rows = (positives & valid).any(1)
    if not rows.any():
        return logits.new_zeros(())
    loss = torch.logsumexp(logits[rows], 1) - torch.logsumexp(pos[rows], 1)
    return loss.mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent on two batches of unit embeddings (positives: same row)."""
    z = torch.cat([z1, z2])
    sim = (z @ z.t()) / tau
    n = z1.shape[0]
    sim.fill_diagonal_(-torch.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class _StepRunner(nn.Module):
    """Holds the model so that a whole training step is one ``forward`` call.

    DistributedDataParallel synchronises gradients of what runs inside its wrapped module's
    forward; the J-RAS steps use the retriever and the segmenter in different combinations
    (supervised: both, through the fusion weights; contrastive and warm-up: the retriever only),
    so the step function itself is passed in and run inside the forward.
    """

    def __init__(self, model: JRASModel):
        super().__init__()
        self.model = model

    def forward(self, step: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """Run ``step(*args)`` (a loss function using ``self.model``)."""
        return step(*args)


class JointTrainer:
    """Trains a :class:`JRASModel` on a :class:`SliceSet` that also serves as the retrieval bank.

    ``sample_weights`` (one per slice) oversample some slices, e.g. fresh corrections during
    fine-tuning. ``progress`` receives a :class:`~.progress.Progress` per logged step;
    ``cancel()`` returning True stops the run cleanly after the current step (a checkpoint is
    written when ``run_dir`` is set).
    Inside a torchrun process group the model is trained with DistributedDataParallel; the
    cancel flag of any rank stops every rank at the same step.
    """

    def __init__(self, model: JRASModel, train: SliceSet, config: TrainConfig,
                 run_dir: str | Path | None = None, val: SliceSet | None = None,
                 sample_weights: Sequence[float] | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None):
        config = config.resolved(model.config.fusion if model.config.use_retrieval else "concat")
        self.config = config
        self.device = ddp.training_device(config.device)
        self.world_size = ddp.world_size()
        if config.batch_size < self.world_size:
            raise JRASError(f"batch_size {config.batch_size} is the global batch, split across "
                            f"{self.world_size} processes: it must be at least {self.world_size}")
        if model.config.use_retrieval and len(train.patient_names) < 2:
            raise DataError(
                f"J-RAS training needs slices of at least 2 patients, found only "
                f"{len(train.patient_names)} ({train.patient_names[0]}): a query never retrieves "
                "exemplars of its own patient. Add patients (check --patient-regex), or train "
                "the baseline with --no-retrieval")
        check_training_memory(model, -(-config.batch_size // self.world_size), self.device,
                              config.contrastive_candidates, len(train))
        self.model = model.to(self.device)
        self.train_set = train
        self.val_set = val
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.cancel = cancel or (lambda: False)
        self.use_retrieval = model.config.use_retrieval
        self.generator = torch.Generator().manual_seed(config.seed)
        self.weights = None
        if sample_weights is not None:
            if len(sample_weights) != len(train):
                raise DataError("sample_weights needs one weight per training slice")
            self.weights = torch.tensor(sample_weights, dtype=torch.float64)
        if self.use_retrieval and config.freeze_retriever:
            for p in model.retriever.parameters():
                p.requires_grad_(False)
        self._runner: nn.Module = _StepRunner(model)
        if self.world_size > 1:
            # contrastive and warm-up steps leave the segmenter unused
            self._runner = DistributedDataParallel(
                self._runner, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        warm = max(1, int(config.steps * config.warmup_fraction))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(
                math.pi * min(1.0, s / config.steps))))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._fp16())
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.bank_images = train.images.to(self.device)
        self.bank_labels = train.labels.to(self.device)
        self.bank_patients = train.patients.to(self.device)
        self.bank_cases = train.cases.to(self.device)
        self.bank_slices = train.slice_indices.to(self.device)
        self.bank_emb: torch.Tensor | None = None
        self.relevance_masks = relevance_masks(train.labels, train.num_classes).to(self.device)
        present = torch.stack([(train.labels == c).flatten(1).any(1)
                               for c in range(train.num_classes)], 1)  # N,C
        self.class_slices = [torch.nonzero(present[:, c]).flatten()
                             for c in range(1, train.num_classes) if bool(present[:, c].any())]
        steps_per_epoch = max(1, len(train) // config.batch_size)
        self.refresh_every = config.refresh_every or steps_per_epoch
        self._started = 0.0

    def _fp16(self) -> bool:
        return (self.config.amp and self.device.type == "cuda"
                and not torch.cuda.is_bf16_supported())

    # -- sampling -------------------------------------------------------------------------
    def _sample(self, n: int) -> torch.Tensor:
        """``n`` slice indices: weighted, or uniform with a class-aware share.

        With ``class_sampling`` > 0, that share of the batch comes from slices containing a
        foreground class drawn uniformly, so a rare class is in (nearly) every batch.
        """
        if self.weights is not None:
            return torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        idx = torch.randint(len(self.train_set), (n,), generator=self.generator)
        n_class = round(n * self.config.class_sampling) if self.class_slices else 0
        if n_class:
            classes = torch.randint(len(self.class_slices), (n_class,), generator=self.generator)
            for j, c in enumerate(classes.tolist()):
                pool = self.class_slices[c]
                idx[j] = pool[torch.randint(len(pool), (1,), generator=self.generator)]
        return idx

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.train_set.images[idx].to(self.device)
        y = self.train_set.labels[idx].to(self.device)
        if self.config.augment:
            x, y = augment(x, y, self.generator)
        return x, y

    # -- retrieval ------------------------------------------------------------------------
    def refresh_embeddings(self) -> None:
        """Re-embed the whole training bank with the current retriever (and re-centre it).

        Distributed: each rank embeds its share of the bank and the shares are all-gathered, so
        every rank retrieves from bit-identical embeddings. Called by all ranks together.
        """
        if self.use_retrieval:
            retriever = self.model.retriever
            part = embed_images(retriever, ddp.shard(self.bank_images), device=self.device,
                                features=True).to(self.device)
            features = ddp.all_gather_rows(part, len(self.bank_images))
            with torch.no_grad():
                retriever.set_center(features)  # the bank's mean: identical on every rank
                self.bank_emb = retriever.normalize(features)

    def guide_for(self, x: torch.Tensor, patients: torch.Tensor,
                  neighbours_of: torch.Tensor | None = None) -> Guide:
        """Guide for queries ``x`` (B,H,W) that may not retrieve exemplars of ``patients``.

        ``neighbours_of`` (B,) holds, for queries that get a neighbour guide, the training-slice
        index of the query (-1 for the others): such a query retrieves only the slices next to
        it in its own volume (never itself), as if the annotator had accepted them.
        """
        cfg = self.model.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_retriever):
            q = self.model.embed(x[:, None])
        exclude = patients[:, None].to(self.device) == self.bank_patients[None, :]
        if neighbours_of is not None:
            exclude = self._neighbour_exclusion(neighbours_of.to(self.device), exclude)
        return soft_topk_guide(q, self.bank_emb, self.bank_images, self.bank_labels,
                               cfg.num_classes, cfg.k, cfg.tau, exclude, query=x,
                               max_shift=cfg.max_shift)

    def _neighbour_exclusion(self, query_rows: torch.Tensor, exclude: torch.Tensor
                             ) -> torch.Tensor:
        """Exclusion masks that leave only a query's adjacent slices (|dz| <= NEIGHBOUR_RANGE)
        and the same slice of its patient's other frames (cine MRI: ED <-> ES).

        Rows of ``query_rows`` that are -1, or that have no such slice, keep ``exclude``.
        """
        chosen = query_rows >= 0
        rows = query_rows.clamp_min(0)
        dz = (self.bank_slices[None, :] - self.bank_slices[rows][:, None]).abs()
        same_case = self.bank_cases[None, :] == self.bank_cases[rows][:, None]
        other_frame = (~same_case & (self.bank_patients[None, :] == self.bank_patients[rows][:, None])
                       & (dz == 0))  # the same slice of the patient's other frame (ED<->ES)
        allowed = (same_case & (dz > 0) & (dz <= NEIGHBOUR_RANGE)) | other_frame
        use = chosen & allowed.any(1)
        return torch.where(use[:, None], ~allowed, exclude)

    # -- steps ----------------------------------------------------------------------------
    def supervised_step(self) -> float:
        """One Dice + CE step on the segmenter (and the retriever through the fusion weights).

        Each query draws its guide from the curriculum: none (``guide_dropout``), its own
        volume's adjacent slices (``neighbour_guides``), its own slice warped with a corrupted
        mask in the first slot (``own_guides``), or other patients' exemplars (the rest).
        """
        idx = self._sample(self.config.batch_size)
        x, y = self._batch(idx)
        # drawn for the global batch before sharding, so every rank's generator stays in step;
        # nothing is drawn without a curriculum (or retrieval), so such runs replay as before
        cfg = self.config
        guided = self.use_retrieval and (cfg.guide_dropout > 0 or cfg.neighbour_guides > 0
                                         or cfg.own_guides > 0)
        draw = torch.rand(len(idx), generator=self.generator) if guided else torch.ones(len(idx))
        keep = draw >= cfg.guide_dropout
        cut = cfg.guide_dropout + cfg.neighbour_guides
        neighbours_of = torch.where(keep & (draw < cut), idx, torch.full_like(idx, -1))
        own = (draw >= cut) & (draw < cut + cfg.own_guides)
        own_pair = corrupted_copy(x, y, self.generator) if bool(own.any()) else None
        drop_deep = None
        if self.model.readout is not None and cfg.image_dropout > 0:
            drop_deep = keep & (torch.rand(len(idx), generator=self.generator) < cfg.image_dropout)
        idx, x, y = ddp.shard(idx), ddp.shard(x), ddp.shard(y)
        keep, neighbours_of, own = ddp.shard(keep), ddp.shard(neighbours_of), ddp.shard(own)
        if drop_deep is not None:
            drop_deep = ddp.shard(drop_deep).to(self.device)
        if own_pair is not None:
            own_pair = (ddp.shard(own_pair[0]), ddp.shard(own_pair[1]))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._runner(self._supervised_loss, x, y, self.train_set.patients[idx], keep,
                            neighbours_of if cfg.neighbour_guides > 0 else None, own, own_pair,
                            drop_deep)
        self._backward(loss)
        return float(loss.detach())

    def _supervised_loss(self, x: torch.Tensor, y: torch.Tensor, patients: torch.Tensor,
                         keep: torch.Tensor, neighbours_of: torch.Tensor | None,
                         own: torch.Tensor,
                         own_pair: tuple[torch.Tensor, torch.Tensor] | None,
                         drop_deep: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(self.device, self.config.amp):
            guide = self.guide_for(x, patients, neighbours_of) if self.use_retrieval else None
            if guide is not None and own_pair is not None and bool(own.any()):
                guide = with_own_exemplar(guide, own.to(self.device), *own_pair,
                                          self.model.num_classes)
            if guide is not None and not bool(keep.all()):
                guide = drop_guides(guide, keep.to(self.device))
            if self.model.readout is None:
                return segmentation_loss(self.model(x[:, None], guide), y)
            logits, p_read = self.model.forward_readout(x[:, None], guide, drop_deep)
            loss = segmentation_loss(logits, y)
            if p_read is not None and self.config.readout_weight > 0:
                loss = loss + self.config.readout_weight * readout_loss(p_read, y, guide.present)
            return loss

    def contrastive_step(self) -> float:
        """One segmentation-aware InfoNCE step on the retriever alone."""
        cfg = self.config
        idx = self._sample(cfg.batch_size)
        cand = torch.randperm(len(self.train_set), generator=self.generator)[:cfg.contrastive_candidates]
        x, _ = self._batch(idx)
        idx, x = ddp.shard(idx), ddp.shard(x)
        relevance = mask_relevance(self.relevance_masks[idx.to(self.device)],
                                   self.relevance_masks[cand.to(self.device)])
        valid = (self.train_set.patients[idx][:, None] != self.train_set.patients[cand][None, :]).to(self.device)
        relevance = relevance.masked_fill(~valid, -1.0)
        top = relevance.topk(min(cfg.contrastive_positives, relevance.shape[1]), dim=1).indices
        positives = torch.zeros_like(valid).scatter_(1, top, True)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._runner(self._contrastive_loss, x, cand, positives, valid)
        self._backward(loss)
        return float(loss.detach())

    def _contrastive_loss(self, x: torch.Tensor, cand: torch.Tensor, positives: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.config.amp):
            q = self.model.embed(x[:, None])
            c = self.model.embed(self.bank_images[cand.to(self.device)][:, None])
            return info_nce(q.float(), c.float(), positives, valid, self.config.contrastive_tau)

    def warmup_step(self) -> float:
        """One self-supervised NT-Xent step (two augmented views per slice)."""
        idx = self._sample(max(2, self.config.batch_size))
        x1, _ = self._batch(idx)
        x2, _ = self._batch(idx)
        x1, x2 = ddp.shard(x1), ddp.shard(x2)  # negatives: the other slices of this rank's part
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._runner(self._warmup_loss, x1, x2)
        self._backward(loss)
        return float(loss.detach())

    def _warmup_loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.config.amp):
            return nt_xent(self.model.embed(x1[:, None]).float(),
                           self.model.embed(x2[:, None]).float(), self.config.contrastive_tau)

    def _backward(self, loss: torch.Tensor) -> None:
        if ddp.any_rank(not torch.isfinite(loss)):
            raise JRASError(f"Training diverged (loss {float(loss)}) at step {self.step}; "
                            "lower the learning rate")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # -- loop -----------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Run (or resume) training to ``config.steps``; returns the logged history."""
        cfg = self.config
        self._started = time.perf_counter()
        start_step = self.step
        if self.use_retrieval and not cfg.freeze_retriever and self.step == 0:
            for i in range(cfg.retriever_warmup_steps):
                loss = self.warmup_step()
                if every(i + 1, cfg.log_every):
                    [loss] = ddp.mean_over_ranks([loss])
                    self._log({"phase": "warmup", "warmup_step": i + 1, "loss_warmup": loss})
                if ddp.any_rank(self.cancel()):
                    break
        if self.bank_emb is None:
            self.refresh_embeddings()
        sup_acc, con_acc, n_acc = 0.0, 0.0, 0
        while self.step < cfg.steps:
            if ddp.any_rank(self.cancel()):
                self._log({"phase": "cancelled"})
                break
            sup_acc += self.supervised_step()
            if (self.use_retrieval and not cfg.freeze_retriever
                    and every(self.step, cfg.contrastive_every)):
                con_acc += self.contrastive_step()
            n_acc += 1
            self.scheduler.step()
            self.step += 1
            if self.use_retrieval and self.step % self.refresh_every == 0:
                self.refresh_embeddings()
            if every(self.step, cfg.log_every) or self.step == cfg.steps:
                sup, con = ddp.mean_over_ranks([sup_acc / n_acc, con_acc / n_acc])
                record = {"phase": "train", "loss": sup, "lr": self.scheduler.get_last_lr()[0]}
                if self.use_retrieval and cfg.contrastive_every and not cfg.freeze_retriever:
                    record["loss_contrastive"] = con
                done = self.step - start_step
                elapsed = time.perf_counter() - self._started
                record["eta_s"] = elapsed / max(done, 1) * (cfg.steps - self.step)
                if self.world_size > 1:
                    record["world_size"] = self.world_size
                if (self.val_set is not None and every(self.step, cfg.val_every)
                        and ddp.is_main()):
                    record["val_dice"] = self.validate()
                self._log(record)
                sup_acc, con_acc, n_acc = 0.0, 0.0, 0
            if self.run_dir is not None and every(self.step, cfg.checkpoint_every):
                self._checkpoint()
        if self.step >= cfg.steps:
            self.refresh_embeddings()
        if self.world_size > 1:
            self._check_ranks_in_sync()
        if self.run_dir is not None:
            self._checkpoint()
        return self.history

    def _checkpoint(self) -> None:
        """Rank 0 writes a checkpoint; the other ranks wait for it."""
        if ddp.is_main():
            self.save_checkpoint()
        ddp.barrier()

    def _check_ranks_in_sync(self) -> None:
        """Log a fingerprint of every rank's weights; warn if the replicas differ."""
        checksums = ddp.gather_strings(retriever_version(self.model))
        in_sync = len(set(checksums)) == 1
        self._log({"phase": "sync_check", "world_size": self.world_size,
                   "checksums": checksums, "in_sync": in_sync})
        if not in_sync:
            warnings.warn(f"The {self.world_size} training processes ended with different "
                          f"weights ({checksums}); rank 0's are saved", RuntimeWarning,
                          stacklevel=2)

    def _log(self, record: dict[str, Any]) -> None:
        record = {"step": self.step, "total": self.config.steps,
                  "time_s": round(time.perf_counter() - self._started, 3), **record}
        self.history.append(record)
        if not ddp.is_main():
            return
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress(Progress.from_record(record))

    @torch.no_grad()
    def predict_set(self, data: SliceSet, batch_size: int = 16) -> torch.Tensor:
        """Label maps for every slice of ``data`` (retrieving from the training bank)."""
        self.model.eval()
        if self.use_retrieval and self.bank_emb is None:
            self.refresh_embeddings()
        out = []
        for i in range(0, len(data), batch_size):
            x = data.images[i:i + batch_size].to(self.device)
            patients = torch.tensor([self._bank_patient(data, j)
                                     for j in range(i, min(i + batch_size, len(data)))])
            with autocast(self.device, self.config.amp):
                guide = self.guide_for(x, patients) if self.use_retrieval else None
                out.append(self.model(x[:, None], guide).argmax(1).cpu())
        return torch.cat(out)

    def _bank_patient(self, data: SliceSet, j: int) -> int:
        name = data.samples[j].patient_id
        names = self.train_set.patient_names
        return names.index(name) if name in names else -1

    def validate(self) -> float:
        """Mean foreground Dice over validation cases (slices regrouped into volumes).

        Classes absent from a case (prediction and truth) do not count; NaN when no case has any.
        """
        pred = self.predict_set(self.val_set).numpy()
        gt = self.val_set.labels.numpy()
        cases: dict[str, list[int]] = {}
        for j, s in enumerate(self.val_set.samples):
            cases.setdefault(s.case_id, []).append(j)
        scores = np.array([mean_dice(pred[ix], gt[ix], self.model.num_classes)
                           for ix in cases.values()])
        scores = scores[~np.isnan(scores)]  # cases without any foreground, predicted or true
        return float(scores.mean()) if scores.size else float("nan")

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, keep: int = 2) -> Path:
        """Write model + optimizer + RNG state for resuming; the newest ``keep`` are kept."""
        assert self.run_dir is not None
        ckpt_root = self.run_dir / "checkpoints"
        final = ckpt_root / f"step_{self.step:08d}"
        tmp = ckpt_root / f".step_{self.step:08d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(tmp, self.model)
        tensors, groups = _optimizer_tensors(self.optimizer)
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.bank_emb is not None:
            tensors["bank_embeddings"] = self.bank_emb
        save_tensors(tmp / "trainer.safetensors", tensors)
        atomic_write_json(tmp / "trainer.json", {
            "step": self.step, "param_groups": groups,
            "scheduler": self.scheduler.state_dict()["last_epoch"],
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "train_config": asdict(self.config)})
        _retire(final)
        tmp.rename(final)
        for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
            _retire(old)
        return final

    def resume(self) -> bool:
        """Load the newest complete checkpoint of ``run_dir``; False when there is none.

        Distributed: every rank loads the same checkpoint (``run_dir`` must be on a file system
        all nodes see); ranks that found different ones raise :class:`JRASError` together.
        """
        if self.run_dir is None:
            return False
        done = sorted(p for p in (self.run_dir / "checkpoints").glob("step_*")
                      if (p / "trainer.json").exists())
        found = ddp.gather_strings(done[-1].name if done else "")
        if len(set(found)) > 1:
            raise JRASError(f"The training processes see different checkpoints in {self.run_dir} "
                            f"({found}): put --out on a file system every node shares")
        if not done:
            return False
        ckpt = done[-1]
        state = json.loads((ckpt / "trainer.json").read_text())
        weights = load_tensors(ckpt / "model.safetensors")
        self.model.load_state_dict(weights)
        tensors = load_tensors(ckpt / "trainer.safetensors")
        _load_optimizer(self.optimizer, tensors, state["param_groups"])
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if "bank_embeddings" in tensors:
            self.bank_emb = tensors["bank_embeddings"].to(self.device)
        self.scheduler.last_epoch = state["scheduler"]
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        return True


def _retire(folder: Path) -> None:
    """Delete a checkpoint folder, renamed first: a crash never leaves half of it under its name."""
    if folder.exists():
        trash = folder.with_name(f".{folder.name}.deleting")
        shutil.rmtree(trash, ignore_errors=True)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"opt.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
