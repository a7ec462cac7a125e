"""What the joint trainer trains on: the slice set, class-aware batches and the guide curriculum.

* :class:`SliceSet`: the training slices stacked as tensors, with patient, case and slice ids.
* :class:`SliceSampler`: draws batches (weighted, or uniform with a class-aware share) and
  augments them, from the trainer's seeded generator.
* The guide curriculum (:func:`plan_guides`): which queries of a supervised batch train with no
  exemplar, with their own volume's neighbours (:func:`neighbour_exclusion`), with their own slice
  corrupted (:func:`corrupted_copy`, :func:`with_own_exemplar`) or with other patients' exemplars.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from .augment import augment, random_affine
from .data import SliceSample
from .errors import DataError
from .fusion import Guide, make_guide, shift_exemplars

NEIGHBOUR_RANGE = 2  # neighbour guides: slices at most this far from the query, same volume


class SliceSet:
    """Slices stacked as tensors at the model size, with patient ids for leakage control.

    Args:
        samples: labelled slices, all of one size.
        num_classes: classes including background; every label value must be below it.

    Attributes:
        images: ``(N, H, W)`` float32.
        labels: ``(N, H, W)`` int64 class indices.
        patients: ``(N,)`` index of each slice's patient in ``patient_names`` (sorted).
        cases: ``(N,)`` index of each slice's case among the sorted case ids.
        slice_indices: ``(N,)`` each slice's Z index in its volume.

    Raises:
        DataError: no slices, slices of different sizes, a slice without label, or a label
            value >= ``num_classes``.
    """

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


class SliceSampler:
    """Draws training batches of a :class:`SliceSet` from one seeded generator.

    Args:
        data: the training slices.
        generator: the trainer's generator (every draw comes from it, in a fixed order).
        class_sampling: share of each uniform batch drawn from slices that contain a foreground
            class picked at random, so that a rare class is in (nearly) every batch.
        augment: whether :meth:`batch` augments the slices.
        device: where :meth:`batch` puts the images and labels.
        weights: one sampling weight per slice (e.g. fresh corrections oversampled); replaces
            the uniform and class-aware draw.
    """

    def __init__(self, data: SliceSet, generator: torch.Generator, class_sampling: float,
                 augment: bool, device: torch.device,
                 weights: Sequence[float] | None = None) -> None:
        self.data = data
        self.generator = generator
        self.class_sampling = class_sampling
        self.augment = augment
        self.device = device
        self.weights = None
        if weights is not None:
            if len(weights) != len(data):
                raise DataError("sample_weights needs one weight per training slice")
            self.weights = torch.tensor(weights, dtype=torch.float64)
        present = torch.stack([(data.labels == c).flatten(1).any(1)
                               for c in range(data.num_classes)], 1)  # N,C
        self.class_slices = [torch.nonzero(present[:, c]).flatten()
                             for c in range(1, data.num_classes) if bool(present[:, c].any())]

    def sample(self, n: int) -> torch.Tensor:
        """``n`` slice indices: weighted, or uniform with a class-aware share.

        With ``class_sampling`` > 0, that share of the batch comes from slices containing a
        foreground class drawn uniformly, so a rare class is in (nearly) every batch.
        """
        if self.weights is not None:
            return torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        idx = torch.randint(len(self.data), (n,), generator=self.generator)
        n_class = round(n * self.class_sampling) if self.class_slices else 0
        if n_class:
            classes = torch.randint(len(self.class_slices), (n_class,), generator=self.generator)
            for j, c in enumerate(classes.tolist()):
                pool = self.class_slices[c]
                idx[j] = pool[torch.randint(len(pool), (1,), generator=self.generator)]
        return idx

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B,H,W) and labels (B,H,W) of slices ``idx`` on the device, augmented if set."""
        x = self.data.images[idx].to(self.device)
        y = self.data.labels[idx].to(self.device)
        if self.augment:
            x, y = augment(x, y, self.generator)
        return x, y


class Curriculum(Protocol):
    """The guide curriculum's fractions (as in a resolved :class:`~.train.TrainConfig`)."""

    guide_dropout: float
    neighbour_guides: float
    own_guides: float
    image_dropout: float


@dataclass
class GuidePlan:
    """Which guide each query of a supervised batch trains with.

    ``keep`` (B,) False: no guide at all (guide dropout); ``neighbours_of`` (B,) the query's
    training-slice index where it retrieves only its own volume's neighbours, else -1; ``own``
    (B,) the first exemplar slot is replaced by ``own_pair`` (the query's corrupted copy);
    ``drop_deep`` (B,) the readout step drops the query's deep image features (or None).
    """

    keep: torch.Tensor
    neighbours_of: torch.Tensor
    own: torch.Tensor
    own_pair: tuple[torch.Tensor, torch.Tensor] | None
    drop_deep: torch.Tensor | None


