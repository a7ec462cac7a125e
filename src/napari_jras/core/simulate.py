"""Annotation effort, simulated: how many pixels would an annotator change with this model?

A simulated annotator works through labelled cases in order. Each prediction it is shown is
"corrected" by replacing it with the expert mask (the pixels that change are counted) and
accepted. Every setting runs in a fresh workspace (a temporary home folder), so the model is
never changed. Settings (:data:`SETTINGS`):

* ``static``: the model as it is; nothing is accepted, nothing learned;
* ``bank``: every accepted slice (or case) goes into the workspace's exemplar bank, where the
  next predictions can retrieve it; no same-volume memory;
* ``propagate``: ``bank`` plus same-volume priority (the nearest accepted slices of the volume
  take the first exemplar slots, see :mod:`.volume_memory`) plus propagation
  (:mod:`.propagate`) after every accept.

``unit="slice"`` (the assistant's accept, next slice): inside each volume the annotator starts
at the middle slice and goes outward (m, m+1, m-1, m+2, ...), so every slice after the first
lies next to an accepted one. With ``propagate``, each accept re-predicts the remaining slices
outward from it; the next slice shows its propagated prediction, or, where the stop rule
ended propagation before it, a prediction with the same memory. ``unit="case"``: whole cases
are predicted and accepted; with ``propagate`` the annotator corrects the middle slice first,
propagates from it, and corrects the assembled volume.

``propagate`` also measures the *one-slice start*: for each volume, before anything of it is
accepted, the middle slice's expert mask is propagated to the whole volume (no stop rule); the
Dice of every slice by its distance from the middle is reported next to copying the middle
slice's mask onto it.

Case Dice is that of the volume assembled from the predictions shown (before correction);
slice Dice is the mean over the foreground classes present in either mask (1.0 when both
masks are empty).
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import JRASError
from .io import Case, find_cases, load_case
from .metrics import dice_per_class, mean_dice
from .progress import Progress, ProgressFn
from .propagate import MIN_CONFIDENCE, propagate
from .workspace import BUILTIN, OWN_CORRECTION, Workspace

SETTINGS = ("static", "bank", "propagate")
UNITS = ("slice", "case")


def outward_order(n: int, start: int | None = None) -> list[int]:
    """Slices ``start`` (default: the middle), start+1, start-1, start+2, ... of an n-slice volume."""
    start = n // 2 if start is None else start
    order = [start]
    for d in range(1, n):
        order += [z for z in (start + d, start - d) if 0 <= z < n]
    return order


def slice_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice of one slice over the classes in either mask; 1.0 when both are
    empty (a structure that has ended, and a prediction that says so)."""
    dice = mean_dice(pred, label, num_classes)
    return 1.0 if np.isnan(dice) else dice


def _own_weight(exemplars: list, case_id: str) -> float | None:
    """Total fusion weight of exemplars that are this volume's own accepted slices (None: none)."""
    own = [e.weight for e in exemplars
           if e.record.get("case_id") == case_id or e.record.get("origin") == OWN_CORRECTION]
    return float(sum(own)) if own else None


