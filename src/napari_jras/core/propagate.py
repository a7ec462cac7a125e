"""Propagation: after a slice is accepted, re-predict the rest of its volume outward from it.

:func:`propagate` predicts the slices of a volume in rings around the start slice z: z+1 and
z-1 together, then z+2 and z-2, and so on, each slice with the ``slots`` nearest annotated
slices of the volume as memory (:class:`~.volume_memory.VolumeMemory`: they take the first
exemplar slots, nearer slices weigh more; retrieval fills the rest up to K). Annotated
(accepted) and ``protected`` slices (those the user is editing) are never predicted nor
overwritten; a direction goes on past them.

Stop rule, per direction (towards higher and towards lower slices):

* ``end``: the volume ends;
* ``empty``: the prediction has no foreground (the structure vanished). The slice is filled
  with that empty prediction, then the direction stops (``stop_on_empty``, default on);
* ``confidence``: the slice's *confidence*, the mean over its predicted foreground pixels of
  the highest class probability, is below ``min_confidence`` (default
  :data:`MIN_CONFIDENCE`). That slice is left as it was and the direction stops;
* ``cancelled``: ``cancel()`` returned True (checked before every ring and inside the
  engine); what was filled so far is returned.

``chain`` (off by default): the predictions of earlier rings join the memory of later ones as
*predicted* slices, scored :data:`~.volume_memory.PREDICTED_PENALTY` below an annotated slice
at the same distance. Off by default because predictions are not annotations: without it a
far slice is guided by the nearest accepted slice itself, never by errors piled up on the
way. ``slots=0`` turns the memory off (each slice retrieves its exemplars as before).

Never imports Qt.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .errors import JRASError
from .prediction import Prediction, RetrievedExemplar
from .progress import CancelFn, Progress, ProgressFn
from .volume_memory import VolumeMemory

MIN_CONFIDENCE = 0.5
"""Default stop threshold on a slice's confidence (mean highest class probability over its
predicted foreground pixels; with 4 classes it lies in [0.25, 1])."""
DIRECTIONS = {1: "forward", -1: "backward"}
"""Names of the two directions: towards higher slice indices, towards lower ones."""


class Predictor(Protocol):
    """What propagation needs: :class:`~.engine.InferenceEngine` or a :class:`~.workspace.Workspace`."""

    def predict(self, image: np.ndarray, modality: str | None = ..., slices: Any = ...,
                cancel: CancelFn | None = ..., return_probabilities: bool = ...,
                memory: VolumeMemory | None = ...) -> Prediction:
        """Segment the given slices of ``image`` with ``memory``."""


@dataclass
class Propagation:
    """Result of :func:`propagate`: the new labels of the filled slices and why it stopped.

    Attributes:
        labels: the predicted ``(H, W)`` uint8 label map of each filled slice.
        filled: the filled slices, in the order they were predicted.
        exemplars: the exemplars that guided each filled slice.
        confidence: the :func:`slice_confidence` of every predicted slice, filled or not.
        stopped: why each direction (``forward``, ``backward``) stopped: ``end``,
            ``empty``, ``confidence`` or ``cancelled``.
        cancelled: ``cancel()`` returned True.
        seconds: wall time of the propagation.
    """

    labels: dict[int, np.ndarray] = field(default_factory=dict)
    filled: list[int] = field(default_factory=list)
    exemplars: dict[int, list[RetrievedExemplar]] = field(default_factory=dict)
    confidence: dict[int, float] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False
    seconds: float = 0.0


def slice_confidence(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean highest class probability over the predicted foreground pixels (1.0 when empty).

    ``probabilities``: (C, H, W); ``labels``: (H, W).
    """
    foreground = np.asarray(labels) > 0
    if not foreground.any():
        return 1.0
    return float(np.asarray(probabilities, np.float32).max(0)[foreground].mean())


