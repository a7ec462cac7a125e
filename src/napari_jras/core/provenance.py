"""Provenance of a report: what produced a number, on which data, with which code, where and when.

``case_list_sha256`` fingerprints a data folder without reading its pixels: the SHA-256 of the
sorted lines ``<case id>\\t<image size>\\t<label size>`` (sizes in bytes, ``-`` for a missing
label). It changes when a case is added, removed, renamed or its files change size; a file
rewritten with different pixels but the same size is not detected (hashing every file would
read whole datasets for each report).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .io import Case
from .run_files import CONFIG_FILE, TRAIN_CONFIG_FILE

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def case_list_sha256(cases: Sequence[Case]) -> str:
    """SHA-256 (hex) of the sorted case ids with their image and label file sizes.

    Args:
        cases: the cases of a data folder (:func:`~.io.find_cases`).

    Returns:
        64 lowercase hex digits (see the module docstring for what it covers).

    Raises:
        OSError: a case's image or label file no longer exists or cannot be examined.
    """
    lines = sorted(f"{c.case_id}\t{_size(c.image_path)}\t{_size(c.label_path)}" for c in cases)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _size(path: Path | None) -> str:
    return "-" if path is None else str(Path(path).stat().st_size)


def git_state(package: str | Path = _PACKAGE_ROOT) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the source checkout running this package (``<repo>/src/
    napari_jras``); None for an installed copy, outside a checkout or without git.

    Args:
        package: the package folder to ask about (default: this package).

    Returns:
        ``{"commit": <full hex SHA of HEAD>, "dirty": <True when tracked files differ from
        HEAD>}`` (untracked files are ignored), or None.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if (top / "src" / "napari_jras").resolve() != Path(package).resolve():
            return None  # e.g. site-packages of a virtual environment inside another repo
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing or unreadable.

    Invalid JSON also gives None; a valid file is returned as parsed, whatever its top-level
    type.
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def model_settings(model_dir: str | Path) -> dict[str, Any]:
    """The run folder's ``config.json`` and ``train_config.json`` (None where missing)."""
    model_dir = Path(model_dir)
    return {"config": read_json(model_dir / CONFIG_FILE),
            "train_config": read_json(model_dir / TRAIN_CONFIG_FILE)}


def provenance(*, data: str | Path | None = None, cases: Sequence[Case] | None = None,
               model_dir: str | Path | None = None, device: str | None = None,
               guide_source: str | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance record of a report (``extra`` items are added as they are).

    Holds the package version, the git commit and dirty flag (None outside a checkout), the UTC
    time, and where given: the data folder with its case count and ``case_list_sha256``, the
    model's full settings, the device and the guide source.

    Args:
        data: the data folder evaluated, or None.
        cases: its cases (counted and fingerprinted; ignored without ``data``), or None.
        model_dir: the run folder whose ``config.json`` and ``train_config.json`` are
            copied in, or None.
        device: the device name, or None.
        guide_source: the guide source of the evaluation, or None.
        **extra: further JSON-serialisable items, added last (they may override the above).

    Returns:
        A JSON-serialisable dict: ``package``, ``version``, ``git``, ``time_utc``, then
        ``data``, ``model``, ``device`` and ``guide_source`` where given.

    Raises:
        OSError: a case file is gone (:func:`case_list_sha256`).
    """
    from .. import __version__

    record: dict[str, Any] = {"package": "napari-jras", "version": __version__,
                              "git": git_state(),
                              "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if data is not None:
        record["data"] = {"path": str(data)}
        if cases is not None:
            record["data"].update(cases=len(cases), case_list_sha256=case_list_sha256(cases))
    if model_dir is not None:
        record["model"] = {"path": str(model_dir), **model_settings(model_dir)}
    if device is not None:
        record["device"] = device
    if guide_source is not None:
        record["guide_source"] = guide_source
    record.update(extra)
    return record


def script_command(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command line a benchmark script ran with, for its report's provenance.

    Args:
        script: the script's file (``__file__``); shown relative to the current folder when
            it lies below it (the repository root, where the scripts are run from).
        argv: its arguments; None: ``sys.argv[1:]``.

    Returns:
        ``python <script> <arguments>``.
    """
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path.cwd())
    return " ".join(["python", str(path), *(sys.argv[1:] if argv is None else argv)])


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write a benchmark report as indented JSON (creating its folder) and say where.

    Args:
        path: the JSON file to write.
        report: the report, JSON-serialisable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"-> {path}")