class Annotator:
    """One setting's simulated annotator in its own workspace.

    Args:
        ws: the workspace it predicts with and accepts into.
        setting: one of :data:`SETTINGS`.
        slots: same-volume memory slots (``propagate`` only).
        min_confidence: propagation's confidence stop threshold.
        chain: propagation also uses its own predictions as memory.

    Raises:
        JRASError: an unknown ``setting``.
    """

    def __init__(self, ws: Workspace, setting: str, slots: int = 2,
                 min_confidence: float = MIN_CONFIDENCE, chain: bool = False):
        if setting not in SETTINGS:
            raise JRASError(f"unknown setting {setting!r}: choose from {', '.join(SETTINGS)}")
        self.ws, self.setting = ws, setting
        self.slots, self.min_confidence, self.chain = slots, min_confidence, chain
        self.accepts = setting != "static"
        self.memory = setting == "propagate"

    def _accept(self, image: np.ndarray, label: np.ndarray, case: Case, zs: list[int] | None
                ) -> None:
        self.ws.accept(image, label, slices=zs, case_id=case.case_id,
                       source=case.image_path.name, patient_id=case.patient_id)

    def slice_walk(self, image: np.ndarray, label: np.ndarray, case: Case
                   ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """Work through a volume slice by slice from its middle; the predictions shown, a row per
        slice, and extra case figures.

        Args:
            image: the raw volume ``(Z, H, W)``.
            label: its expert labels ``(Z, H, W)``, uint8.
            case: the case (its ids go into the workspace with each accept).

        Returns:
            The predictions shown ``(Z, H, W)`` uint8; one row per slice in walking order
            (``slice``, ``dz_to_accepted``: None for the first, ``dice``,
            ``corrected_pixels``, ``own_weight``: fusion weight of this volume's accepted
            slices or None); and ``propagated_slices``, ``propagate_s``, ``stops``.
        """
        n = image.shape[0]
        nc = self.ws.num_classes
        shown = np.zeros(label.shape, np.uint8)
        rows: list[dict[str, Any]] = []
        if not self.accepts:  # nothing changes between slices: one pass
            pred = self.ws.predict(image)
            shown[:] = pred.labels
            order, exemplars, ready = outward_order(n), pred.exemplars, {}
        else:
            order, exemplars, ready = outward_order(n), {}, {}
        accepted: list[int] = []
        stats = {"propagated_slices": 0, "propagate_s": 0.0, "stops": []}
        for z in order:
            if self.accepts:
                if z in ready:
                    shown[z] = ready[z]
                else:
                    memory = (self.ws.volume_memory(case.case_id, image.shape, self.slots)
                              if self.memory else None)
                    pred = self.ws.predict(image, slices=[z], memory=memory)
                    shown[z], exemplars[z] = pred.labels[z], pred.exemplars.get(z, [])
            dz = min((abs(z - s) for s in accepted), default=None)
            rows.append({"slice": z, "dz_to_accepted": dz,
                         "dice": slice_dice(shown[z], label[z], nc),
                         "corrected_pixels": int((shown[z] != label[z]).sum()),
                         "own_weight": _own_weight(exemplars.get(z, []), case.case_id)})
            accepted.append(z)  # corrected (static: not given to the model)
            if not self.accepts:
                continue
            self._accept(image, label, case, [z])
            if self.memory and len(accepted) < n:
                truth, records = self.ws.accepted_slices(case.case_id, image.shape[1:])
                result = propagate(self.ws, image, truth, z, slots=self.slots, chain=self.chain,
                                   min_confidence=self.min_confidence, case_id=case.case_id,
                                   records=records)
                ready = {s: lab for s, lab in ready.items() if s not in truth}
                ready.update(result.labels)
                exemplars.update(result.exemplars)
                stats["propagated_slices"] += len(result.filled)
                stats["propagate_s"] += result.seconds
                stats["stops"].append(result.stopped)
        return shown, rows, stats

    def case_pass(self, image: np.ndarray, label: np.ndarray, case: Case
                  ) -> tuple[np.ndarray, dict[str, Any]]:
        """Whole-case unit: the assembled prediction shown for the case; accept it afterwards.

        Args:
            image: the raw image or volume.
            label: its expert labels, uint8, the shape of ``image``.
            case: the case.

        Returns:
            The prediction shown (uint8, the shape of ``image``) and, for ``propagate`` on a
            volume, ``propagated_slices``, ``propagate_s`` and ``stops`` (else empty).
        """
        extra: dict[str, Any] = {}
        if self.memory and image.ndim == 3:
            m = image.shape[0] // 2
            shown = np.zeros(label.shape, np.uint8)
            shown[m] = self.ws.predict(image, slices=[m]).labels[m]
            self._accept(image, label, case, [m])
            truth, records = self.ws.accepted_slices(case.case_id, image.shape[1:])
            result = propagate(self.ws, image, truth, m, slots=self.slots, chain=self.chain,
                               min_confidence=self.min_confidence, case_id=case.case_id,
                               records=records)
            rest = [z for z in range(image.shape[0]) if z != m and z not in result.labels]
            for z, lab in result.labels.items():
                shown[z] = lab
            if rest:
                memory = self.ws.volume_memory(case.case_id, image.shape, self.slots)
                shown[rest] = self.ws.predict(image, slices=rest, memory=memory).labels[rest]
            extra = {"propagated_slices": len(result.filled), "propagate_s": result.seconds,
                     "stops": [result.stopped]}
        else:
            shown = self.ws.predict(image).labels
        if self.accepts:
            self._accept(image, label, case, None if label.any() else [0])
        return shown, extra


def one_slice_start(ws: Workspace, image: np.ndarray, label: np.ndarray, case: Case,
                    slots: int = 2, chain: bool = False) -> list[dict[str, Any]]:
    """Propagate the middle slice's expert mask through the volume (no stop rule); Dice of
    every other slice, propagated and copied from the middle, with its distance.

    Args:
        ws: the workspace to predict with (nothing is accepted).
        image: the raw volume ``(Z, H, W)``.
        label: its expert labels ``(Z, H, W)``.
        case: the case (its id keeps copies of the memory slice out of retrieval).
        slots: memory slots.
        chain: propagated slices join the memory.

    Returns:
        One row per other slice, by index: ``slice``, ``dz`` (distance from the middle),
        ``propagated`` and ``copy`` (:func:`slice_dice` of each).
    """
    m = image.shape[0] // 2
    result = propagate(ws, image, {m: label[m]}, m, slots=slots, chain=chain,
                       min_confidence=0.0, stop_on_empty=False, case_id=case.case_id)
    nc = ws.num_classes
    return [{"slice": z, "dz": abs(z - m), "propagated": slice_dice(result.labels[z], label[z], nc),
             "copy": slice_dice(label[m], label[z], nc)} for z in sorted(result.labels)]


def run_setting(source: str | Path, setting: str, cases: Sequence[Case], unit: str,
                home: Path, slots: int = 2, min_confidence: float = MIN_CONFIDENCE,
                chain: bool = False, finetune_every: int = 0, finetune_steps: int = 40,
                progress: ProgressFn | None = None, name: str | None = None) -> dict[str, Any]:
    """Walk through ``cases`` with one setting in a fresh workspace of ``source`` under ``home``.

    ``chain``: propagation also uses its own predictions as weaker memory (see
    :mod:`.propagate`). ``finetune_every`` > 0 (case unit only) adds a fine-tuning round every
    that many accepted cases (the loop benchmark's ``+finetune`` settings).

    Args:
        source: the model: a run folder or ``builtin`` (:meth:`Workspace.open`).
        setting: one of :data:`SETTINGS`.
        cases: the labelled cases, worked through in order.
        unit: ``slice`` (3-D cases slice by slice; 2-D cases whole) or ``case``.
        home: the folder the fresh workspace is made under (``home/<name>``).
        slots: same-volume memory slots.
        min_confidence: propagation's confidence stop threshold.
        chain: see above.
        finetune_every: see above; 0: never.
        finetune_steps: steps of each fine-tuning round.
        progress: receives an event per case, stage ``name``, with ``dice`` and
            ``corrected`` among the metrics.
        name: the setting's name in the report (default ``setting``).

    Returns:
        :func:`summarize_setting` of the per-case rows.
    """
    name = name or setting
    ws = Workspace.open(source, home=Path(home) / name)
    annotator = Annotator(ws, setting, slots, min_confidence, chain)
    rows, finetune_s = [], 0.0
    try:
        for n, case in enumerate(cases):
            volume, label = load_case(case)
            image, label = volume.data, np.asarray(label).astype(np.uint8)
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            if unit == "slice" and image.ndim == 3:
                pred, slices, extra = annotator.slice_walk(image, label, case)
                extra["slices"] = slices
                weights = [s["own_weight"] for s in slices if s["dz_to_accepted"] is not None]
                if weights and annotator.accepts:
                    extra["own_retrieved"] = float(np.mean([w is not None for w in weights]))
                    extra["own_weight"] = float(np.mean([w or 0.0 for w in weights]))
            else:
                pred, extra = annotator.case_pass(image, label, case)
            predict_s = time.perf_counter() - t0
            if setting == "propagate" and image.ndim == 3:
                extra["one_slice_start"] = one_slice_start(ws, image, label, case, slots, chain)
            dice = dice_per_class(pred, label, ws.num_classes)
            rows.append({"case": case.case_id, "accepted_before": n if annotator.accepts else 0,
                         "dice": mean_dice(pred, label, ws.num_classes),
                         "dice_per_class": dice.tolist(),
                         "corrected_pixels": int((pred != label).sum()),
                         "foreground_pixels": int((label > 0).sum()), "predict_s": predict_s,
                         **extra})
            if progress is not None:
                progress(Progress(name, n + 1, len(cases), detail=case.case_id,
                                  metrics={"dice": rows[-1]["dice"],
                                           "corrected": rows[-1]["corrected_pixels"]}))
            if finetune_every and unit == "case" and annotator.accepts and \
                    (n + 1) % finetune_every == 0 and n + 1 < len(cases):
                t0 = time.perf_counter()
                ws.finetune(steps=finetune_steps, device="auto", note=f"loop after {n + 1}")
                finetune_s += time.perf_counter() - t0
    finally:
        ws.close()
    return summarize_setting(name, rows, finetune_s)


def summarize_setting(name: str, rows: list[dict[str, Any]], finetune_s: float = 0.0
                      ) -> dict[str, Any]:
    """Totals and means of one setting's per-case rows.

    Args:
        name: the setting's name.
        rows: the rows :func:`run_setting` made, one per case (at least one).
        finetune_s: seconds spent fine-tuning.

    Returns:
        The setting's report: total and mean corrected pixels, mean and std case Dice, the
        mean Dice of slices next to an accepted one and of first slices, how often and how
        much a volume's own accepted slices guided it, the one-slice start by distance, and
        the rows under ``cases`` (None where a figure does not apply).
    """
    dices = np.array([r["dice"] for r in rows])
    pixels = np.array([r["corrected_pixels"] for r in rows])
    slices = [s for r in rows for s in r.get("slices", [])]
    near = [s["dice"] for s in slices if s["dz_to_accepted"] == 1]
    first = [s["dice"] for s in slices if s["dz_to_accepted"] is None]
    own = [r["own_retrieved"] for r in rows if "own_retrieved" in r]
    starts = [s for r in rows for s in r.get("one_slice_start", [])]
    by_dz = {}
    for dz in sorted({s["dz"] for s in starts}):
        at = [s for s in starts if s["dz"] == dz]
        by_dz[str(dz)] = {"slices": len(at),
                          "propagated": float(np.mean([s["propagated"] for s in at])),
                          "copy": float(np.mean([s["copy"] for s in at]))}
    return {
        "setting": name, "corrected_pixels": int(pixels.sum()), "dice": float(dices.mean()),
        "std_dice": float(dices.std()), "mean_corrected_pixels": float(pixels.mean()),
        "neighbour_slice_dice": float(np.mean(near)) if near else None,
        "neighbour_slices": len(near),
        "first_slice_dice": float(np.mean(first)) if first else None,
        "own_corrections_retrieved": float(np.mean(own)) if own else None,
        "own_corrections_weight": (float(np.mean([r["own_weight"] for r in rows
                                                  if "own_weight" in r])) if own else None),
        "one_slice_start": by_dz or None,
        "finetune_s": finetune_s, "cases": rows,
    }


def git_commit() -> str | None:
    """The commit of the napari-jras source tree when it is a git checkout (else None)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).parent, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def parse_settings(text: str | Sequence[str]) -> list[str]:
    """``static,bank,propagate`` -> a checked list (order kept, no repeats)."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        raise JRASError(f"unknown setting(s) {', '.join(unknown) or '(none given)'}: choose from "
                        f"{', '.join(SETTINGS)}")
    return list(dict.fromkeys(names))


