"""One progress event for every long job (training, embedding, prediction, propagation, ...).

A producer calls ``progress(Progress(stage, done, total, ...))``; the consumers (the CLI's
progress lines, the widgets' progress bars, status texts and loss curves) read the same fields
whichever job reports. Never imports Qt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

RECORD_KEYS = ("phase", "step", "total", "eta_s", "case")
"""Keys of a trainer / pipeline record that become fields of :class:`Progress` (not metrics)."""


@dataclass(frozen=True)
class Progress:
    """How far one stage of a job has come.

    Attributes:
        stage: what runs: ``train``, ``finetune``, ``embed``, ``predict``, ``evaluate``,
            ``load``, ``propagate``, a simulation setting's name, ...
        done: units finished so far (steps, slices, cases, exemplars).
        total: units of the whole stage.
        eta_s: estimated seconds left, when the producer knows.
        metrics: numbers of this point (``loss``, ``loss_contrastive``, ``val_dice``, ``dice``...).
        detail: a short free text, e.g. the case just finished.
    """

    stage: str
    done: int
    total: int
    eta_s: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    detail: str = ""

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Progress:
        """The event of a trainer / pipeline record (``phase``, ``step``, ``total``, numbers).

        Args:
            record: a dict as written to ``log.jsonl``: ``phase``, ``step``, ``total``, optional
                ``eta_s`` and ``case``; every other number (not a bool) becomes a metric.

        Returns:
            The event; non-numeric extras (e.g. checksums) are left out.
        """
        metrics = {key: float(value) for key, value in record.items()
                   if key not in RECORD_KEYS and isinstance(value, int | float)
                   and not isinstance(value, bool)}
        eta = record.get("eta_s")
        return cls(stage=str(record.get("phase", "")), done=int(record.get("step", 0)),
                   total=int(record.get("total", 0)),
                   eta_s=None if eta is None else float(eta), metrics=metrics,
                   detail=str(record.get("case", "")))


ProgressFn = Callable[[Progress], None]
"""What a long job calls with each :class:`Progress` event."""

CancelFn = Callable[[], bool]
"""What a long job polls between units: True asks it to stop."""
