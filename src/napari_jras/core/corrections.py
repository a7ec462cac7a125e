"""Accepted corrections as bank exemplars: which slices, their stored pixels and provenance.

Shared by :meth:`napari_jras.core.workspace.Workspace.accept` (a model's working bank) and
:mod:`napari_jras.core.modality_bank` (a bank without a model), so both record an accepted
slice the same way: case, slice, patient, source, author, time, origin ``correction``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .bank import ExemplarBank
from .data import as_slices, resize_images, resize_labels
from .errors import DataError
from .io import check_image, check_label, patient_of, split_extension
from .normalize import NormalizedSlices, intensity_map
from .workspace_records import CORRECTION


@dataclass(frozen=True)
class Corrections:
    """Accepted slices ready for a bank: ``images`` (N, S, S) float32 exactly as the bank stores
    them, ``masks`` (N, S, S) class indices, one ``provenance`` dict per slice."""

    case_id: str
    slices: list[int]
    images: np.ndarray
    masks: np.ndarray
    provenance: list[dict[str, Any]]


def now() -> str:
    """The current UTC time, to the second, as ISO 8601 (the ``created`` of a record)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def as_stored(images: np.ndarray, size: int) -> np.ndarray:
    """Normalised (N,H,W) images exactly as a bank of side ``size`` returns them (8-bit steps)."""
    resized = np.clip(resize_images(images, (size, size)), 0.0, 1.0)
    return np.round(resized * 255).astype(np.float32) / 255


def case_of(source: str) -> str:
    """Case id of an image file name: ``p1_frame01_image.nii.gz`` -> ``p1_frame01``."""
    stem = split_extension(Path(source).name)[0] if source else ""
    return stem.removesuffix("_image") or "unnamed"


def slices_to_store(mask: np.ndarray, slices: Sequence[int] | None, ndim: int) -> list[int]:
    """The slices to store: ``slices`` checked, or by default every slice with foreground (the
    one slice of a 2-D image).

    Args:
        mask: the labels as a (Z, H, W) stack (one slice for a 2-D image).
        slices: the Z indices wanted (duplicates dropped), or None for the default.
        ndim: the image's number of dimensions (2 or 3).

    Returns:
        The slice indices, sorted.

    Raises:
        DataError: an empty 3-D mask without ``slices``, no slices given, or a slice out of range.
    """
    if slices is None:
        zs = [0] if ndim == 2 else [z for z in range(mask.shape[0]) if mask[z].any()]
        if not zs:
            raise DataError("The corrected mask is empty: paint the structures first, or name "
                            "the slices to store")
        return zs
    zs = sorted({int(z) for z in slices})
    if not zs:
        raise DataError("No slices were given to store")
    bad = [z for z in zs if not 0 <= z < mask.shape[0]]
    if bad:
        raise DataError(f"Slice {bad[0]} is out of range (the image has {mask.shape[0]} slices)")
    return zs


def prepare(image: np.ndarray, labels: np.ndarray, num_classes: int, size: int, modality: str,
            slices: Sequence[int] | None = None, source: str = "", case_id: str = "",
            author: str = "", patient_id: str | None = None,
            extra: Mapping[str, Any] | None = None) -> Corrections:
    """Check a corrected image and cut out the slices to store at the bank's side ``size``.

    Args:
        image: the full 2-D or 3-D (Z-first) image.
        labels: its corrected labels, same shape, values below ``num_classes``.
        num_classes: the bank's classes (background included).
        size: the bank's side.
        modality: the image's intensity normalisation (see :mod:`.normalize`).
        slices: the Z slices to store (default: see :func:`slices_to_store`).
        source: the image file's name, recorded as provenance.
        case_id: default: the source's file stem (without ``_image``).
        author: who corrected it.
        patient_id: default: the case id's patient part.
        extra: more provenance fields (e.g. the model version).

    Raises:
        DataError: a bad image, labels of another shape or with unknown classes, an empty 3-D
            mask without ``slices`` (a 2-D image's one slice is stored even when empty), or a
            slice out of range.
    """
    data = check_image(image)
    labels = np.asarray(labels)
    labels = labels.astype(np.uint8) if labels.dtype == bool else labels
    mask = as_slices(check_label(labels, data.shape, num_classes))
    volume = NormalizedSlices(data, intensity_map(data, modality))
    zs = slices_to_store(mask, slices, data.ndim)
    case = case_id or case_of(source)
    created = now()
    provenance = [{"case_id": case, "patient_id": patient_id or patient_of(case),
                   "slice_index": z, "source": source, "origin": CORRECTION,
                   "author": author or None, "created": created, **(extra or {})} for z in zs]
    return Corrections(case, zs, as_stored(volume[zs], size),
                       resize_labels(mask[zs], (size, size)), provenance)


def store(bank: ExemplarBank, corrections: Corrections, embeddings: np.ndarray | None,
          retriever_version: str | None) -> list[int]:
    """Add the corrections to ``bank``; an accepted (case, slice) accepted again is replaced.

    The earlier corrections of the same (case, slice) are removed only after the new ones were
    added, so a refused add leaves the bank unchanged.

    Args:
        bank: an open, writable bank of the corrections' side and classes.
        corrections: from :func:`prepare`.
        embeddings: one per slice, or None to store the slices without embeddings.
        retriever_version: the version that made ``embeddings`` (None without them).

    Returns:
        The new exemplar ids.
    """
    replaced = [r["id"] for r in bank.records()
                if r["origin"] == CORRECTION and r["case_id"] == corrections.case_id
                and r["slice_index"] in corrections.slices]
    ids = bank.add(corrections.images, corrections.masks, corrections.provenance,
                   embeddings=embeddings, retriever_version=retriever_version)
    if replaced:
        bank.remove(replaced)
    return ids
