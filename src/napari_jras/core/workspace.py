"""Workspaces: a user-writable copy of a model that learns from accepted corrections.

``Workspace.open(source)`` copies a run folder (or the bundled cardiac MRI model) once into
``<home>/workspaces/<slug>/`` and reopens that copy afterwards::

    workspace.json       source, creation time, active version, version history (atomic writes)
    versions/vNNN/       config.json + model.safetensors (+ train_config.json | finetune.json)
    bank/                the working exemplar bank (J-RAS): training exemplars + corrections
    corrections/         baseline models only: a bank without embeddings that keeps the accepted
                         corrections for fine-tuning (a baseline model retrieves nothing)
    embeddings/<v>.npz   bank embeddings of earlier retriever versions (exact, instant roll-back)
    drafts/<key>.npz     autosaved, unfinished label edits
    finetune/            checkpoints of an unfinished fine-tune (resumed or discarded)

Never imports Qt. Thread-safe: prediction, accepting, activation and the end of a fine-tune share
one lock; a fine-tune trains a private copy of the model outside it (see :mod:`.finetune`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .bank import DB_FILE, ExemplarBank
from .checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_write_json,
    load_model,
    read_config,
)
from .corrections import now, prepare, store
from .data import resize_labels
from .drafts import DraftStore
from .engine import BANK_DIR, InferenceEngine
from .errors import BankError, JRASError, ModelError
from .finetune import FINETUNE_DIR, finetune_workspace, pending_job
from .model import JRASModel, ModelConfig
from .prediction import Prediction
from .progress import CancelFn, ProgressFn
from .run_files import TRAIN_CONFIG_FILE
from .volume_memory import VolumeMemory
from .workspace_embeddings import embed_bank
from .workspace_records import (
    CORRECTION,
    VERSION_NAME,
    VERSIONS_DIR,
    ExemplarSnapshot,
    ModelVersion,
)

BUILTIN = "builtin"
BUILTIN_SLUG = "builtin-cardiac-mri"
HOME_ENV = "NAPARI_JRAS_HOME"
FORMAT = "napari-jras-workspace"
FORMAT_VERSION = 1
WORKSPACE_FILE = "workspace.json"
CORRECTIONS_DIR = "corrections"
EMBEDDINGS_DIR = "embeddings"
DRAFTS_DIR = "drafts"
OWN_CORRECTION = "your correction"
"""Gallery origin of an exemplar that is one of the user's accepted slices of the same volume."""



def home_dir() -> Path:
    """``$NAPARI_JRAS_HOME`` when set, else ``~/.napari-jras``."""
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else Path.home() / ".napari-jras"


def builtin_model_dir() -> Path:
    """Run folder of the bundled cardiac MRI model (:class:`ModelError` when not installed)."""
    import napari_jras

    path = Path(napari_jras.__file__).parent / "_builtin" / "cardiac_mri"
    if not (path / CONFIG_FILE).is_file():
        raise ModelError(f"The bundled cardiac MRI model is not installed (expected it in {path}): "
                         "reinstall napari-jras, or open a model folder of your own")
    return path


def _slug(run: Path) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", run.name.lower()).strip("-")[:40] or "model"
    return f"{name}-{hashlib.sha256(str(run).encode()).hexdigest()[:8]}"


