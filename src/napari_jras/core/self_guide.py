"""Self-guidance: the second pass of a volume prediction reads the first pass's prediction of
each slice's nearest slice as a (predicted) memory slice (:meth:`~.engine.InferenceEngine.predict`)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CancelledError
from .prediction import Prediction
from .progress import CancelFn, Progress, ProgressFn
from .volume_memory import VolumeMemory

SELF_GUIDED_SOURCES = ("retrieved", "none", "random")
"""Guide sources whose volume predictions :meth:`~.engine.InferenceEngine.predict` self-guides."""


def first_pass_memory(first: Prediction) -> VolumeMemory:
    """The memory of the self-guided second pass: the first pass's label maps as predicted
    slices; each slice is guided by the nearest of them (z - 1, else z + 1), never its own,
    the other K - 1 slots retrieved as usual.
    """
    labels = {z: first.labels[z] for z in first.slices}
    return VolumeMemory(labels, slots=1, max_distance=1, predicted=frozenset(labels),
                        origin="first-pass prediction")


@dataclass
class PassCounter:
    """Progress and cancellation over the passes of one :meth:`~.engine.InferenceEngine.predict`."""

    total: int
    progress: ProgressFn | None
    cancel: CancelFn | None
    done: int = 0

    def check_cancel(self) -> None:
        """Raise :class:`CancelledError` when ``cancel`` says so."""
        if self.cancel is not None and self.cancel():
            raise CancelledError("Prediction cancelled")

    def advance(self, n: int) -> None:
        """Count ``n`` more slices done and report a ``predict`` progress event."""
        self.done += n
        if self.progress is not None:
            self.progress(Progress("predict", self.done, self.total))
