"""Annotated slices of the volume being segmented, used as exemplars of its other slices.

Two uses share this rule:

* the guide-source diagnostics of ``evaluate`` (``neighbour``: the ground truth of slices
  z +- 1 is the only guide of slice z; ``oracle``: slice z's own ground truth);
* the annotator's accepted corrections of the volume on screen, which take the first exemplar
  slots of every other slice of that volume (same-volume priority), the rest still retrieved.

Which slices, and how much each counts: the ``slots`` accepted slices nearest to z (ties:
the lower slice first) with the *memory score* ``1 - 0.1 (|dz| - 1)`` (1.0 next door, 0.9 two
slices away, never below 0.5), on the same scale as the retriever's cosine similarities, so
that the fusion softmax ``softmax(score / tau)`` prefers near slices to far ones and the
volume's own slices to other patients' (cosine <= 1). A slice's own annotation (the oracle)
scores 1.0. Slices whose labels are the model's own predictions (``predicted``: propagation's
``chain`` option), not annotations, score :data:`PREDICTED_PENALTY` less; the ``slots`` best
scores guide (ties: the nearer, then the lower slice).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import JRASError

GUIDE_SOURCES = ("retrieved", "none", "neighbour", "oracle", "random")
PREDICTED_PENALTY = 0.2
"""How much less a predicted (not annotated) slice scores than an annotated one as memory."""


def memory_score(dz: int) -> float:
    """Score of an annotated slice ``dz`` slices away (see the module docstring).

    Returns:
        1.0 for ``dz`` 0 (the slice itself) and +-1, then 0.1 less per slice, never below 0.5.
    """
    return 1.0 if dz == 0 else max(0.5, 1.0 - 0.1 * (abs(dz) - 1))


@dataclass
class VolumeMemory:
    """Annotated slices of one volume: ``labels[z]`` is the (H, W) label map of slice z.

    ``slots``: how many of them guide each predicted slice; ``include_self``: a slice may use
    its own annotation (the oracle diagnostic); ``only``: no retrieved exemplars fill the
    remaining slots (the neighbour / oracle diagnostics); ``max_distance``: farther slices
    never guide. ``origin`` is shown in the gallery; ``records[s]`` adds provenance of slice s
    (e.g. who accepted it, when) to what the gallery shows. ``predicted``: slices whose labels
    are predictions, scored lower (see the module docstring). ``case_id``: the volume's case
    id; the retrieved slots then skip the bank's copies of the slices in the memory slots
    (accepted corrections are in the bank too: no slice guides twice).

    Raises:
        JRASError: ``slots`` is not a whole number >= 0.
    """

    labels: Mapping[int, np.ndarray] = field(default_factory=dict)
    slots: int = 2
    include_self: bool = False
    only: bool = False
    max_distance: int | None = None
    origin: str = "this volume"
    records: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    predicted: frozenset[int] = frozenset()
    case_id: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 0:
            raise JRASError(f"memory slots must be an integer >= 0, got {self.slots!r}")

    def nearest(self, z: int) -> list[tuple[int, float]]:
        """``(slice, memory score)`` of the annotated slices that guide slice ``z``, best first.

        Args:
            z: the slice being predicted.

        Returns:
            At most ``slots`` pairs, predicted slices scored ``PREDICTED_PENALTY`` lower;
            ordered by score, then distance to ``z``, then slice index.
        """
        candidates = [s for s in self.labels if (self.include_self or s != z)
                      and (self.max_distance is None or abs(s - z) <= self.max_distance)]
        scored = [(s, memory_score(s - z) - (PREDICTED_PENALTY if s in self.predicted else 0.0))
                  for s in candidates]
        scored.sort(key=lambda item: (-round(item[1], 6), abs(item[0] - z), item[0]))
        return scored[:self.slots]


def diagnostic_memory(source: str, reference: np.ndarray | None) -> VolumeMemory | None:
    """The :class:`VolumeMemory` of a guide-source diagnostic for a volume's ground truth.

    ``retrieved``, ``none`` and ``random`` need none (None); ``neighbour`` gives every slice the
    ground truth of slices z +- 1 (two slots), ``oracle`` its own (one slot).

    Args:
        source: one of ``GUIDE_SOURCES``.
        reference: the ground-truth label map, (Z, H, W) or (H, W) (one slice); only read for
            ``neighbour`` and ``oracle``.

    Returns:
        The memory (with ``only=True``: no retrieved exemplars), or None.

    Raises:
        JRASError: an unknown source, or ``neighbour``/``oracle`` without ``reference``.
    """
    if source not in GUIDE_SOURCES:
        raise JRASError(f"guide source must be one of {', '.join(GUIDE_SOURCES)}, got {source!r}")
    if source not in ("neighbour", "oracle"):
        return None
    if reference is None:
        raise JRASError(f"guide source '{source}' needs the ground-truth labels of the volume")
    volume = reference if reference.ndim == 3 else reference[None]
    labels = {z: volume[z] for z in range(volume.shape[0])}
    if source == "oracle":
        return VolumeMemory(labels, slots=1, include_self=True, only=True, origin="oracle")
    return VolumeMemory(labels, slots=2, only=True, max_distance=1,
                        origin="neighbour ground truth")