class Workspace:
    """A user-writable copy of a model: weight versions, working exemplar bank, autosaved drafts."""

    def __init__(self, path: Path) -> None:
        """Load an existing workspace folder (use :meth:`open`)."""
        self.path = Path(path)
        self._lock = threading.RLock()
        self._finetune_lock = threading.Lock()
        self._drafts = DraftStore(self.path / DRAFTS_DIR)
        meta = _read_meta(self.path)
        self.source: str = meta["source"]
        self.created: str = meta["created"]
        self._versions = [ModelVersion(path=self.path / VERSIONS_DIR / v["name"], **v)
                          for v in meta["versions"]]
        self._active = meta["active"]
        self._config = read_config(self.active.path)
        self._engine: InferenceEngine | None = None
        self._engine_device = "auto"
        self._bank = ExemplarBank.open(self.path / BANK_DIR) if self._config.use_retrieval else None
        self._store = self._bank or ExemplarBank.open(self.path / CORRECTIONS_DIR)

    # --- creating and opening -------------------------------------------------------------
    @classmethod
    def open(cls, source: str | Path = BUILTIN, home: Path | None = None) -> Workspace:
        """The workspace of ``source`` (a run folder or :data:`BUILTIN`), created on first use.

        Args:
            source: a run folder, :data:`BUILTIN` (the bundled model) or a workspace folder,
                which is opened as it is.
            home: the folder holding ``workspaces/`` (default :func:`home_dir`).

        Returns:
            The open workspace (:class:`ModelError` when ``source`` cannot be used).
        """
        if str(source) != BUILTIN and (Path(source) / WORKSPACE_FILE).is_file():
            return cls(Path(source))
        run = None if str(source) == BUILTIN else Path(source).expanduser().resolve()
        slug = BUILTIN_SLUG if run is None else _slug(run)
        path = Path(home if home is not None else home_dir()).expanduser() / "workspaces" / slug
        if not (path / WORKSPACE_FILE).is_file():
            if path.exists():
                raise ModelError(f"{path} exists but is not a napari-jras workspace: move it away")
            _create(path, BUILTIN if run is None else str(run),
                    builtin_model_dir() if run is None else run)
        return cls(path)

    def close(self) -> None:
        """Release the bank(s); the workspace object cannot be used afterwards."""
        with self._lock:
            self._store.close()
            self._engine = None

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- model and versions ---------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        """Configuration of the active version."""
        return self._config

    @property
    def class_names(self) -> list[str]:
        """Class names, background first."""
        return list(self._config.class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (background included)."""
        return self._config.num_classes

    @property
    def bank(self) -> ExemplarBank | None:
        """The working exemplar bank (None for a baseline model)."""
        return self._bank

    def versions(self) -> list[ModelVersion]:
        """Every weight version, oldest first."""
        return list(self._versions)

    @property
    def active(self) -> ModelVersion:
        """The version used for prediction."""
        return self._version(self._active)

    def _version(self, name: str) -> ModelVersion:
        for version in self._versions:
            if version.name == name:
                return version
        raise ModelError(f"This workspace has no version '{name}' "
                         f"(it has {', '.join(v.name for v in self._versions)})")

    def engine(self, device: str = "auto") -> InferenceEngine:
        """The inference engine of the active version (cached; rebuilt for another device)."""
        with self._lock:
            if self._engine is None or device != self._engine_device:
                model = load_model(self.active.path)
                self._engine = InferenceEngine(model, self._bank, device=device)
                self._engine_device = device
            return self._engine

    def predict(self, image: np.ndarray, modality: str | None = None,
                slices: Sequence[int] | None = None,
                progress: ProgressFn | None = None,
                cancel: CancelFn | None = None,
                return_probabilities: bool = False,
                memory: VolumeMemory | None = None) -> Prediction:
        """Segment ``image`` (2-D or 3-D Z-first) with the active version and the working bank.

        Args:
            image: the image, 2-D or 3-D (Z first).
            modality: its intensity normalisation (default: the model's modality).
            slices: the Z slices to segment (default: all).
            progress: called with (slices done, slices to do).
            cancel: polled between batches; True stops with :class:`JRASError`.
            return_probabilities: also return the class probabilities.
            memory: annotated slices of this volume that guide the others first (see
                :meth:`volume_memory`).

        Returns:
            The labels, the retrieved exemplars per slice and, if asked, the probabilities
            (:class:`~.engine.Prediction`).
        """
        with self._lock:
            return self.engine(self._engine_device).predict(
                image, modality=modality, slices=slices, progress=progress, cancel=cancel,
                return_probabilities=return_probabilities, memory=memory)

    def accepted_slices(self, case_id: str, shape: Sequence[int]
                        ) -> tuple[dict[int, np.ndarray], dict[int, dict[str, Any]]]:
        """The accepted corrections of ``case_id``: (H, W) ``shape`` label map per slice, and
        per slice what the gallery shows of it (correction id, author, accept time)."""
        records = {r["slice_index"]: r for r in self.corrections()
                   if r["case_id"] == case_id and r.get("slice_index") is not None}
        if not records:
            return {}, {}
        zs = sorted(records)
        masks = resize_labels(self._store.masks([records[z]["id"] for z in zs]),
                              (int(shape[0]), int(shape[1])))
        info = {z: {"correction_id": records[z]["id"], "case_id": case_id,
                    "author": records[z].get("author"), "created": records[z].get("created")}
                for z in zs}
        return {z: masks[i].astype(np.uint8) for i, z in enumerate(zs)}, info

    def volume_memory(self, case_id: str, shape: Sequence[int], slots: int = 2,
                      extra: dict[int, np.ndarray] | None = None) -> VolumeMemory | None:
        """Same-volume priority: the accepted corrections of ``case_id`` as the memory of a
        prediction of its (Z, H, W) ``shape`` volume.

        Args:
            case_id: the volume's case id.
            shape: the volume's (Z, H, W) shape.
            slots: how many exemplar slots the memory fills (0: no memory).
            extra: slices painted but not accepted yet (Z -> (H, W) labels).

        Returns:
            The memory, or None when ``slots`` is 0 or there is no slice to remember.
        """
        if slots <= 0 or len(shape) != 3:
            return None
        labels, records = self.accepted_slices(case_id, shape[1:])
        labels = {z: m for z, m in labels.items() if 0 <= z < shape[0]}
        for z in extra or {}:
            records[z] = {"case_id": case_id, "not_accepted": True}
        labels.update(extra or {})
        if not labels:
            return None
        return VolumeMemory(labels, slots=slots, origin=OWN_CORRECTION, records=records,
                            case_id=case_id)

    def activate(self, name: str, progress: ProgressFn | None = None) -> None:
        """Make version ``name`` the active one (roll back or forward); the bank follows it.

        Args:
            name: the version (``v000``...; :class:`ModelError` when there is none).
            progress: receives the bank's re-embedding progress (nothing to do when the
                version's retriever embedded it before: the stashed embeddings are restored).
        """
        version = self._version(name)
        with self._lock:
            model = load_model(version.path)
            if self._engine is not None:
                self._engine.set_model(model)
            if self._bank is not None:
                embed_bank(self._bank, model, self.path / EMBEDDINGS_DIR, progress=progress)
            self._active, self._config = name, model.config
            self._save_meta()

    # --- corrections ----------------------------------------------------------------------
    def accept(self, image: np.ndarray, labels: np.ndarray, slices: Sequence[int] | None = None,
               modality: str | None = None, source: str = "", case_id: str = "",
               author: str = "", patient_id: str | None = None) -> list[int]:
        """Store a corrected mask (searchable by the next predict).

        Accepting a (case, slice) again replaces it. Baseline workspaces keep corrections in
        ``corrections/`` for fine-tuning.

        Args:
            image: the full 2-D or 3-D (Z-first) image.
            labels: its corrected labels, same shape.
            slices: the Z slices to store (default: every slice with foreground; the one slice
                of a 2-D image).
            modality: the image's intensity normalisation (default: the model's).
            source: the image file's name, recorded as provenance.
            case_id: default: the source's file stem (without ``_image``).
            author: who corrected it.
            patient_id: default: the case id's patient part (``patient045_frame01`` ->
                ``patient045``), whose exemplars fine-tuning keeps out of this correction's
                retrievals.

        Returns:
            The new exemplar ids.
        """
        corrections = prepare(image, labels, self.num_classes, self._store.size,
                              modality or self._config.modality, slices, source, case_id,
                              author, patient_id, extra={"model_version": self._active})
        with self._lock:
            embeddings, version = self._embeddings_for(corrections.images)
            return store(self._store, corrections, embeddings, version)

    def _embeddings_for(self, stored: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """Embeddings for new exemplars, or (None, None) when the bank awaits re-embedding."""
        if self._bank is None:
            return None, None
        engine = self.engine(self._engine_device)
        if self._bank.needs_embedding(engine.version):
            return None, None
        return engine.embed_for_bank(stored), engine.version

    def corrections(self) -> list[dict[str, Any]]:
        """Records (id + provenance) of every accepted correction, oldest first."""
        return [r for r in self._store.records() if r["origin"] == CORRECTION]

    @property
    def corrections_since_finetune(self) -> int:
        """Corrections the active version was not trained on."""
        seen = self.active.seen_until
        return sum(1 for r in self.corrections() if r["id"] > seen)

    # --- drafts ---------------------------------------------------------------------------
    def save_draft(self, key: str, labels: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Autosave unfinished labels (and JSON-able ``meta``) under ``key``, atomically.

        Args:
            key, labels, meta: see :meth:`napari_jras.core.drafts.DraftStore.save`.
        """
        self._drafts.save(key, labels, meta)

    def load_draft(self, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The draft saved under ``key`` as (labels, meta), or None when there is none."""
        return self._drafts.load(key)

    def drafts(self) -> list[str]:
        """Keys of the saved drafts, sorted."""
        return self._drafts.keys()

    def discard_draft(self, key: str) -> None:
        """Delete the draft ``key`` (no error when there is none)."""
        self._drafts.discard(key)

    # --- fine-tuning ----------------------------------------------------------------------
    def finetune(self, steps: int = 100, oversample: float = 4.0, batch_size: int = 8,
                 device: str = "auto", progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, lr: float | None = None, resume: bool = True,
                 note: str = "") -> ModelVersion:
        """Fine-tune the active version on the bank (corrections oversampled) into a new version.

        Safe to run in a worker thread while other threads predict and accept.

        Args:
            steps, oversample, batch_size, device, progress, cancel, lr, resume, note: see
                :func:`napari_jras.core.finetune.finetune_workspace`.

        Returns:
            The new version, now the active one.
        """
        return finetune_workspace(self, steps=steps, oversample=oversample, batch_size=batch_size,
                                  device=device, progress=progress, cancel=cancel, lr=lr,
                                  resume=resume, note=note)

    def pending_finetune(self) -> dict[str, Any] | None:
        """The interrupted fine-tune the next one resumes: parent, steps, step reached (or None)."""
        return pending_job(self.path / FINETUNE_DIR)

    def discard_finetune(self) -> None:
        """Delete the checkpoints of an interrupted fine-tune (the next one starts afresh)."""
        with self.finetune_slot("A fine-tune of this workspace is running: cancel it first"):
            shutil.rmtree(self.path / FINETUNE_DIR, ignore_errors=True)

    @contextmanager
    def finetune_slot(self, busy: str) -> Iterator[None]:
        """Hold the workspace's one fine-tune slot for the ``with`` block.

        Args:
            busy: the message of the :class:`JRASError` raised when a fine-tune holds it.
        """
        if not self._finetune_lock.acquire(blocking=False):
            raise JRASError(busy)
        try:
            yield
        finally:
            self._finetune_lock.release()

    def snapshot(self) -> ExemplarSnapshot:
        """The active version and every stored exemplar (records and pixels), read under the
        lock so that no prediction, correction or activation changes them half way."""
        with self._lock:
            parent = self.active
            records = self._store.records()
            ids, images, masks = self._store.load_all()
        return ExemplarSnapshot(parent, records, ids, images, masks)

    def next_version_name(self) -> str:
        """The name of the next version folder (``v001``...), free in the list and on disk."""
        taken = {v.name for v in self._versions}
        taken |= {p.name for p in (self.path / VERSIONS_DIR).iterdir()}
        numbers = [int(n[1:]) for n in taken if re.fullmatch(r"v\d+", n)]
        return f"v{max(numbers, default=-1) + 1:03d}"

    def install_version(self, model: JRASModel, folder: Path, parent: str, note: str,
                        metrics: dict[str, Any], seen_until: int,
                        known: dict[int, np.ndarray] | None = None,
                        progress: ProgressFn | None = None) -> ModelVersion:
        """Adopt a finished version folder (under ``versions/``): embed the bank, activate it.

        Args:
            model: the version's weights (handed to the engine).
            folder: its folder, ``versions/<name>`` (see :meth:`next_version_name`).
            parent: the version it was trained from.
            note: the user's note.
            metrics: what its training reports (steps, losses...).
            seen_until: the last exemplar id it was trained on.
            known: bank embeddings already computed with its retriever, by exemplar id.
            progress: receives the bank's re-embedding progress.

        Returns:
            The new version, now the active one.
        """
        with self._lock:
            if self._engine is not None:
                self._engine.set_model(model)
            if self._bank is not None:
                embed_bank(self._bank, model, self.path / EMBEDDINGS_DIR, known, progress)
            version = ModelVersion(folder.name, folder, now(), parent, note, metrics, seen_until)
            self._versions.append(version)
            self._active, self._config = version.name, model.config
            self._save_meta()
        return version

    # --- internals ------------------------------------------------------------------------
    def _save_meta(self) -> None:
        atomic_write_json(self.path / WORKSPACE_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "source": self.source,
            "created": self.created, "active": self._active,
            "versions": [v.to_json() for v in self._versions]})


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / WORKSPACE_FILE
    try:
        meta = json.loads(file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError("not a workspace file")
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise ModelError(f"The workspace {path} was made by a newer napari-jras: upgrade it")
        if meta["active"] not in {v["name"] for v in meta["versions"]}:
            raise ValueError(f"the active version {meta['active']!r} is not listed")
        bad = [v["name"] for v in meta["versions"]
               if not isinstance(v["name"], str) or not VERSION_NAME.match(v["name"])]
        if bad:  # a name is a folder under versions/: never let it point elsewhere
            raise ValueError(f"version name {bad[0]!r} is not of the form v000")
        return meta
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is not a napari-jras workspace (no {WORKSPACE_FILE})") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"The workspace file {file} is damaged ({exc})") from exc


def _create(path: Path, source: str, run: Path) -> None:
    """Copy the run folder ``run`` into a new workspace at ``path`` (all or nothing)."""
    model = load_model(run)  # validates config and weights; clear ModelError otherwise
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        first = tmp / VERSIONS_DIR / "v000"
        first.mkdir(parents=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(run / name, first / name)
        _copy_train_config(run / TRAIN_CONFIG_FILE, first / TRAIN_CONFIG_FILE)
        cfg = model.config
        if cfg.use_retrieval:
            _copy_bank(run / BANK_DIR, tmp / BANK_DIR, model)
        else:
            ExemplarBank.create(tmp / CORRECTIONS_DIR, size=cfg.size, num_classes=cfg.num_classes,
                                embed_dim=1, class_names=cfg.class_names).close()
        version = ModelVersion("v000", first, now(), note=f"copy of {source}")
        atomic_write_json(tmp / WORKSPACE_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
            "created": version.created, "active": "v000", "versions": [version.to_json()]})
        try:
            tmp.rename(path)
        except OSError:
            if not (path / WORKSPACE_FILE).is_file():  # else another process made it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_train_config(src: Path, dst: Path) -> None:
    """Copy a run's training record with data folders reduced to their names (no paths)."""
    try:
        record = json.loads(src.read_text())
        data = record.get("data")
        if isinstance(data, dict) and data.get("path"):
            data["path"] = Path(str(data["path"])).name
        if record.get("val"):
            record["val"] = Path(str(record["val"])).name
    except (OSError, ValueError, AttributeError):
        return  # the record is optional (fine-tuning then starts from default settings)
    atomic_write_json(dst, record)


def _copy_bank(src: Path, dst: Path, model: JRASModel) -> None:
    if not (src / DB_FILE).is_file():
        raise BankError(f"{src.parent} is a J-RAS model but has no exemplar bank ({src}): "
                        "copy the run folder together with its bank")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*-shm", ".*.partial"))
    try:
        with ExemplarBank.open(dst) as bank:
            InferenceEngine(model, bank, device="cpu")  # same classes and embedding size
            if len(bank) == 0:
                raise BankError("it is empty")
    except BankError as exc:
        raise BankError(f"The exemplar bank of {src.parent} cannot be used: {exc}") from exc
