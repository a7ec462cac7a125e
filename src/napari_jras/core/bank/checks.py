"""What goes into a bank and what comes out of it: provenance, pixels, embeddings, versions.

Everything here is a pure check (no database, no files): bad input raises :class:`BankError`
with a message saying what to fix, and stored values that are not what the bank writes are
reported as damage.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..data import resize_images, resize_labels
from ..errors import BankError
from ..io import patient_of
from .schema import id_list

ORIGINS = ("training", "correction", "import")
PROVENANCE_KEYS = ("case_id", "patient_id", "slice_index", "source", "origin", "author", "created")
RECORD_COLUMNS = "id, case_id, patient_id, slice_index, source, origin, author, created, extra"
RANGE_TOLERANCE = 0.01  # images may stray this far outside [0, 1] (rounding); they are clipped
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_settings(size: int, num_classes: int, embed_dim: int,
                   class_names: Sequence[str] | None) -> list[str]:
    """Validate the settings of a new bank.

    Args:
        size: the side length of stored images and masks (a whole number >= 8).
        num_classes: the number of classes, background included (2..256).
        embed_dim: the embedding length (>= 1).
        class_names: ``num_classes`` non-empty names, or None for default names.

    Returns:
        The class names (``background``, ``class 1``, ... when ``class_names`` is None).
    """
    for name, value, low in (("size", size, 8), ("num_classes", num_classes, 2),
                             ("embed_dim", embed_dim, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise BankError(f"{name} must be a whole number >= {low}, got {value!r}")
    if num_classes > 256:
        raise BankError(f"A bank holds at most 256 classes, got {num_classes}")
    if class_names is None:
        class_names = ["background"] + [f"class {c}" for c in range(1, num_classes)]
    if len(class_names) != num_classes or not all(
            isinstance(n, str) and n for n in class_names):
        raise BankError(f"class_names must be {num_classes} non-empty names, got {class_names!r}")
    return list(class_names)


def check_provenance(provenance: Sequence[Mapping], n: int) -> list[tuple]:
    """Validate provenance dicts and return database rows (without embedding columns).

    Args:
        provenance: one dict per exemplar; ``case_id`` and ``origin`` are required, ``id`` is
            refused (the bank sets it), keys beyond :data:`PROVENANCE_KEYS` become extra fields.
        n: the number of exemplars.

    Returns:
        ``(case_id, patient_id, slice_index, source, origin, author, created, extra_json)`` rows.
    """
    if isinstance(provenance, Mapping) or len(provenance) != n:
        raise BankError(f"Expected a list of {n} provenance dicts (one per exemplar)")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for i, p in enumerate(provenance):
        where = f"provenance[{i}]"
        if not isinstance(p, Mapping):
            raise BankError(f"{where} must be a dict, got {type(p).__name__}")
        if not p.get("case_id"):
            raise BankError(f"{where} needs a 'case_id'")
        if p.get("origin") not in ORIGINS:
            raise BankError(f"{where}: 'origin' must be one of {', '.join(ORIGINS)}, "
                            f"got {p.get('origin')!r}")
        try:
            slice_index = operator.index(p.get("slice_index", 0))
        except TypeError:
            slice_index = -1
        if slice_index < 0:
            raise BankError(f"{where}: 'slice_index' must be a whole number >= 0")
        extra = {k: v for k, v in p.items() if k not in PROVENANCE_KEYS}
        if "id" in extra:
            raise BankError(f"{where}: 'id' is set by the bank, do not pass it")
        try:
            extra_json = json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise BankError(f"{where}: extra fields must be plain values (text, numbers, lists): "
                            f"{exc}") from exc
        author = p.get("author")
        case_id = str(p["case_id"])
        rows.append((case_id, str(p.get("patient_id") or patient_of(case_id)), slice_index,
                     str(p.get("source") or ""), p["origin"], None if author is None else str(author),
                     str(p.get("created") or now), extra_json))
    return rows


def record(row: Sequence) -> dict:
    """Record dict (id, provenance and extra fields) of a row selected with RECORD_COLUMNS."""
    keys = ("id",) + PROVENANCE_KEYS
    try:
        extra = json.loads(row[len(keys)])
        if not isinstance(extra, dict):
            raise TypeError("not a JSON object")
    except (TypeError, ValueError) as exc:
        raise BankError(f"The provenance of exemplar {row[0]} is damaged ({exc})") from exc
    return {**dict(zip(keys, row[:len(keys)], strict=True)), **extra}


def check_pixels(images: np.ndarray, masks: np.ndarray, size: int,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate images and masks for a bank and return them as stored.

    Args:
        images: (N, H, W) numbers in [0, 1] (within :data:`RANGE_TOLERANCE`).
        masks: (N, H, W) whole-number class indices below ``num_classes`` (or booleans).
        size: the bank's side length.
        num_classes: the bank's number of classes.

    Returns:
        images (0..255) and masks, resized to uint8 (N, size, size) stacks.
    """
    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim != 3:
        raise BankError(f"images must be a stack (N, H, W), got shape {images.shape}; "
                        "for a single slice pass image[None]")
    if masks.shape != images.shape:
        raise BankError(f"masks shape {masks.shape} does not match images shape {images.shape}")
    if images.size == 0 and images.shape[0]:
        raise BankError(f"images are empty (shape {images.shape})")
    for name, arr in (("images", images), ("masks", masks)):
        if arr.dtype.kind not in "biuf":
            raise BankError(f"{name} must be numbers, got data type {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BankError(f"{name} contain NaN or infinite values")
    if images.size and (images.min() < -RANGE_TOLERANCE or images.max() > 1 + RANGE_TOLERANCE):
        raise BankError(f"images must be scaled to [0, 1], got values from {images.min():g} to "
                        f"{images.max():g}: normalise them first")
    if masks.dtype.kind == "b":
        masks = masks.astype(np.uint8)
    if masks.dtype.kind == "f" and not np.array_equal(masks, np.round(masks)):
        raise BankError("masks must hold whole-number class indices")
    if masks.size and (masks.min() < 0 or masks.max() >= num_classes):
        raise BankError(
            f"masks hold class value {masks.min() if masks.min() < 0 else masks.max():g} but "
            f"this bank has {num_classes} classes (0..{num_classes - 1})")
    if not images.shape[0]:
        empty = np.empty((0, size, size), dtype=np.uint8)
        return empty, empty
    side = (size, size)
    images = np.round(np.clip(resize_images(images, side), 0.0, 1.0) * 255).astype(np.uint8)
    return images, resize_labels(masks.astype(np.uint8), side)


def check_embeddings(embeddings: np.ndarray, n: int, embed_dim: int) -> np.ndarray:
    """``embeddings`` as contiguous float32 (n, embed_dim); refuses other shapes and non-finite
    values.

    Args:
        embeddings: the new embeddings, one row per exemplar.
        n: the number of exemplars.
        embed_dim: the bank's embedding length.

    Raises:
        BankError: a shape other than (n, embed_dim), non-numbers, NaN or infinity.
    """
    vecs = np.asarray(embeddings)
    if vecs.shape != (n, embed_dim):
        raise BankError(f"Expected embeddings of shape ({n}, {embed_dim}), got {vecs.shape}")
    if vecs.dtype.kind not in "biuf" or not np.isfinite(vecs).all():
        raise BankError("Embeddings must be finite numbers (found NaN, infinity or non-numbers)")
    return np.ascontiguousarray(vecs, dtype=np.float32)


def embedding_blobs(embeddings: np.ndarray | None, retriever_version: str | None, n: int,
                    embed_dim: int) -> list[bytes | None]:
    """The database blobs of the embeddings of ``n`` new exemplars.

    Args:
        embeddings: (n, embed_dim) finite numbers, or None (exemplars without embeddings).
        retriever_version: the version that made ``embeddings`` (required with them only).
        n: the number of new exemplars.
        embed_dim: the bank's embedding length.

    Returns:
        One float32 blob per exemplar, or ``n`` Nones without embeddings.
    """
    if embeddings is None:
        if retriever_version is not None:
            raise BankError("retriever_version was given without embeddings")
        return [None] * n
    blobs = [v.tobytes() for v in check_embeddings(embeddings, n, embed_dim)]
    if not isinstance(retriever_version, str) or not retriever_version:
        raise BankError("Embeddings need the retriever_version that made them")
    check_version_name(retriever_version)
    return blobs


def check_replacement(ids: Iterable[int], embeddings: np.ndarray, retriever_version: str,
                      embed_dim: int) -> tuple[list[int], np.ndarray]:
    """Validate new embeddings for every exemplar (``ExemplarBank.set_embeddings``).

    Args:
        ids: the exemplar ids, each once, in the order of ``embeddings``.
        embeddings: (len(ids), embed_dim) finite numbers.
        retriever_version: the version that made them (a plain token).
        embed_dim: the bank's embedding length.

    Returns:
        ``ids`` as a list and the embeddings as contiguous float32 (len(ids), embed_dim).
    """
    if not isinstance(retriever_version, str) or not retriever_version:
        raise BankError("set_embeddings needs the retriever_version that made the embeddings")
    check_version_name(retriever_version)
    ids = id_list(ids)
    vecs = check_embeddings(embeddings, len(ids), embed_dim)
    if len(set(ids)) != len(ids):
        raise BankError("set_embeddings got the same exemplar id twice")
    return ids, vecs


def check_version_name(version: str) -> None:
    """Refuse retriever versions that are not plain tokens (they name files in workspaces)."""
    if not VERSION_PATTERN.match(version):
        raise BankError(f"Invalid retriever version {version!r}: use letters, digits, '.', '_' "
                        "and '-' only (at most 64 characters)")


def check_stored_versions(versions: Sequence[object], path: Path) -> list[str]:
    """The retriever versions stored in the bank at ``path``; refuses any that is not a plain
    token (the database was changed by something else)."""
    for version in versions:
        if not isinstance(version, str) or not VERSION_PATTERN.match(version):
            raise BankError(f"The bank at {path} is damaged: it names a retriever "
                            f"version {version!r} that is not a plain token")
    return list(versions)


def check_version_matches(stored: Sequence[str], retriever_version: str) -> None:
    """Refuse adding embeddings of ``retriever_version`` to a bank holding other versions."""
    if stored and list(stored) != [retriever_version]:
        raise BankError(
            f"These embeddings were made by retriever version {retriever_version} but the "
            f"bank holds embeddings of version {', '.join(stored)}: re-embed the bank "
            "(`napari-jras bank rebuild`) or embed the new exemplars with that version")


def check_search_ready(total: int, embedded: int, damaged: Sequence[int], path: Path) -> None:
    """Refuse a search the bank cannot answer: empty, or embeddings missing or damaged.

    Args:
        total: number of exemplars.
        embedded: number of exemplars with an embedding.
        damaged: ids of exemplars whose embedding is damaged.
        path: the bank folder (for messages).
    """
    if total == 0:
        raise BankError(f"The exemplar bank at {path} is empty: add exemplars first")
    if embedded < total:
        raise BankError(f"{total - embedded} of {total} exemplars have no embedding: re-embed "
                        "the bank with the current retriever (`napari-jras bank rebuild`)")
    if damaged:
        raise damaged_error(damaged, path)


def check_query_version(stored: Sequence[str], retriever_version: str) -> None:
    """Refuse a search by ``retriever_version`` of embeddings made by other versions."""
    if list(stored) != [retriever_version]:
        raise BankError(
            f"The bank's embeddings were made by retriever version {', '.join(stored)} but "
            f"the current one is {retriever_version}: re-embed the bank "
            "(`napari-jras bank rebuild`)")


def damaged_error(damaged: Sequence[int], path: Path) -> BankError:
    """The error for exemplars of the bank at ``path`` whose stored embedding is damaged."""
    shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
    return BankError(
        f"{len(damaged)} exemplar(s) of the bank at {path} have a damaged embedding "
        f"(id {shown}): re-embed the bank from its stored pixels with "
        f"`napari-jras bank rebuild --bank {path} --model RUN`")


def check_prefix(prefix: str) -> None:
    """Refuse a pseudonym prefix that is not a short plain name starting with a letter."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", prefix):
        raise BankError(f"Invalid pseudonym prefix {prefix!r}: use letters, digits, '-', '_' "
                        "and start with a letter (at most 32 characters)")