def propagate(predictor: Predictor, image: np.ndarray, accepted: Mapping[int, np.ndarray],
              start: int, protected: Collection[int] = (), slots: int = 2, chain: bool = False,
              min_confidence: float = MIN_CONFIDENCE, stop_on_empty: bool = True,
              modality: str | None = None, case_id: str | None = None,
              records: Mapping[int, Mapping[str, Any]] | None = None,
              origin: str = "your correction",
              progress: ProgressFn | None = None,
              cancel: CancelFn | None = None) -> Propagation:
    """Re-predict the slices of ``image`` (Z, H, W) outward from the annotated slice ``start``.

    ``accepted[z]`` is the (H, W) label map of every annotated slice (``start`` among them);
    they guide the prediction (``slots`` nearest, see the module docstring) and are never
    overwritten, nor are the ``protected`` slices. ``case_id`` keeps the bank's copies of the
    memory slices (this case's accepted slices) out of the retrieved slots; ``records`` and
    ``origin`` describe the annotated slices in the gallery. ``progress`` receives
    ``propagate`` events counting predicted slices against all candidates. See the module
    docstring for the stop rule and ``chain``.

    Args:
        predictor: the engine or workspace that predicts.
        image: the raw volume ``(Z, H, W)``.
        accepted: the annotated slices' label maps ``(H, W)`` by slice index.
        start: the annotated slice to propagate from.
        protected: slices never predicted nor overwritten (being edited).
        slots: memory slots per slice (nearest annotated slices); 0 turns the memory off.
        chain: earlier predictions join the memory as weaker slices.
        min_confidence: the confidence stop threshold, in [0, 1] (0: never stop on it).
        stop_on_empty: stop a direction after its first empty prediction.
        modality: intensity scaling; None: the model's.
        case_id: this volume's case id in the bank, or None (used with the memory only).
        records: provenance of the annotated slices by index, shown in the gallery.
        origin: the ``origin`` shown for memory slices.
        progress: receives ``propagate`` events.
        cancel: polled before every ring and by the predictor.

    Returns:
        The :class:`Propagation`; after a cancel, what was filled until then.

    Raises:
        JRASError: ``image`` is not 3-D, ``start`` is out of range or not annotated, an
            annotated slice does not fit the volume, ``min_confidence`` is outside [0, 1],
            or the predictor failed (other than by the cancel).
    """
    started = time.perf_counter()
    volume = np.asarray(image)
    if volume.ndim != 3:
        raise JRASError(f"Propagation needs a 3-D volume (Z, Y, X); this image has "
                        f"{volume.ndim} dimension(s)")
    n = volume.shape[0]
    if not 0 <= int(start) < n:
        raise JRASError(f"Slice {start} is out of range (the image has {n} slices)")
    start = int(start)
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise JRASError(f"min_confidence must lie in [0, 1], got {min_confidence}")
    annotated = {int(z): np.asarray(label) for z, label in accepted.items()}
    if start not in annotated:
        raise JRASError(f"Slice {start} has no annotation to propagate from: accept (or paint) "
                        "it first")
    for z, label in annotated.items():
        if not 0 <= z < n or label.shape != volume.shape[1:]:
            raise JRASError(f"Annotated slice {z} does not fit the volume: expected a slice "
                            f"index in 0..{n - 1} and a {volume.shape[1:]} label map, got "
                            f"{z} and {label.shape}")
    skip = set(annotated) | {int(z) for z in protected}
    total = sum(1 for z in range(n) if z not in skip)
    result = Propagation()
    alive = dict.fromkeys(DIRECTIONS, True)
    chained: dict[int, np.ndarray] = {}
    done = 0
    for distance in range(1, n):
        ring = []
        for sign in DIRECTIONS:
            z = start + sign * distance
            if not alive[sign]:
                continue
            if not 0 <= z < n:
                alive[sign] = False
                result.stopped[DIRECTIONS[sign]] = "end"
            elif z not in skip:
                ring.append((sign, z))
        if not any(alive.values()):
            break
        if not ring:
            continue
        if cancel is not None and cancel():
            result.cancelled = True
            break
        memory = None
        if slots > 0:
            memory = VolumeMemory({**chained, **annotated}, slots=slots, origin=origin,
                                  records=dict(records or {}), case_id=case_id,
                                  predicted=frozenset(set(chained) - set(annotated)))
        try:
            pred = predictor.predict(volume, modality=modality, slices=[z for _, z in ring],
                                     return_probabilities=True, memory=memory, cancel=cancel)
        except JRASError:
            if cancel is not None and cancel():
                result.cancelled = True
                break
            raise
        for sign, z in ring:
            labels = pred.labels[z]
            confidence = slice_confidence(pred.probabilities[:, z], labels)
            result.confidence[z] = confidence
            if stop_on_empty and not labels.any():
                reason = "empty"
            elif confidence < min_confidence:
                alive[sign] = False
                result.stopped[DIRECTIONS[sign]] = "confidence"
                continue
            else:
                reason = None
            result.labels[z] = labels
            result.filled.append(z)
            result.exemplars[z] = pred.exemplars.get(z, [])
            if chain:
                chained[z] = labels
            if reason is not None:
                alive[sign] = False
                result.stopped[DIRECTIONS[sign]] = reason
        done += len(ring)
        if progress is not None:
            progress(Progress("propagate", done, total))
    for sign, name in DIRECTIONS.items():
        if alive[sign]:
            result.stopped[name] = "cancelled" if result.cancelled else "end"
    result.seconds = time.perf_counter() - started
    return result
