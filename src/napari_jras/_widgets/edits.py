"""Which slices a person edited, and how predictions merge with those edits (Qt-free).

The assistant compares an image's J-RAS labels with a *baseline*: the last prediction or the last
accepted mask of every slice. A slice whose labels differ from it holds the person's unaccepted
edits; new predictions, propagation and box starts never overwrite such a slice. Plain numpy: no
Qt, no napari, tested without a viewer.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Draft = tuple[np.ndarray, dict[str, Any]]
"""An autosaved draft: the labels and their metadata (``edited`` slices, ``saved`` time)."""


def as_volume(array: np.ndarray) -> np.ndarray:
    """A (Z, H, W) view of a 2-D or 3-D array (a 2-D image is one slice)."""
    return array if array.ndim == 3 else array[None]


def edited_slices(data: np.ndarray, baseline: np.ndarray) -> list[int]:
    """Slices where ``data`` differs from ``baseline``.

    Args:
        data: the labels as they are now (2-D or 3-D).
        baseline: the labels they are compared with (same shape).

    Returns:
        The indices of the differing slices, ascending (``[0]`` or ``[]`` for 2-D labels).
    """
    data, base = as_volume(np.asarray(data)), as_volume(np.asarray(baseline))
    return [int(z) for z in np.flatnonzero((data != base).reshape(len(data), -1).any(1))]


@dataclass
class SliceEdits:
    """Edit bookkeeping of one image's labels.

    Attributes:
        baseline: the prediction (or last accepted mask) the labels are compared with; the
            methods update it in place.
        key: the image's autosave key (see :func:`draft_key`).
        predicted: slices a prediction (or a box start) has filled so far.
        dirty: True after an edit that is not autosaved yet.
    """

    baseline: np.ndarray
    key: str
    predicted: set[int] = field(default_factory=set)
    dirty: bool = False

    def edited(self, data: np.ndarray) -> list[int]:
        """Slices of ``data`` (the labels now) that hold unaccepted edits."""
        return edited_slices(data, self.baseline)

    def merge_prediction(self, data: np.ndarray, prediction: np.ndarray,
                         slices: Iterable[int]) -> list[int]:
        """Write the predicted ``slices`` into ``data`` (in place), except edited slices.

        Args:
            data: the labels (2-D or 3-D), changed in place.
            prediction: the predicted labels, same shape.
            slices: the slices the prediction covers.

        Returns:
            The edited slices that were kept; their baseline becomes the new prediction.
        """
        edited = set(self.edited(data))
        data, base, pred = as_volume(data), as_volume(self.baseline), as_volume(prediction)
        kept = []
        for z in slices:
            if z in edited:
                kept.append(z)
            else:
                data[z] = pred[z]
            base[z] = pred[z]
            self.predicted.add(z)
        return kept

    def restore_draft(self, data: np.ndarray, draft: Draft | None) -> list[int]:
        """Copy the edited slices of an autosaved draft into ``data`` (in place).

        Args:
            data: the labels, changed in place.
            draft: the draft's labels and metadata, or None.

        Returns:
            The restored slices (none when there is no draft or its shape differs).
        """
        if draft is None:
            return []
        labels, meta = draft
        if labels.shape != data.shape:
            return []
        data, saved = as_volume(data), as_volume(labels)
        restored = [z for z in meta.get("edited", []) if 0 <= z < len(data)]
        for z in restored:
            data[z] = saved[z]
        return restored

    def write_unedited(self, data: np.ndarray, slices: Mapping[int, np.ndarray]) -> list[int]:
        """Write new label maps (propagation, box start) into the slices without edits.

        Args:
            data: the labels, changed in place.
            slices: ``{z: (H, W) labels}``, in the order to write them.

        Returns:
            The slices written (they become the baseline and count as predicted).
        """
        edited = set(self.edited(data))
        data, base = as_volume(data), as_volume(self.baseline)
        written = [z for z in slices if z not in edited]
        for z in written:
            data[z] = slices[z]
            base[z] = slices[z]
            self.predicted.add(z)
        return written

    def accept(self, labels: np.ndarray, slices: Iterable[int]) -> None:
        """The accepted ``slices`` of ``labels`` become the baseline (no longer edits)."""
        base, new = as_volume(self.baseline), as_volume(labels)
        for z in slices:
            base[z] = new[z]

    def propagation_start(self, data: np.ndarray, start: int
                          ) -> tuple[dict[int, np.ndarray], list[int]]:
        """What propagating from slice ``start`` takes from the person's edits.

        Args:
            data: the labels now (3-D).
            start: the slice propagation starts from.

        Returns:
            ``painted``: ``{start: labels}`` when ``start`` is edited (not yet accepted) and
            serves as the one-slice start, else empty; ``protected``: the other edited slices,
            which propagation never predicts.
        """
        edited = set(self.edited(data))
        painted = {start: as_volume(np.asarray(data))[start].copy()} if start in edited else {}
        return painted, sorted(edited - {start})


def accepted_slices(corrections: Iterable[Mapping[str, Any]], case_id: str) -> set[int]:
    """Slices of ``case_id`` among a workspace's accepted corrections (their records)."""
    return {int(r.get("slice_index") or 0) for r in corrections if r["case_id"] == case_id}


def kept_slices(edited: Collection[int], corrections: Iterable[Mapping[str, Any]],
                case_id: str) -> set[int]:
    """Slices a box start never writes: unaccepted edits and accepted corrections.

    Args:
        edited: the image's edited slices.
        corrections: the workspace's correction records (without a workspace: the modality
            bank's records, or none).
        case_id: the image's case id.

    Returns:
        The union of both.
    """
    return set(edited) | accepted_slices(corrections, case_id)


def draft_key(name: str, source: str, shape: Sequence[int]) -> str:
    """Autosave key of an image: its (sanitised) name plus a hash of its source and shape.

    Args:
        name: the image layer's name.
        source: where the image came from (file path, or empty).
        shape: the image's shape.

    Returns:
        ``<name>-<10 hex digits>``, safe as a file name.
    """
    digest = hashlib.sha1(f"{source}|{name}|{tuple(shape)}".encode()).hexdigest()[:10]
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "image"
    return f"{clean}-{digest}"


def draft_meta(image_name: str, edited: list[int]) -> dict[str, Any]:
    """Metadata stored with a draft: the image, its edited slices, when it was saved."""
    return {"image": image_name, "edited": edited, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}


def restored_time(draft: Draft | None) -> str:
    """When a draft was autosaved (from its metadata); empty without a draft."""
    return str(draft[1].get("saved", "earlier")) if draft is not None else ""


def slice_list(zs: Sequence[int]) -> str:
    """``3, 4, 5`` for a few slices, ``0..9 (10)`` for many (notification texts)."""
    return ", ".join(str(z) for z in zs) if len(zs) <= 8 else f"{zs[0]}..{zs[-1]} ({len(zs)})"
