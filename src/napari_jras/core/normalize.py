"""Intensity normalisation per modality: every image leaves here as float32 in [0, 1].

:func:`intensity_map` measures the scaling once on the whole image and returns a function that
applies it to any part (a few slices of a volume), so that a large volume is normalised batch by
batch without a float32 copy of all of it; :func:`normalize` applies it to the whole image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import DataError

MODALITIES = ("auto", "mri", "ct", "us")
CT_WINDOW = (-600.0, 1500.0)  # lung window (level, width) in Hounsfield units
FINITE_CHECK_SLICES = 16  # slices checked for NaN/inf at a time (bounds the temporary mask)


def normalize(image: np.ndarray, modality: str = "auto",
              percentiles: tuple[float, float] = (0.5, 99.5),
              ct_window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Scale ``image`` to float32 in [0, 1] for ``modality``.

    * ``mri``: clip to the given percentiles of the whole image/volume, then min-max;
    * ``ct``: Hounsfield window (level, width) when values look like HU, else min-max;
    * ``us``: 8-bit ultrasound divided by 255 (other ranges are min-max scaled);
    * ``auto``: 8-bit data divided by 255, anything else as MRI.

    A constant image maps to zeros (no division by zero).

    Args:
        image: 2-D or 3-D array of booleans, integers or floats.
        modality: ``auto``, ``mri``, ``ct`` or ``us``.
        percentiles: (low, high) percentiles in [0, 100] clipped to with ``mri``.
        ct_window: (level, width) in Hounsfield units used with ``ct``.

    Returns:
        A new float32 array of ``image``'s shape with values in [0, 1].

    Raises:
        DataError: an unknown modality, a non-numeric image, or NaN/inf values.
    """
    return intensity_map(image, modality, percentiles, ct_window)(image)


def intensity_map(image: np.ndarray, modality: str = "auto",
                  percentiles: tuple[float, float] = (0.5, 99.5),
                  ct_window: tuple[float, float] = CT_WINDOW
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """The scaling :func:`normalize` applies to ``image``, measured once on all of it.

    The returned function maps any part of ``image`` (same data type) to float32 in [0, 1]
    exactly as ``normalize(image)`` maps that part. Raises :class:`DataError` for an unknown
    modality, a non-numeric image or NaN/inf values.

    Args:
        image: the whole image or volume the scaling is measured on.
        modality: as for :func:`normalize`.
        percentiles: as for :func:`normalize`.
        ct_window: as for :func:`normalize`.

    Returns:
        A function from any array (part of ``image``) to a new float32 array of its shape in
        [0, 1].
    """
    if modality not in MODALITIES:
        raise DataError(f"Unknown modality '{modality}'; choose one of {', '.join(MODALITIES)}")
    data = np.asarray(image)
    if data.dtype.kind not in "biuf":
        raise DataError(f"Cannot normalise an image of type {data.dtype}")
    if data.dtype.kind == "b":
        data = data.view(np.uint8)
    if data.size and not _all_finite(data):
        raise DataError("Image contains NaN or infinite values; fix or mask them first")
    is_8bit = np.asarray(image).dtype == np.uint8
    if modality == "auto":
        modality = "us" if is_8bit else "mri"
    if modality == "us" and is_8bit:
        return lambda part: np.asarray(part, dtype=np.float32) / 255.0
    if modality == "ct" and data.size and np.float32(data.min()) < -100:
        level, width = ct_window
        return _min_max(level - width / 2, level + width / 2)
    if modality == "mri" and data.size:
        # small integers are exact in float32: no need for a float32 copy of the whole volume
        exact = data.dtype.kind in "iu" and data.dtype.itemsize <= 2 or data.dtype == np.float32
        lo, hi = np.percentile(data if exact else data.astype(np.float32), percentiles)
    else:
        lo, hi = ((float(np.float32(data.min())), float(np.float32(data.max()))) if data.size
                  else (0.0, 0.0))
    if hi <= lo:
        return lambda part: np.zeros(np.shape(part), dtype=np.float32)
    return _min_max(lo, hi)


class NormalizedSlices:
    """A (Z, H, W) volume normalised on access: ``slices[zs]`` maps only the slices asked for.

    ``scale`` comes from :func:`intensity_map` of the whole volume; a 2-D image is one slice.

    Args:
        volume: (Z, H, W) volume or (H, W) image, kept as it is (not copied).
        scale: the intensity map applied to each part read.

    Raises:
        DataError: ``volume`` is neither 2-D nor 3-D.
    """

    def __init__(self, volume: np.ndarray, scale: Callable[[np.ndarray], np.ndarray]) -> None:
        volume = np.asarray(volume)
        if volume.ndim not in (2, 3):
            raise DataError(f"Expected a 2-D image or 3-D volume, got shape {volume.shape}")
        self._volume = volume[None] if volume.ndim == 2 else volume
        self._scale = scale

    @property
    def shape(self) -> tuple[int, ...]:
        """(Z, H, W)."""
        return self._volume.shape

    def __len__(self) -> int:
        """Number of slices Z."""
        return self._volume.shape[0]

    def __getitem__(self, index: object) -> np.ndarray:
        """The normalised float32 ``volume[index]`` (e.g. a slice number or a range of Z)."""
        return self._scale(self._volume[index])


def _min_max(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    """``clip((x - lo) / (hi - lo), 0, 1)`` of the float32 part, as float32 (a new array).

    NumPy's promotion rules decide the working precision as in the whole-image expression:
    float32 with Python-float bounds, float64 with NumPy float64 bounds (percentiles).
    """
    def scale(part: np.ndarray) -> np.ndarray:
        out = np.subtract(np.asarray(part, dtype=np.float32), lo)
        out /= hi - lo
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)

    return scale


def _all_finite(data: np.ndarray) -> bool:
    """True when float ``data`` holds no NaN/inf (checked in slabs: small temporary masks)."""
    if data.dtype.kind != "f":
        return True
    if data.ndim < 3:
        return bool(np.isfinite(data).all())
    return all(np.isfinite(data[z:z + FINITE_CHECK_SLICES]).all()
               for z in range(0, data.shape[0], FINITE_CHECK_SLICES))
