"""Intensity normalisation per modality: every image leaves here as float32 in [0, 1]."""

from __future__ import annotations

import numpy as np

from .errors import DataError

MODALITIES = ("auto", "mri", "ct", "us")
CT_WINDOW = (-600.0, 1500.0)  # lung window (level, width) in Hounsfield units


def normalize(image: np.ndarray, modality: str = "auto",
              percentiles: tuple[float, float] = (0.5, 99.5),
              ct_window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Scale ``image`` to float32 in [0, 1] for ``modality``.

    * ``mri``: clip to the given percentiles of the whole image/volume, then min-max;
    * ``ct``: Hounsfield window (level, width) when values look like HU, else min-max;
    * ``us``: 8-bit ultrasound divided by 255 (other ranges are min-max scaled);
    * ``auto``: 8-bit data divided by 255, anything else as MRI.

    A constant image maps to zeros (no division by zero).
    """
    if modality not in MODALITIES:
        raise DataError(f"Unknown modality '{modality}'; choose one of {', '.join(MODALITIES)}")
    data = np.asarray(image)
    if data.dtype.kind not in "biuf":
        raise DataError(f"Cannot normalise an image of type {data.dtype}")
    data = data.astype(np.float32, copy=False)
    if data.size and not np.isfinite(data).all():
        raise DataError("Image contains NaN or infinite values; fix or mask them first")
    is_8bit = np.asarray(image).dtype == np.uint8
    if modality == "auto":
        modality = "us" if is_8bit else "mri"
    if modality == "us" and is_8bit:
        return data / 255.0
    if modality == "ct" and data.size and data.min() < -100:
        level, width = ct_window
        lo, hi = level - width / 2, level + width / 2
        return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if modality == "mri" and data.size:
        lo, hi = np.percentile(data, percentiles)
    else:
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(data, dtype=np.float32)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
