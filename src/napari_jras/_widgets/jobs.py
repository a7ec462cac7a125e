"""The assistant's background jobs and model summary (Qt-free: they run in worker threads).

Every job takes plain arrays and a :class:`~napari_jras.core.workspace.Workspace` and returns
plain results; the panels move them between napari layers and these functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core import bank_tools, modality_bank
from ..core.bank import ExemplarBank
from ..core.errors import JRASError
from ..core.prediction import Prediction
from ..core.progress import CancelFn, Progress, ProgressFn
from ..core.propagate import Propagation, propagate
from ..core.run_files import TRAIN_CONFIG_FILE
from ..core.workspace import BUILTIN, Workspace
from ..core.zero_shot import segment_with_boxes
from .edits import Draft


@dataclass
class Segmented:
    """One image's result of :func:`segment_job`."""

    name: str
    prediction: Prediction
    draft: Draft | None
    device: str
    seconds: float


def segment_job(workspace: Workspace | None, source: str, jobs: list[dict[str, Any]], device: str,
                progress: ProgressFn, cancel: CancelFn) -> tuple[Workspace, list[Segmented]]:
    """Open the workspace if needed and predict every image.

    Args:
        workspace: the open workspace, or None to open ``source``.
        source: the model (run folder or ``builtin``) to open when there is no workspace.
        jobs: one dict per image: ``name, image, modality, slices, case_id, memory_slots,
            draft_key, want_draft``.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: receives ``segment`` events counting slices over all images.
        cancel: polled between batches.

    Returns:
        The workspace and one :class:`Segmented` per image.
    """
    ws = workspace or Workspace.open(source)
    engine = ws.engine(device)
    results = []
    for i, job in enumerate(jobs):
        started = time.perf_counter()
        memory = ws.volume_memory(job["case_id"], np.shape(job["image"]), job["memory_slots"])

        def overall(event: Progress, i: int = i, name: str = job["name"]) -> None:
            progress(Progress("segment", i * event.total + event.done, len(jobs) * event.total,
                              detail=name))

        pred = ws.predict(job["image"], modality=job["modality"], slices=job["slices"],
                          progress=overall, cancel=cancel, memory=memory)
        draft = ws.load_draft(job["draft_key"]) if job["want_draft"] else None
        results.append(Segmented(job["name"], pred, draft, str(engine.device),
                                 time.perf_counter() - started))
    return ws, results


def propagate_job(ws: Workspace, image: np.ndarray, modality: str | None, case_id: str,
                  start: int, painted: dict[int, np.ndarray], protected: list[int], slots: int,
                  min_confidence: float, stop_on_empty: bool,
                  progress: ProgressFn, cancel: CancelFn) -> Propagation:
    """Propagate from slice ``start`` with the case's accepted corrections as memory.

    Args:
        ws: the workspace.
        image: the (Z, H, W) volume.
        modality: its modality, or None for the model's.
        case_id: the case whose accepted corrections guide the prediction.
        start: the slice to start from.
        painted: the painted, not yet accepted start slice (``{start: labels}``) or empty.
        protected: slices never predicted (the person's other edits).
        slots: how many nearest annotated slices guide each prediction.
        min_confidence: the stop threshold (see :func:`~napari_jras.core.propagate.propagate`).
        stop_on_empty: stop a direction after an empty slice.
        progress: receives ``propagate`` events.
        cancel: polled between slices.

    Returns:
        The propagation result.
    """
    accepted, records = ws.accepted_slices(case_id, np.shape(image)[1:])
    for z in painted:
        records[z] = {"case_id": case_id, "not_accepted": True}
    return propagate(ws, image, {**accepted, **painted}, start, protected=protected, slots=slots,
                     modality=modality, case_id=case_id, records=records,
                     min_confidence=min_confidence, stop_on_empty=stop_on_empty,
                     progress=progress, cancel=cancel)


def box_job(image2d: np.ndarray, boxes: list[list[float]], labels: list[int]) -> np.ndarray:
    """LiteMedSAM's label map of one slice from box prompts (box i paints ``labels[i]``)."""
    return segment_with_boxes(image2d, boxes, labels=labels)


