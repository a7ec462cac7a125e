"""From cases to 2-D training/inference samples: slicing, resizing and patient-level splits."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .io import Case, load_case
from .normalize import normalize
from .progress import Progress, ProgressFn


@dataclass
class SliceSample:
    """One 2-D slice: normalised image (H, W) float32, label (H, W) uint8 or None, provenance."""

    image: np.ndarray
    label: np.ndarray | None
    case_id: str
    patient_id: str
    slice_index: int
    source: str = ""


def as_slices(volume: np.ndarray) -> np.ndarray:
    """View a 2-D image as one slice (1, H, W); a 3-D volume is already (Z, H, W)."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        return volume[None]
    if volume.ndim == 3:
        return volume
    raise DataError(f"Expected a 2-D image or 3-D volume, got shape {volume.shape}")


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, H, W) float images to (N, *size)."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[-2:] == tuple(size):
        return images
    t = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0].numpy()


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (N, H, W) label maps to (N, *size), values kept exactly.

    Labels that fit in uint8 are resized as uint8; larger values go through float64 (exact for
    integers below 2^53): a uint8 cast turned class 300 into class 44.
    """
    labels = np.asarray(labels)
    if labels.shape[-2:] == tuple(size):
        return labels
    fits_uint8 = not labels.size or (labels.min() >= 0 and labels.max() <= 255)
    work = labels.astype(np.uint8 if fits_uint8 else np.float64)
    t = torch.from_numpy(np.ascontiguousarray(work))[:, None]
    out = F.interpolate(t, size=tuple(size), mode="nearest-exact")
    return out[:, 0].numpy().astype(labels.dtype, copy=False)


def load_slices(cases: Sequence[Case], size: int | None = None, modality: str = "auto",
                skip_empty: bool = False,
                progress: ProgressFn | None = None) -> list[SliceSample]:
    """Read ``cases`` and cut them into normalised 2-D slices (resized to ``size`` if given).

    ``skip_empty`` drops slices whose label has no foreground; ``progress`` receives a
    ``load`` event per case read.

    Args:
        cases: the cases to read, in order.
        size: side of the square the slices are resized to (bilinear images, nearest labels);
            None keeps each case's own size.
        modality: intensity scaling of :func:`~.normalize.normalize` (``auto``, ``mri``,
            ``ct`` or ``us``), measured per case.
        skip_empty: drop labelled slices without foreground (unlabelled slices are kept).
        progress: receives a ``load`` event per case.

    Returns:
        One :class:`SliceSample` per kept slice, case by case, Z in order; images float32 in
        [0, 1].

    Raises:
        DataError: no cases, a case that cannot be read (:func:`~.io.load_case`), or no slice
            left.
    """
    if not cases:
        raise DataError("No cases to load")
    samples: list[SliceSample] = []
    for i, case in enumerate(cases):
        image, label = load_case(case)
        img = as_slices(normalize(image.data, modality))
        lbl = as_slices(label) if label is not None else None
        if size is not None:
            img = resize_images(img, (size, size))
            lbl = resize_labels(lbl, (size, size)) if lbl is not None else None
        for z in range(img.shape[0]):
            if skip_empty and lbl is not None and not lbl[z].any():
                continue
            samples.append(SliceSample(img[z], None if lbl is None else lbl[z], case.case_id,
                                       case.patient_id, z, str(case.image_path)))
        if progress is not None:
            progress(Progress("load", i + 1, len(cases), detail=case.case_id))
    if not samples:
        raise DataError("All slices were empty (no foreground in any label)")
    return samples


def patient_split(cases: Sequence[Case], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Split cases into (train, val) so that no patient appears on both sides.

    Args:
        cases: the cases to split.
        val_fraction: share of the patients (not cases) that go to validation, in (0, 1);
            rounded, at least one patient on each side.
        seed: seed of the patient shuffle (the same seed gives the same split).

    Returns:
        The training and validation cases, each in the order of ``cases``.

    Raises:
        DataError: ``val_fraction`` outside (0, 1), or fewer than two patients.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    patients = sorted({c.patient_id for c in cases})
    if len(patients) < 2:
        raise DataError("Need cases from at least two patients for a patient-level split")
    rng = random.Random(seed)
    rng.shuffle(patients)
    n_val = min(len(patients) - 1, max(1, round(len(patients) * val_fraction)))
    val_patients = set(patients[:n_val])
    train = [c for c in cases if c.patient_id not in val_patients]
    val = [c for c in cases if c.patient_id in val_patients]
    return train, val


MAX_INFERRED_CLASSES = 128


def num_classes_of(samples: Iterable[SliceSample], declared: int | None = None) -> int:
    """Number of classes (background included) of labelled training samples, checked.

    With ``declared`` (``--num-classes`` / ``--class-names``) every label value must be below
    it. Without it the values must be the consecutive classes 0..C-1, each present, with C at
    most :data:`MAX_INFERRED_CLASSES`: values like {0, 7, 200} are no class indices (a 0/255
    mask read as classes made a 256-class model). Raises :class:`DataError` when no label holds
    any foreground: a model would learn a class it never saw.

    Args:
        samples: the training slices; unlabelled ones are skipped.
        declared: the number of classes the user declared, or None to infer it.

    Returns:
        ``declared`` when given, else the largest label value + 1.

    Raises:
        DataError: no foreground in any label, a label value >= ``declared``, or (inferred)
            values that are not 0..C-1 without gaps or more than ``MAX_INFERRED_CLASSES``.
    """
    values: set[int] = set()
    for s in samples:
        if s.label is not None and s.label.size:
            values.update(int(v) for v in np.unique(s.label))
    if not values - {0}:
        raise DataError("No training label has any foreground (every label value is 0): there "
                        "is nothing to learn; check that the label files hold the masks")
    top = max(values)
    if declared is not None:
        if top >= declared:
            raise DataError(f"The labels hold class {top} but --num-classes/--class-names "
                            f"declare {declared} classes (0..{declared - 1})")
        return declared
    shown = ", ".join(str(v) for v in sorted(values)[:8]) + (", ..." if len(values) > 8 else "")
    if len(values) != top + 1:
        missing = min(set(range(top + 1)) - values)
        raise DataError(f"The label values {{{shown}}} are not the consecutive classes 0..{top} "
                        f"(e.g. {missing} is absent): relabel them as 0, 1, 2, ..., or give "
                        "--num-classes / --class-names when some classes are absent from this "
                        "data")
    if top + 1 > MAX_INFERRED_CLASSES:
        raise DataError(f"The labels hold {top + 1} different values ({{{shown}}}), more than "
                        f"{MAX_INFERRED_CLASSES} classes: are they intensities or instance ids? "
                        "Give --num-classes if you mean that many classes")
    return top + 1
