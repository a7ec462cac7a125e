"""What :meth:`~.engine.InferenceEngine.predict` returns: labels, probabilities, and per slice the
exemplars that guided it (what the gallery shows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RetrievedExemplar:
    """One exemplar used for a slice: what the gallery shows.

    Attributes:
        id: the bank exemplar's id; -1 for an annotated slice of the same volume (memory).
        score: the retrieval similarity (cosine; 0 for the ``random`` diagnostic), or the
            memory score of a volume slice.
        weight: its fusion weight among the slice's exemplars (they sum to 1).
        record: its provenance (case, patient, slice, origin...); memory slices add
            ``slice_index``, ``dz`` and ``predicted`` when it is a propagated prediction.
        image: the exemplar image at the model size ``(size, size)``, float32 in [0, 1].
        mask: its label map ``(size, size)``, uint8 class indices.
    """

    id: int
    score: float
    weight: float
    record: dict[str, Any]
    image: np.ndarray
    mask: np.ndarray


@dataclass
class Prediction:
    """Result of :meth:`InferenceEngine.predict` (arrays at the input's shape).

    Attributes:
        labels: uint8 class indices, ``(Z, H, W)`` or ``(H, W)`` for a 2-D input; slices not
            predicted are 0.
        slices: the Z indices that were predicted, in order.
        exemplars: the exemplars of each predicted slice (J-RAS models only).
        probabilities: float16 class probabilities ``(C, Z, H, W)`` (``(C, H, W)`` for a 2-D
            input) when asked for, else None.
        timings: seconds spent in ``embed``, ``search``, ``fusion`` and ``network``.
    """

    labels: np.ndarray
    slices: list[int]
    exemplars: dict[int, list[RetrievedExemplar]] = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
