"""From cases to 2-D training/inference samples: slicing, resizing and patient-level splits."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .io import Case, load_case
from .normalize import normalize


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
    """Nearest-neighbour resize of (N, H, W) label maps to (N, *size)."""
    labels = np.asarray(labels)
    if labels.shape[-2:] == tuple(size):
        return labels
    t = torch.from_numpy(np.ascontiguousarray(labels.astype(np.uint8)))[:, None]
    out = F.interpolate(t, size=tuple(size), mode="nearest-exact")
    return out[:, 0].numpy().astype(labels.dtype, copy=False)


def load_slices(cases: Sequence[Case], size: int | None = None, modality: str = "auto",
                skip_empty: bool = False,
                progress: Callable[[int, int], None] | None = None) -> list[SliceSample]:
    """Read ``cases`` and cut them into normalised 2-D slices (resized to ``size`` if given).

    ``skip_empty`` drops slices whose label has no foreground.
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
            progress(i + 1, len(cases))
    if not samples:
        raise DataError("All slices were empty (no foreground in any label)")
    return samples


def patient_split(cases: Sequence[Case], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Split cases into (train, val) so that no patient appears on both sides."""
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


def num_classes_of(samples: Iterable[SliceSample]) -> int:
    """Number of classes (max label value + 1, at least 2) over labelled samples."""
    top = 0
    for s in samples:
        if s.label is not None and s.label.size:
            top = max(top, int(s.label.max()))
    return max(2, top + 1)