def plan_guides(idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, curriculum: Curriculum,
                generator: torch.Generator, retrieval: bool, readout: bool) -> GuidePlan:
    """Draw the guide curriculum of a supervised batch (for the global batch, before sharding).

    Args:
        idx: (B,) training-slice indices of the batch.
        x: (B,H,W) the batch's (augmented) images.
        y: (B,H,W) their labels.
        curriculum: the fractions (``guide_dropout``, ``neighbour_guides``, ``own_guides``,
            ``image_dropout``).
        generator: the trainer's generator; nothing is drawn without retrieval or without a
            curriculum, so such runs replay as before it existed.
        retrieval: whether the model retrieves exemplars.
        readout: whether the model has the readout fusion (``image_dropout`` applies).

    Returns:
        The :class:`GuidePlan` of the batch.
    """
    c = curriculum
    guided = retrieval and (c.guide_dropout > 0 or c.neighbour_guides > 0 or c.own_guides > 0)
    draw = torch.rand(len(idx), generator=generator) if guided else torch.ones(len(idx))
    keep = draw >= c.guide_dropout
    cut = c.guide_dropout + c.neighbour_guides
    neighbours_of = torch.where(keep & (draw < cut), idx, torch.full_like(idx, -1))
    own = (draw >= cut) & (draw < cut + c.own_guides)
    own_pair = corrupted_copy(x, y, generator) if bool(own.any()) else None
    drop_deep = None
    if readout and c.image_dropout > 0:
        drop_deep = keep & (torch.rand(len(idx), generator=generator) < c.image_dropout)
    return GuidePlan(keep, neighbours_of, own, own_pair, drop_deep)


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

    Args:
        x: ``(B, H, W)`` images.
        y: ``(B, H, W)`` their labels.
        generator: the trainer's generator (every random draw).

    Returns:
        The images, randomly rotated (up to 20 degrees), scaled (0.85-1.15) and shifted (up
        to 6 % of the side per axis), and their masks under the same warp, then shifted by
        up to 3 pixels per axis; with probability 1/4 a mask also loses one foreground class
        drawn at random (which may be absent from it).
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
    by ``images``/``masks`` (B,H,W), at the weight of the best retrieved exemplar.

    Args:
        guide: the batch's retrieved guide (K >= 1 slots).
        own: ``(B,)`` bool, the queries that get their own corrupted slice.
        images: ``(B, H, W)`` the replacement exemplar images (:func:`corrupted_copy`).
        masks: ``(B, H, W)`` their label maps.
        num_classes: classes including background.

    Returns:
        A new guide, fused again from the changed slots (``present`` kept).
    """
    ex_images, ex_masks = guide.exemplars.clone(), guide.exemplar_masks.clone()
    ex_images[own, 0] = images[own].to(ex_images.dtype)
    ex_masks[own, 0] = masks[own].to(ex_masks.dtype)
    fused = make_guide(ex_images, ex_masks, guide.weights, guide.scores, guide.indices,
                       num_classes)
    return replace(fused, present=guide.present)


def neighbour_exclusion(query_rows: torch.Tensor, exclude: torch.Tensor, slices: torch.Tensor,
                        cases: torch.Tensor, patients: torch.Tensor) -> torch.Tensor:
    """Exclusion masks that leave only a query's adjacent slices (|dz| <= NEIGHBOUR_RANGE)
    and the same slice of its patient's other frames (cine MRI: ED <-> ES).

    Args:
        query_rows: (B,) the bank row of each query that gets a neighbour guide, -1 for the
            others.
        exclude: (B, N) the queries' exclusion masks without neighbour guides.
        slices: (N,) slice index of every bank row.
        cases: (N,) case of every bank row.
        patients: (N,) patient of every bank row.

    Returns:
        (B, N) exclusion masks; rows of ``query_rows`` that are -1, or that have no such slice,
        keep ``exclude``.
    """
    chosen = query_rows >= 0
    rows = query_rows.clamp_min(0)
    dz = (slices[None, :] - slices[rows][:, None]).abs()
    same_case = cases[None, :] == cases[rows][:, None]
    other_frame = (~same_case & (patients[None, :] == patients[rows][:, None])
                   & (dz == 0))  # the same slice of the patient's other frame (ED<->ES)
    allowed = (same_case & (dz > 0) & (dz <= NEIGHBOUR_RANGE)) | other_frame
    use = chosen & allowed.any(1)
    return torch.where(use[:, None], ~allowed, exclude)
