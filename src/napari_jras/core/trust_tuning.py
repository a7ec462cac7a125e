"""Choosing a readout model's ``readout_trust`` on validation volumes.

``readout_trust`` weighs the readout's propagated mask against the network's output for slices
guided by accepted slices of their own volume (:func:`~.readout.trust_readout`). The right
value depends on the model: trained on few patients the network is weaker than a mask read from
an accepted neighbour (0.75 helps), trained on many it is stronger (0 is best). ``train --val``
therefore picks it per model (:func:`tune_readout_trust`): every validation volume is predicted
with ``--guide-source neighbour`` (the ground truth of slices z +- 1, what an annotator's
accepted neighbours give) at every value of :data:`TRUST_GRID`, and the value with the best mean
foreground Dice wins (ties: the smaller, the network's own output).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import as_slices
from .engine import InferenceEngine, load_engine
from .io import Case, load_case
from .metrics import mean_dice
from .progress import Progress, ProgressFn
from .volume_memory import diagnostic_memory

TRUST_GRID = (0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)


def neighbour_dice(engine: InferenceEngine, cases: Sequence[Case],
                   grid: Sequence[float] = TRUST_GRID,
                   progress: ProgressFn | None = None) -> tuple[dict[float, float], int]:
    """Mean foreground Dice over the volumes of ``cases`` with neighbour guides, per value.

    Args:
        engine: a readout model's engine; its ``readout_trust`` is left as it was.
        cases: labelled cases; those of one slice are skipped (no neighbour). Each volume is
            guided by the ground truth of its slices z +- 1 only.
        grid: the ``readout_trust`` values to score.
        progress: receives a ``tune trust`` event per case.

    Returns:
        ``({trust: mean Dice over the volumes}, volumes scored)``; the dict is empty when no
        case has two slices or more.
    """
    kept = engine.readout_trust
    scores: dict[float, list[float]] = {float(t): [] for t in grid}
    num_classes = engine.model.config.num_classes
    volumes = 0
    try:
        for i, case in enumerate(cases):
            image, label = load_case(case)
            if as_slices(image.data).shape[0] > 1:
                volumes += 1
                memory = diagnostic_memory("neighbour", label)
                for trust, values in scores.items():
                    engine.readout_trust = trust
                    pred = engine.predict(image.data, exclude_patient=case.patient_id,
                                          guide_source="neighbour", memory=memory)
                    values.append(mean_dice(pred.labels, np.asarray(label), num_classes))
            if progress is not None:
                progress(Progress("tune trust", i + 1, len(cases), detail=case.case_id))
    finally:
        engine.readout_trust = kept
    if not volumes:
        return {}, 0
    return {trust: float(np.mean(values)) for trust, values in scores.items()}, volumes


def best_trust(dice: dict[float, float]) -> float:
    """The value with the highest Dice; among equal ones the smallest."""
    top = max(dice.values())
    return min(t for t, d in dice.items() if d == top)


def tune_readout_trust(run_dir: str | Path, cases: Sequence[Case], device: str = "auto",
                       grid: Sequence[float] = TRUST_GRID,
                       progress: ProgressFn | None = None) -> dict[str, Any]:
    """Score ``grid`` on the volumes among ``cases`` and return the choice (or why none).

    Args:
        run_dir: a trained readout model's run folder.
        cases: validation cases of patients the model was not trained on; 2-D cases (one
            slice) are left out: they have no neighbour to be guided by.
        device: the inference device.
        grid: the ``readout_trust`` values to score.
        progress: receives a ``tune trust`` event per case.

    Returns:
        ``{"chosen": value, "dice": {value: mean Dice}, "volumes": n, "grid": [...],
        "guide_source": "neighbour"}``, or ``{"chosen": None, "reason": ...}`` when no case
        has two slices or more.
    """
    dice, volumes = neighbour_dice(load_engine(run_dir, device=device), cases, grid, progress)
    if not volumes:
        return {"chosen": None, "reason": "no validation case has more than one slice, so no "
                                          "slice can be guided by its neighbours"}
    return {"chosen": best_trust(dice), "dice": {str(t): round(d, 4) for t, d in dice.items()},
            "volumes": volumes, "grid": [float(t) for t in grid], "guide_source": "neighbour"}