def accept_job(ws: Workspace, **kwargs: Any) -> dict[str, Any]:
    """Store corrected slices (``kwargs`` of :meth:`Workspace.accept`).

    Returns:
        ``ids`` (the new exemplars), ``bank`` (its size, None for a baseline model),
        ``corrections`` (accepted so far) and ``pending`` (not yet fine-tuned on).
    """
    ids = ws.accept(**kwargs)
    return {"ids": ids, "bank": len(ws.bank) if ws.bank is not None else None,
            "corrections": len(ws.corrections()), "pending": ws.corrections_since_finetune}


def modality_accept_job(bank: ExemplarBank | None, name: str, class_names: list[str],
                        **kwargs: Any) -> dict[str, Any]:
    """Store accepted slices in the modality bank ``name`` (no model loaded: the box start).

    Args:
        bank: the modality bank already open, or None.
        name: the bank's name; opened (or created with ``class_names``) here unless ``bank``
            is that bank.
        class_names: the labels' classes, background first.
        **kwargs: of :func:`~napari_jras.core.modality_bank.add_accepted`.

    Returns:
        ``ids`` (the new exemplars), ``size`` (the bank's size now), ``bank`` (the open bank)
        and ``name``.
    """
    opened = bank is None or bank.path != modality_bank.bank_dir(name)
    if opened:
        bank = modality_bank.open_bank(name, class_names)
    try:
        ids = modality_bank.add_accepted(bank, **kwargs)
    except BaseException:
        if opened:
            bank.close()
        raise
    return {"ids": ids, "size": len(bank), "bank": bank, "name": name}


def add_folder_job(ws: Workspace, folder: str, device: str) -> tuple[int, int]:
    """Add a folder of labelled cases to the workspace bank.

    Returns:
        (exemplars added, bank size).
    """
    if ws.bank is None:
        raise JRASError("A baseline model has no exemplar bank: choose a J-RAS model")
    bank, ids = bank_tools.add_cases(ws.bank.path, ws.active.path, folder, origin="import",
                                     device=device)
    bank.close()
    return len(ids), len(ws.bank)


def workspace_summary(ws: Workspace) -> str:
    """HTML lines: model, active version, training data, bank contents, corrections."""
    cfg = ws.model_config
    kind = f"J-RAS, K={cfg.k}" if cfg.use_retrieval else "baseline (no retrieval)"
    source = "built-in cardiac MRI model" if ws.source == BUILTIN else ws.source
    active = ws.active
    lines = [(f"<b>Model</b> {source}<br>{cfg.backbone}, {kind}, {cfg.size} px, "
              f"{cfg.num_classes} classes"),
             f"<b>Version</b> {active.name} of {len(ws.versions())} ({active.created})"
             + (f": {active.note}" if active.note else "")]
    data = training_data([ws.active.path, *(v.path for v in ws.versions())])
    if data:
        lines.append(f"<b>Training data</b> {data.get('cases', '?')} cases, "
                     f"{data.get('patients', '?')} patients, {data.get('slices', '?')} slices")
    if ws.bank is not None:
        origins = bank_tools.summary(ws.bank)["origins"]
        lines.append(f"<b>Bank</b> {len(ws.bank)} exemplars: "
                     + ", ".join(f"{n} {o}" for o, n in sorted(origins.items())))
    lines.append(f"<b>Corrections</b> {len(ws.corrections())} accepted, "
                 f"{ws.corrections_since_finetune} not yet fine-tuned on")
    return "<br>".join(lines)


def training_data(folders: list[str | Path]) -> dict[str, Any]:
    """The ``data`` summary (cases, patients, slices) of the first folder with a training config.

    Args:
        folders: model version folders, in the order to look.

    Returns:
        The summary, or ``{}`` when no folder has a readable ``train_config.json``.
    """
    for folder in folders:
        file = Path(folder) / TRAIN_CONFIG_FILE
        if file.is_file():
            try:
                return json.loads(file.read_text()).get("data") or {}
            except (OSError, ValueError):
                return {}
    return {}
