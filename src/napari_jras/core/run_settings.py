"""Guarded resuming of a training run folder: resume only what the same settings started.

A run folder records the settings its training started with in ``run_settings.json`` (model
config, train config, and the training data: case-list hash and patient regex). ``train --out``
into a folder with checkpoints or a model resumes only when every setting that affects training
matches; otherwise :func:`check_resumable` raises naming the differing settings, before anything
in the folder is touched. :func:`clear_run` removes a previous run's files for ``--overwrite``.

Settings that do not change the trained weights are not compared: ``log_every``,
``checkpoint_every`` and ``val_every`` (logging and saving only) and ``device`` (a run may resume
on another device; results then differ only by floating-point rounding), nor the model's
``readout_trust`` (a weight of prediction, chosen on ``--val`` after training). The validation
folder (``--val``) only adds a logged validation Dice and that choice, and is not compared.

Run folders written before this file existed are compared with their newest checkpoint
(``config.json`` and the ``train_config`` in ``trainer.json``), else with the folder's own
``config.json`` and ``train_config.json``; the data cannot be compared for them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_json
from .errors import JRASError
from .io import Case
from .provenance import case_list_sha256
from .run_files import (
    BANK_DIR,
    BANK_PARTIAL_DIR,
    CHECKPOINT_GLOB,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOG_FILE,
    SETTINGS_FILE,
    TRAIN_CONFIG_FILE,
    TRAINER_STATE_FILE,
    WEIGHTS_FILE,
)

HARMLESS_TRAIN_SETTINGS = ("log_every", "checkpoint_every", "val_every", "device")
# a prediction-time weight (chosen on --val after training): never decides the weights
HARMLESS_MODEL_SETTINGS = ("readout_trust",)
# what a training run writes into its folder (all of it goes with --overwrite; nothing else does)
RUN_FILES = (SETTINGS_FILE, CONFIG_FILE, WEIGHTS_FILE, TRAIN_CONFIG_FILE, LOG_FILE,
             CHECKPOINTS_DIR, BANK_DIR, BANK_PARTIAL_DIR)


def training_settings(model_config: dict[str, Any], train_config: dict[str, Any],
                      cases: Sequence[Case], patient_regex: str | None,
                      group_duplicates: bool = False) -> dict[str, Any]:
    """The settings of a training run that decide its weights (see the module docstring).

    Args:
        model_config: the model's :meth:`ModelConfig.to_dict`.
        train_config: the resolved train config as a dict (harmless settings are dropped).
        cases: the training cases (only a hash of their list is kept).
        patient_regex: how case ids map to patient ids, or None.
        group_duplicates: whether near-duplicate patients are merged.

    Returns:
        ``{"model": ..., "train": ..., "data": {"case_list_sha256", "patient_regex",
        "group_duplicates"}}`` as JSON would read it back (lists, not tuples).
    """
    settings = {"model": model_config,
                "train": {k: v for k, v in train_config.items() if k not in HARMLESS_TRAIN_SETTINGS},
                "data": {"case_list_sha256": case_list_sha256(cases), "patient_regex": patient_regex,
                         "group_duplicates": group_duplicates}}
    return json.loads(json.dumps(settings))  # as read back from the file (lists, not tuples)


def _read(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def saved_settings(out: Path) -> dict[str, Any] | None:
    """The training settings of the run in ``out``; None when it holds no run.

    Returns:
        ``run_settings.json`` as written by :func:`record_settings`; for an older run folder
        ``{"model", "train", "data": None}`` from its newest checkpoint or its own files
        (either part None when unreadable); None when neither can be read.
    """
    if (out / SETTINGS_FILE).exists():
        recorded = _read(out / SETTINGS_FILE) or {}
        if not all(isinstance(recorded.get(part), dict) for part in ("model", "train")):
            raise JRASError(f"{out / SETTINGS_FILE} is damaged (no model and train settings): "
                            "choose another run folder (--out), or start afresh there "
                            "(--overwrite)")
        return recorded
    done = sorted(p for p in (out / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB)
                  if (p / TRAINER_STATE_FILE).exists())
    if done:
        model, train = _read(done[-1] / CONFIG_FILE), (_read(done[-1] / TRAINER_STATE_FILE) or {})
        train = train.get("train_config")
    else:
        model, train = _read(out / CONFIG_FILE), (_read(out / TRAIN_CONFIG_FILE) or {}).get("train")
    if model is None and train is None:
        return None
    return {"model": model, "train": train, "data": None}


def differing_settings(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names (``model.k``, ``train.seed``, ``data.case_list_sha256``...) of settings that differ.

    A part the old run did not record (None) is not compared; a harmless train setting never is.
    """
    changed = []
    for part in ("model", "train", "data"):
        old, new = saved.get(part), wanted[part]
        if old is None:
            continue
        harmless = {"train": HARMLESS_TRAIN_SETTINGS, "model": HARMLESS_MODEL_SETTINGS}.get(part, ())
        keys = sorted((set(old) | set(new)) - set(harmless))
        changed += [f"{part}.{k}" for k in keys if old.get(k) != new.get(k)]
    return changed


def check_resumable(out: Path, wanted: dict[str, Any]) -> bool:
    """True when ``out`` holds a run with the ``wanted`` settings, False when it holds none.

    Raises :class:`JRASError` (the CLI's exit 2) naming the differing settings otherwise.

    Args:
        out: the run folder.
        wanted: the new run's :func:`training_settings`.

    Returns:
        True: resume the run in ``out``; False: ``out`` holds no run.

    Raises:
        JRASError: ``out`` holds a run whose settings differ, or its ``run_settings.json`` is
            damaged.
    """
    saved = saved_settings(out)
    if saved is None:
        return False
    changed = differing_settings(saved, wanted)
    if changed:
        raise JRASError(f"{out} holds a run trained with other settings ({', '.join(changed)}): "
                        "choose another run folder (--out), or start afresh there (--overwrite)")
    return True


def record_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``run_settings.json`` into ``out`` (atomically)."""
    atomic_write_json(out / SETTINGS_FILE, settings)


def clear_run(out: Path) -> None:
    """Remove the files of a previous training run from ``out`` (``--overwrite``).

    Only what training writes (``RUN_FILES``) is removed, each renamed first so that a crash
    never leaves half of a checkpoint under its name; other files in the folder stay.
    """
    for name in RUN_FILES:
        path = out / name
        if not path.exists() and not path.is_symlink():
            continue
        trash = path.with_name(f".{path.name.lstrip('.')}.overwritten")
        _remove(trash)
        path.rename(trash)
        _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
