"""napari writer: save a labels layer as TIFF (``.tif``/``.tiff``) or NIfTI (``.nii``/``.nii.gz``).

The layer's ``scale`` is written as the voxel spacing (Z, Y, X) when it is not all ones, so a
volume opened from NIfTI keeps its spacing when saved again. Labels are stored with the smallest
unsigned integer type that holds them (uint8 for up to 255 classes). Writing is atomic (see
:func:`napari_jras.core.io.write_volume`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .core.errors import DataError
from .core.io import split_extension, write_volume

logger = logging.getLogger(__name__)

WRITABLE_EXTENSIONS = (".tif", ".tiff", ".nii", ".nii.gz")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: write ``data`` (a labels layer) to ``path``; return [path]."""
    if meta.get("multiscale") and isinstance(data, (list, tuple)):
        data = data[0]  # full resolution level
    labels = compact_labels(np.asarray(data), source=str(meta.get("name") or "labels layer"))
    _, ext = split_extension(path)
    if ext not in WRITABLE_EXTENSIONS:
        if ext:
            raise DataError(f"Cannot save labels as '{ext}': use {', '.join(WRITABLE_EXTENSIONS)}")
        path = f"{path}.tif"
        ext = ".tif"
    if labels.ndim not in (2, 3):
        raise DataError(
            f"Can only save 2-D or 3-D labels, this layer has shape {labels.shape}: "
            "slice out one time point or channel first"
        )
    spacing = _spacing(meta.get("scale"), labels.ndim)
    if spacing is not None and ext in (".tif", ".tiff") and labels.dtype.itemsize > 2:
        # ImageJ TIFFs (the only TIFF flavour with a Z spacing) hold at most 16-bit integers
        logger.warning("%s: more than 65535 labels, the spacing is not stored in the TIFF", path)
        spacing = None
    return [str(write_volume(path, labels, spacing))]


def compact_labels(labels: np.ndarray, source: str = "labels") -> np.ndarray:
    """Labels as the smallest unsigned integer type that holds them (DataError if not labels)."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "b":
        return labels.astype(np.uint8)
    if labels.dtype.kind not in "iuf":
        raise DataError(f"{source} has unsupported data type {labels.dtype}")
    if labels.dtype.kind == "f" and (
            not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels))):
        raise DataError(f"{source} has non-integer values; labels must be 0, 1, 2, ...")
    if labels.size == 0:
        return labels.astype(np.uint8)
    low, high = labels.min(), labels.max()
    if low < 0:
        raise DataError(f"{source} has negative values (min {low}); labels must be >= 0")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return labels.astype(dtype, copy=False)
    return labels.astype(np.uint64, copy=False)


def _spacing(scale: Any, ndim: int) -> tuple[float, ...] | None:
    if scale is None:
        return None
    scale = tuple(float(s) for s in np.asarray(scale, dtype=float).ravel())
    if len(scale) != ndim or np.allclose(scale, 1.0):
        return None  # napari's default scale: spacing unknown
    if not all(np.isfinite(s) and s > 0 for s in scale):
        return None
    return scale
