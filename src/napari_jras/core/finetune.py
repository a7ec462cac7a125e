"""Fine-tuning a workspace: the whole bank replayed, fresh corrections oversampled.

The implementation behind :meth:`Workspace.finetune`:

1. under the workspace lock, take a snapshot of the exemplars (ids, pixels, provenance) and
   load a private copy of the active weights; predictions and new corrections go on meanwhile;
2. train the copy with :class:`JointTrainer` (alternating supervised and contrastive steps,
   no exemplar of a query's own patient retrieved), checkpointing into ``finetune/`` so that a
   killed or cancelled run resumes where it stopped (same parent, settings and exemplars) or is
   discarded;
3. write ``versions/vNNN`` through a temporary folder, then, under the lock, re-embed the bank
   with the new retriever (corrections accepted during training included), make the version
   active and hand the weights to the engine.

J-RAS workspaces train on every bank exemplar (old ones replayed, so earlier cases are not
forgotten); baseline workspaces, which have no bank, train the backbone on the stored corrections.

Fine-tuning uses only the workspace's public methods (:class:`TunableWorkspace`) and does not
import :mod:`.workspace`, which imports it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .checkpoint import atomic_write_json, load_model, save_model
from .data import SliceSample, resize_images, resize_labels
from .errors import CancelledError, DataError, JRASError
from .model import JRASModel, ModelConfig
from .progress import CancelFn, Progress, ProgressFn
from .run_files import (
    CHECKPOINT_GLOB,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    TRAIN_CONFIG_FILE,
)
from .train import JointTrainer, SliceSet, TrainConfig
from .workspace_records import CORRECTION, VERSIONS_DIR, ExemplarSnapshot, ModelVersion

log = logging.getLogger(__name__)
FINETUNE_DIR = "finetune"
FINETUNE_FILE = "finetune.json"
JOB_FILE = "job.json"
LR_FACTOR = 0.2  # fine-tuning learning rate relative to the original training's


class TunableWorkspace(Protocol):
    """What fine-tuning needs of a workspace (:class:`~.workspace.Workspace` provides it)."""

    path: Path

    @property
    def model_config(self) -> ModelConfig:
        """Configuration of the active version."""

    def versions(self) -> list[ModelVersion]:
        """Every weight version, oldest first."""

    def snapshot(self) -> ExemplarSnapshot:
        """The active version and every stored exemplar, read at one instant."""

    def finetune_slot(self, busy: str) -> AbstractContextManager[None]:
        """Hold the one fine-tune slot (:class:`JRASError` ``busy`` when it is taken)."""

    def next_version_name(self) -> str:
        """The name of the next version folder under ``versions/``."""

    def install_version(self, model: JRASModel, folder: Path, parent: str, note: str,
                        metrics: dict[str, Any], seen_until: int,
                        known: dict[int, np.ndarray] | None = None,
                        progress: ProgressFn | None = None) -> ModelVersion:
        """Adopt a finished version folder: embed the bank, make it the active version.

        Args:
            model, folder, parent, note, metrics, seen_until, known, progress: see
                :meth:`napari_jras.core.workspace.Workspace.install_version`.
        """


@dataclass
class Snapshot:
    """The exemplars a fine-tune trains on, taken at its start."""

    parent: ModelVersion
    ids: list[int]
    samples: list[SliceSample]
    origins: list[str]


def correction_weights(origins: Sequence[str], oversample: float) -> np.ndarray:
    """Sampling weight per exemplar: ``oversample`` for corrections, 1 for every other one.

    Args:
        origins: the exemplars' origins (``training``, ``correction``, ``import``).
        oversample: the corrections' weight (at least 1; :class:`DataError` otherwise).

    Returns:
        One float weight per exemplar.
    """
    if not oversample >= 1.0:
        raise DataError(f"oversample must be at least 1 (1 = no oversampling), got {oversample}")
    return np.where(np.asarray(origins) == CORRECTION, float(oversample), 1.0)


def take_snapshot(ws: TunableWorkspace) -> Snapshot:
    """Exemplars (at the model size) and the active version, read under the workspace lock.

    Args:
        ws: the workspace.

    Returns:
        The snapshot (:class:`DataError` when the workspace holds no exemplar).
    """
    size = (ws.model_config.size,) * 2
    stored = ws.snapshot()
    ids, records = stored.ids, stored.records
    if not len(ids):
        raise DataError("There is nothing to fine-tune on: accept corrected masks first")
    by_id = {r["id"]: r for r in records}
    images, masks = resize_images(stored.images, size), resize_labels(stored.masks, size)
    samples = [SliceSample(image, mask, by_id[i]["case_id"], by_id[i]["patient_id"],
                           by_id[i]["slice_index"], by_id[i]["source"])
               for i, image, mask in zip(ids.tolist(), images, masks, strict=True)]
    return Snapshot(stored.active, ids.tolist(), samples,
                    [by_id[i]["origin"] for i in ids.tolist()])


def finetune_config(ws: TunableWorkspace, steps: int, batch_size: int, device: str,
                    lr: float | None) -> TrainConfig:
    """The original training settings (of ``v000``), adapted to a short fine-tune.

    Args:
        ws: the workspace (its first version's ``train_config.json`` gives the settings;
            defaults when it is missing or unreadable).
        steps: the fine-tune's steps.
        batch_size: its batch size.
        device: its device.
        lr: its learning rate (None: the original one times :data:`LR_FACTOR`).

    Returns:
        The fine-tune's settings.
    """
    file = ws.versions()[0].path / TRAIN_CONFIG_FILE
    known = {f.name for f in fields(TrainConfig)}
    try:
        saved = json.loads(file.read_text()).get("train", {}) if file.is_file() else {}
        base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    except (ValueError, TypeError, AttributeError, JRASError):
        base = TrainConfig()
    return replace(base, steps=steps, batch_size=batch_size, device=device,
                   lr=lr if lr is not None else base.lr * LR_FACTOR, warmup_fraction=0.1,
                   retriever_warmup_steps=0, refresh_every=0, val_every=0,
                   log_every=max(1, min(10, steps // 20)), checkpoint_every=max(10, steps // 4))


def finetune_workspace(ws: TunableWorkspace, steps: int = 100, oversample: float = 4.0,
                       batch_size: int = 8, device: str = "auto",
                       progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                       lr: float | None = None, resume: bool = True,
                       note: str = "") -> ModelVersion:
    """Fine-tune the active version into a new, active version (see the module docstring).

    ``progress`` receives the trainer's :class:`~.progress.Progress` events with stage
    "finetune" (``loss`` among the metrics, ``eta_s``) and then "embed"; ``cancel()``
    returning True stops the run with :class:`CancelledError`: the active version stays, no
    version is written, the checkpoint is kept for resuming (``resume=False`` or
    :meth:`Workspace.discard_finetune` drop it).

    Args:
        ws: the workspace.
        steps: optimisation steps.
        oversample: sampling weight of a correction relative to any other exemplar.
        batch_size: the batch size.
        device: the training device (``auto``, ``cpu``, ``cuda``...).
        progress: receives the progress records.
        cancel: polled after each step; True stops the run.
        lr: the learning rate (None: the original training's times :data:`LR_FACTOR`).
        resume: continue the checkpointed run of the same job, if there is one.
        note: the user's note on the new version.

    Returns:
        The new version, now the active one.

    Raises:
        JRASError: another fine-tune of this workspace is running.
        DataError: the workspace holds no exemplar, or ``oversample`` < 1.
        CancelledError: ``cancel()`` returned True.
    """
    with ws.finetune_slot("A fine-tune of this workspace is already running"):
        return _finetune(ws, steps, oversample, batch_size, device, progress,
                         cancel or (lambda: False), lr, resume, note)


def _finetune(ws: TunableWorkspace, steps: int, oversample: float, batch_size: int, device: str,
              progress: ProgressFn | None, cancel: CancelFn, lr: float | None, resume: bool,
              note: str) -> ModelVersion:
    started = time.time()
    snap = take_snapshot(ws)
    weights = correction_weights(snap.origins, oversample)
    config = finetune_config(ws, steps, batch_size, device, lr)
    job = {"parent": snap.parent.name, "ids": snap.ids, "oversample": float(oversample),
           "train": asdict(config)}
    job_dir = _job_dir(ws.path / FINETUNE_DIR, job, resume)

    def make_trainer() -> JointTrainer:
        model = load_model(snap.parent.path)  # a private copy: the engine keeps predicting
        return JointTrainer(model, SliceSet(snap.samples, model.num_classes), config,
                            run_dir=job_dir, sample_weights=weights.tolist(),
                            progress=_relay(progress), cancel=cancel)

    trainer = make_trainer()
    try:
        trainer.resume()
    except (JRASError, OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("Starting the fine-tune afresh: its checkpoint cannot be resumed (%s)", exc)
        _job_dir(job_dir, job, resume=False)
        trainer = make_trainer()
    history = trainer.fit()
    if trainer.step < config.steps or cancel():
        raise CancelledError("Fine-tuning was cancelled: the active model is unchanged "
                             "(the next fine-tune resumes from the last checkpoint)")
    model = trainer.model.cpu().eval()
    known = None
    if trainer.bank_emb is not None:
        known = dict(zip(snap.ids, trainer.bank_emb.cpu().numpy(), strict=True))
    corrections = int(sum(o == CORRECTION for o in snap.origins))
    losses = [r["loss"] for r in history if "loss" in r]
    metrics = {"steps": trainer.step, "exemplars": len(snap.ids), "corrections_used": corrections,
               "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None}
    folder = _write_version(ws, model, {
        "parent": snap.parent.name, "steps": trainer.step, "oversample": oversample,
        "batch_size": batch_size, "lr": config.lr, "device": str(trainer.device),
        "exemplars": len(snap.ids), "corrections_used": corrections,
        "correction_ids": [i for i, o in zip(snap.ids, snap.origins, strict=True) if o == CORRECTION],
        "wall_time_s": round(time.time() - started, 1), "train": asdict(config),
        "losses": history})
    version = ws.install_version(model, folder, snap.parent.name, note, metrics,
                                 seen_until=max(snap.ids), known=known, progress=progress)
    shutil.rmtree(job_dir, ignore_errors=True)
    return version


def pending_job(root: Path) -> dict[str, Any] | None:
    """Parent, steps and step reached of the checkpointed job in ``root``, or None.

    Args:
        root: the workspace's ``finetune/`` folder.

    Returns:
        ``{"parent", "steps", "step"}``, or None when no checkpoint of a job is there.
    """
    try:
        job = json.loads((root / JOB_FILE).read_text())
        done = sorted((root / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB))
        if not done:
            return None
        return {"parent": job["parent"], "steps": job["train"]["steps"],
                "step": int(done[-1].name.removeprefix(CHECKPOINT_PREFIX))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _job_dir(root: Path, job: dict[str, Any], resume: bool) -> Path:
    """The checkpoint folder: kept when it belongs to the same job (resume), else emptied."""
    file = root / JOB_FILE
    try:
        same = resume and json.loads(file.read_text()) == json.loads(json.dumps(job))
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(root, ignore_errors=True)
        atomic_write_json(file, job)
    return root


def _write_version(ws: TunableWorkspace, model: JRASModel, info: dict[str, Any]) -> Path:
    """Save weights + ``finetune.json`` as ``versions/vNNN`` (temporary folder, then rename)."""
    name = ws.next_version_name()
    final = ws.path / VERSIONS_DIR / name
    tmp = final.with_name(f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model)
    atomic_write_json(tmp / FINETUNE_FILE, info)
    tmp.rename(final)
    return final


def _relay(progress: ProgressFn | None) -> ProgressFn | None:
    """The trainer's events as fine-tune progress: its "train" stage is named "finetune"."""
    if progress is None:
        return None

    def relay(event: Progress) -> None:
        progress(replace(event, stage="finetune") if event.stage == "train" else event)

    return relay
