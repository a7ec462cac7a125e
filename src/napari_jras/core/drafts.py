"""Autosaved, unfinished label edits: one ``<folder>/<quoted key>.npz`` per draft, atomic writes."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from .checkpoint import atomic_write_bytes
from .errors import DataError

MAX_KEY_LENGTH = 120


class DraftStore:
    """The drafts of one workspace (see :meth:`~.workspace.Workspace.save_draft`); thread-safe."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()

    def save(self, key: str, labels: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Autosave unfinished labels (and JSON-able ``meta``) under ``key``, atomically.

        Args:
            key: the draft's name (at most :data:`MAX_KEY_LENGTH` characters, no ``/``, ``\\``
                or leading ``.``; :class:`DataError` otherwise).
            labels: the label array (whole numbers, any shape).
            meta: plain values (text, numbers, lists, objects) kept with it.
        """
        file = self._file(key)
        labels = np.asarray(labels)
        if labels.dtype.kind not in "biu":
            raise DataError(f"Draft labels must be whole numbers, got data type {labels.dtype}")
        try:
            meta_json = json.dumps(meta or {})
        except (TypeError, ValueError) as exc:
            raise DataError(f"Draft metadata must be plain values (text, numbers, lists): {exc}") \
                from exc
        buffer = io.BytesIO()
        np.savez_compressed(buffer, labels=labels, meta=np.array(meta_json))
        with self._lock:
            atomic_write_bytes(file, buffer.getvalue())

    def load(self, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The draft saved under ``key`` as (labels, meta), or None when there is none."""
        file = self._file(key)
        if not file.is_file():
            return None
        try:
            with np.load(file) as data:
                return data["labels"], json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"The draft '{key}' is damaged ({file}): discard it") from exc

    def keys(self) -> list[str]:
        """Keys of the saved drafts, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(unquote(f.name[:-4]) for f in self.folder.glob("*.npz")
                      if not f.name.startswith("."))

    def discard(self, key: str) -> None:
        """Delete the draft ``key`` (no error when there is none)."""
        with self._lock:
            self._file(key).unlink(missing_ok=True)

    def _file(self, key: str) -> Path:
        if (not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_LENGTH
                or key.startswith(".") or any(c in key for c in "/\\\0")):
            raise DataError(f"Invalid draft key {key!r}: use a name of at most {MAX_KEY_LENGTH} "
                            "characters without '/', '\\' or a leading '.'")
        return self.folder / f"{quote(key, safe='')}.npz"