def simulate(model: str | Path, data: str | Path, unit: str = "slice",
             settings: str | Sequence[str] = SETTINGS, limit: int | None = None,
             patient_regex: str | None = None, slots: int = 2,
             min_confidence: float = MIN_CONFIDENCE, chain: bool = False,
             progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the simulated annotator with each setting; the report (see the module docstring)::

        {"settings": {NAME: {"corrected_pixels": N, "dice": D, "cases": [...], ...}},
         "provenance": {...}}

    ``model``: a run folder or ``builtin``; ``data``: labelled cases, worked through in order.

    Args:
        model: a run folder or ``builtin``.
        data: the labelled cases (:func:`~.io.find_cases`).
        unit: ``slice`` or ``case`` (see the module docstring).
        settings: the settings to run, comma-separated or a sequence (:func:`parse_settings`).
        limit: use only the first ``limit`` cases; None: all.
        patient_regex: how case ids map to patient ids, or None.
        slots: same-volume memory slots, at least 1.
        min_confidence: propagation's confidence stop threshold.
        chain: propagation also uses its own predictions as memory.
        progress: receives each setting's per-case events.

    Returns:
        The report above; ``corrected_pixels_vs_static`` gives each setting's corrected
        pixels as a fraction of ``static``'s (None without ``static`` or when it corrected
        none).

    Raises:
        JRASError: an unknown unit or setting, ``limit`` or ``slots`` < 1, or no cases.
    """
    if unit not in UNITS:
        raise JRASError(f"--unit must be slice or case, got {unit!r}")
    if limit is not None and limit < 1:
        raise JRASError(f"--limit must be at least 1, got {limit}")
    if slots < 1:
        raise JRASError(f"memory slots must be at least 1, got {slots}")
    names = parse_settings(settings)
    source = BUILTIN if str(model) == BUILTIN else str(Path(model).expanduser().resolve())
    cases = find_cases(data, patient_regex)[:limit]
    if not cases:
        raise JRASError(f"No labelled cases found under {data}")
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="napari-jras-simulate-") as home:
        for name in names:
            results[name] = run_setting(source, name, cases, unit, Path(home), slots,
                                        min_confidence, chain, progress=progress)
        with Workspace.open(source, home=Path(home) / names[0]) as ws:
            config = ws.model_config.to_dict()
    static = results.get("static")
    ratios = ({name: r["corrected_pixels"] / static["corrected_pixels"]
               for name, r in results.items() if name != "static"}
              if static and static["corrected_pixels"] else None)
    import torch

    from .. import __version__

    case_list = "\n".join(c.case_id for c in cases)
    return {
        "settings": results,
        "corrected_pixels_vs_static": ratios,
        "provenance": {
            "napari_jras": __version__, "commit": git_commit(),
            "command": "napari-jras " + " ".join(sys.argv[1:]) if sys.argv else None,
            "model": {"source": str(model), "config": config},
            "data": {"path": str(data), "cases": len(cases),
                     "case_ids_sha256": hashlib.sha256(case_list.encode()).hexdigest()[:16]},
            "unit": unit, "settings": names,
            "options": {"memory_slots": slots, "min_confidence": min_confidence,
                        "chain": chain},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu": platform.machine(), "threads": torch.get_num_threads(),
                        "cuda": torch.cuda.is_available()},
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
    }
