"""Exemplar bank: a folder of annotated slices with their embeddings and provenance.

Layout (copy the whole folder to move or share a bank)::

    bank.sqlite        metadata, provenance and embeddings with the retriever version that made
                       them (WAL mode, one transaction per change)
    pixels/<id>.npz    compressed image (uint8, 0..255) and mask (uint8 class indices)
    index.faiss        search index, derived from the stored embeddings; rebuilt when missing,
                       stale or damaged

Crash safety: pixel files are written under temporary names, renamed into place, then the rows are
committed in one transaction; files without a committed row are deleted when the bank is opened.

Several processes may use one bank. Every change (rows, pixel files, ``index.faiss`` and the
metadata that says which embeddings it reflects) happens inside one SQLite write transaction
(``BEGIN IMMEDIATE``): writers queue up behind each other (busy timeout ``BUSY_TIMEOUT_S``, then a
:class:`BankError` "busy"), readers are never blocked by the WAL journal and each process notices
the others' embedding changes before searching. Nothing stored in the bank is ever used as a
path: pixel files are named after integer ids and retriever versions must be plain tokens.

A bank on a read-only folder (a read-only mount, a shared archive) opens read-only
(``open(..., read_only=True)``, or ``None``: read-only only when it cannot be written): searching
and reading work, nothing is cleaned up or saved, and every change is refused with a
:class:`BankError` saying the bank is read-only. A damaged embedding (not ``embed_dim`` finite
float32 values) never stops a bank from opening: it is left out of the index, reported by
:meth:`ExemplarBank.damaged_embeddings`, refused by search, and repaired by re-embedding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import operator
import os
import re
import sqlite3
import threading
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_bytes
from .data import resize_images, resize_labels
from .errors import BankError
from .index import EmbeddingIndex
from .io import patient_of

FORMAT = "napari-jras-bank"
FORMAT_VERSION = 1
DB_FILE = "bank.sqlite"
PIXELS_DIR = "pixels"
INDEX_FILE = "index.faiss"
ORIGINS = ("training", "correction", "import")
PROVENANCE_KEYS = ("case_id", "patient_id", "slice_index", "source", "origin", "author", "created")
RANGE_TOLERANCE = 0.01  # images may stray this far outside [0, 1] (rounding); they are clipped
SQL_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's parameter limit
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's write to finish

SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE exemplars (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        case_id TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        slice_index INTEGER NOT NULL,
        source TEXT NOT NULL,
        origin TEXT NOT NULL,
        author TEXT,
        created TEXT NOT NULL,
        extra TEXT NOT NULL,
        embedding BLOB,
        retriever_version TEXT
    )""",
    "CREATE INDEX exemplars_patient ON exemplars (patient_id)",
)
RECORD_COLUMNS = "id, case_id, patient_id, slice_index, source, origin, author, created, extra"
PIXEL_NAME = re.compile(r"^(\d+)\.npz$|^\.(\d+)\.partial$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Hit:
    """One retrieved exemplar: its id, cosine similarity and record (id + provenance)."""

    id: int
    score: float
    record: dict


def _locked(method):
    """Run a method under the bank's lock, refusing a closed bank."""

    @functools.wraps(method)
    def wrapper(self: ExemplarBank, *args, **kwargs):
        with self._lock:
            if self._db is None:
                raise BankError(f"The bank at {self._path} is closed")
            if not (self._path / DB_FILE).is_file():
                raise BankError(f"The bank folder {self._path} was deleted or moved while it was "
                                "open: restore it (or open the bank at its new place)")
            return method(self, *args, **kwargs)

    return wrapper


class ExemplarBank:
    """Persistent exemplar bank; make one with :meth:`create` or :meth:`open` (not the constructor).

    Images are stored at ``size`` x ``size``; masks hold class indices below ``num_classes``;
    embeddings are L2-normalised ``embed_dim`` vectors, all made by one retriever version.
    """

    def __init__(self, path: Path, db: sqlite3.Connection, use_gpu: bool | None,
                 read_only: bool = False) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = db
        self._use_gpu = use_gpu
        self._read_only = read_only
        self._lock = threading.RLock()
        try:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if meta.get("format") != FORMAT:
                raise BankError(f"{path} is not a napari-jras exemplar bank")
            if int(meta["format_version"]) > FORMAT_VERSION:
                raise BankError(f"The bank at {path} was made by a newer napari-jras: upgrade it")
            self._size = int(meta["size"])
            self._num_classes = int(meta["num_classes"])
            self._embed_dim = int(meta["embed_dim"])
            self._class_names = list(json.loads(meta["class_names"]))
            if db.execute("SELECT COUNT(*) FROM exemplars WHERE typeof(id) != 'integer'"
                          ).fetchone()[0]:
                raise ValueError("some exemplar ids are not whole numbers")
        except (KeyError, ValueError, TypeError) as exc:
            raise BankError(f"The bank metadata in {path / DB_FILE} is damaged ({exc})") from exc
        if not (path / PIXELS_DIR).is_dir():
            raise BankError(f"The bank at {path} is damaged: its '{PIXELS_DIR}' folder is missing")
        self._index: EmbeddingIndex | None = None
        self._index_token: str | None = None  # embeddings_token the cached index reflects
        self._index_dirty = False  # cached index is newer than index.faiss
        self._damaged: list[int] = []  # exemplars whose embedding the cached index left out
        if not read_only:
            db.execute("PRAGMA journal_mode = WAL")  # only once the file is known to be a bank
            self._clean_orphans()
        self._sync_index()

    # --- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, size: int, num_classes: int, embed_dim: int,
               class_names: list[str] | None = None, *,
               use_gpu: bool | None = None) -> ExemplarBank:
        """Create an empty bank in a new (or empty) folder ``path``."""
        path = Path(path)
        if (path / DB_FILE).exists():
            raise BankError(f"A bank already exists at {path}: open it, or choose a new folder")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise BankError(f"{path} is not an empty folder: choose a new folder for the bank")
        for name, value, low in (("size", size, 8), ("num_classes", num_classes, 2),
                                 ("embed_dim", embed_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise BankError(f"{name} must be a whole number >= {low}, got {value!r}")
        if num_classes > 256:
            raise BankError(f"A bank holds at most 256 classes, got {num_classes}")
        if class_names is None:
            class_names = ["background"] + [f"class {c}" for c in range(1, num_classes)]
        if len(class_names) != num_classes or not all(
                isinstance(n, str) and n for n in class_names):
            raise BankError(f"class_names must be {num_classes} non-empty names, got {class_names!r}")
        try:
            (path / PIXELS_DIR).mkdir(parents=True, exist_ok=True)
            db = _connect(path / DB_FILE)
        except (OSError, sqlite3.Error) as exc:
            raise BankError(f"Cannot create a bank at {path}: {exc}") from exc
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "size": size,
                "num_classes": num_classes, "embed_dim": embed_dim,
                "class_names": json.dumps(list(class_names)), "embeddings_token": _token()}
        with _transaction(db, path):
            for statement in SCHEMA:
                db.execute(statement)
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [(k, str(v)) for k, v in meta.items()])
        return cls(path, db, use_gpu)

    @classmethod
    def open(cls, path: str | Path, *, use_gpu: bool | None = None,
             read_only: bool | None = False) -> ExemplarBank:
        """Open an existing bank folder (cleans up after interrupted writes, repairs the index).

        ``read_only=True`` never writes to the folder (changes raise :class:`BankError`);
        ``None`` opens read-only only when the folder or database cannot be written; ``False``
        (default) refuses such a bank with a clear message.
        """
        path = Path(path)
        if not path.is_dir():
            raise BankError(f"No exemplar bank folder at {path}")
        if not (path / DB_FILE).is_file():
            raise BankError(f"{path} is not an exemplar bank (no {DB_FILE} in it)")
        writable = is_writable(path)
        if read_only is False and not writable:
            raise BankError(f"The bank at {path} is read-only (its folder or {DB_FILE} cannot be "
                            "written): changing it needs write access; copy the bank to a "
                            "writable folder")
        read_only = not writable if read_only is None else read_only
        try:
            db = _connect_read_only(path / DB_FILE, writable) if read_only \
                else _connect(path / DB_FILE)
        except sqlite3.Error as exc:
            raise BankError(f"Cannot open the bank at {path}: {exc} (is {DB_FILE} damaged?)") from exc
        try:
            return cls(path, db, use_gpu, read_only)
        except sqlite3.Error as exc:
            db.close()
            raise BankError(f"Cannot open the bank at {path}: {exc} (is {DB_FILE} damaged?)") from exc
        except BaseException:
            db.close()
            raise

    def close(self) -> None:
        """Save the search index if it changed and release the database (closing twice is fine)."""
        with self._lock:
            if self._db is None:
                return
            try:
                if self._index_dirty:
                    self._try_save_index()
            finally:
                self._db.close()
                self._db = None

    def __enter__(self) -> ExemplarBank:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- properties -----------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The bank folder."""
        return self._path

    @property
    def read_only(self) -> bool:
        """True when the bank was opened read-only (every change is refused)."""
        return self._read_only

    @property
    def size(self) -> int:
        """Side length of the stored square images and masks."""
        return self._size

    @property
    def num_classes(self) -> int:
        """Number of mask classes (background included)."""
        return self._num_classes

    @property
    def embed_dim(self) -> int:
        """Length of the embeddings."""
        return self._embed_dim

    @property
    def class_names(self) -> list[str]:
        """Names of the mask classes, background first."""
        return list(self._class_names)

    @property
    @_locked
    def retriever_version(self) -> str | None:
        """Version of the retriever that made the stored embeddings (None when there are none)."""
        versions = self._versions()
        return versions[0] if versions else None

    @_locked
    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM exemplars").fetchone()[0]

    # --- adding and removing --------------------------------------------------------------
    @_locked
    def add(self, images: np.ndarray, masks: np.ndarray, provenance: Sequence[Mapping],
            embeddings: np.ndarray | None = None,
            retriever_version: str | None = None) -> list[int]:
        """Add exemplars; returns their new ids.

        ``images`` (N, H, W) in [0, 1] and ``masks`` (N, H, W) class indices are resized to the
        bank size. ``provenance[i]`` needs ``case_id`` and ``origin`` (training / correction /
        import); ``patient_id`` (default: from the case id), ``slice_index`` (0), ``source``,
        ``author`` and ``created`` (now, UTC) are optional, other keys are kept as extra fields.
        ``embeddings`` (N, D) must come with the ``retriever_version`` of the stored ones.
        """
        images, masks = self._check_pixels(images, masks)
        rows = _check_provenance(provenance, len(images))
        blobs = [None] * len(images)
        if embeddings is not None:
            blobs = [v.tobytes() for v in self._check_embeddings(embeddings, len(images))]
            if not isinstance(retriever_version, str) or not retriever_version:
                raise BankError("Embeddings need the retriever_version that made them")
            _check_version_name(retriever_version)
        elif retriever_version is not None:
            raise BankError("retriever_version was given without embeddings")
        if not rows:
            return []
        version = retriever_version if embeddings is not None else None
        ids: list[int] = []
        with self._transaction() as db:
            if embeddings is not None:
                self._check_version_matches(retriever_version)
            for row, blob in zip(rows, blobs, strict=True):
                ids.append(db.execute(
                    "INSERT INTO exemplars (case_id, patient_id, slice_index, source, origin, "
                    "author, created, extra, embedding, retriever_version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, blob, version)).lastrowid)
            try:
                for i, image, mask in zip(ids, images, masks, strict=True):
                    _write_pixels(self._pixel_file(i), image, mask)
            except BaseException:
                for i in ids:
                    self._pixel_file(i).unlink(missing_ok=True)
                raise
            was_current, token = self._bump_token() if embeddings is not None else (False, None)
        if token is not None:
            vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), -1)
            if was_current and self._index is not None:
                self._index.add(ids, vecs)
            elif was_current:
                self._index = EmbeddingIndex(ids, vecs, use_gpu=self._use_gpu)
            self._changed_index(was_current, token)
        return ids

    @_locked
    def remove(self, ids: Iterable[int]) -> None:
        """Delete exemplars (rows, pixels and embeddings); unknown ids raise :class:`BankError`."""
        embedded = self._fetch(ids, "embedding IS NOT NULL")
        with self._transaction() as db:
            db.executemany("DELETE FROM exemplars WHERE id = ?", [(i,) for i in embedded])
            gone = [i for i, (has,) in embedded.items() if has]
            was_current, token = self._bump_token() if gone else (False, None)
        for i in embedded:
            self._pixel_file(i).unlink(missing_ok=True)
        if token is not None:
            was_current = was_current and not set(gone) & set(self._damaged)  # else: rebuild
            if was_current:
                self._index.remove(gone)
                self._index = self._index if len(self._index) else None
            self._changed_index(was_current, token)

    # --- reading --------------------------------------------------------------------------
    @_locked
    def records(self, ids: Iterable[int] | None = None) -> list[dict]:
        """Id and provenance of the given exemplars (all, by id, when ``ids`` is None)."""
        if ids is None:
            return [_record(r) for r in self._db.execute(
                f"SELECT {RECORD_COLUMNS} FROM exemplars ORDER BY id")]
        ids = _id_list(ids)
        rows = self._fetch(ids, RECORD_COLUMNS)
        return [_record(rows[i]) for i in ids]

    @_locked
    def images(self, ids: Iterable[int]) -> np.ndarray:
        """Images of the given exemplars, (N, size, size) float32 in [0, 1]."""
        ids = _id_list(ids)
        self._fetch(ids, "id")
        return self._stack([self._read_pixels(i)[0] for i in ids]).astype(np.float32) / 255.0

    @_locked
    def masks(self, ids: Iterable[int]) -> np.ndarray:
        """Masks of the given exemplars, (N, size, size) uint8 class indices."""
        ids = _id_list(ids)
        self._fetch(ids, "id")
        return self._stack([self._read_pixels(i)[1] for i in ids])

    @_locked
    def load_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every exemplar: (ids int64, images (N, size, size) float32, masks uint8), by id."""
        ids = [r[0] for r in self._db.execute("SELECT id FROM exemplars ORDER BY id")]
        pixels = [self._read_pixels(i) for i in ids]
        images = self._stack([p[0] for p in pixels]).astype(np.float32) / 255.0
        return np.asarray(ids, dtype=np.int64), images, self._stack([p[1] for p in pixels])

    # --- embeddings -----------------------------------------------------------------------
    @_locked
    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored embeddings: (ids int64, (N, D) float32), by id, without exemplars that have none.

        Raises :class:`BankError` naming the exemplars whose embedding is damaged.
        """
        ids, vecs, damaged = self._read_embeddings()
        if damaged:
            raise self._damaged_error(damaged)
        return ids, vecs

    @_locked
    def damaged_embeddings(self) -> list[int]:
        """Ids of exemplars whose stored embedding is damaged (wrong length or type, NaN)."""
        return self._read_embeddings()[2]

    @_locked
    def set_embeddings(self, ids: Iterable[int], embeddings: np.ndarray,
                       retriever_version: str) -> None:
        """Replace every exemplar's embedding at once (after re-embedding the whole bank)."""
        if not isinstance(retriever_version, str) or not retriever_version:
            raise BankError("set_embeddings needs the retriever_version that made the embeddings")
        _check_version_name(retriever_version)
        ids = _id_list(ids)
        vecs = self._check_embeddings(embeddings, len(ids))
        if len(set(ids)) != len(ids):
            raise BankError("set_embeddings got the same exemplar id twice")
        with self._transaction() as db:
            stored = {r[0] for r in db.execute("SELECT id FROM exemplars")}
            if stored != set(ids):
                raise BankError(
                    f"set_embeddings needs exactly the bank's {len(stored)} exemplars, got "
                    f"{len(ids)} ids ({len(stored - set(ids))} missing, "
                    f"{len(set(ids) - stored)} unknown); re-embed the whole bank")
            db.executemany("UPDATE exemplars SET embedding = ?, retriever_version = ? WHERE id = ?",
                           [(v.tobytes(), retriever_version, i) for i, v in zip(ids, vecs, strict=True)])
            _, token = self._bump_token()
        self._index = EmbeddingIndex(ids, vecs, use_gpu=self._use_gpu) if ids else None
        self._damaged = []
        self._changed_index(True, token)
        self._try_save_index()

    @_locked
    def needs_embedding(self, retriever_version: str) -> bool:
        """True when some exemplar has no embedding or one made by another retriever version."""
        return self._db.execute(
            "SELECT COUNT(*) FROM exemplars WHERE embedding IS NULL OR retriever_version IS NOT ?",
            (retriever_version,)).fetchone()[0] > 0

    @_locked
    def pseudonymise(self, prefix: str = "patient",
                     save_key: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
        """Replace patient and case ids by pseudonyms; returns {old patient id: pseudonym}.

        Patients become ``<prefix>-0001``, ... (in order of their first exemplar) and each case
        ``<patient pseudonym>-case-001``, ...; ``source`` (the file name) and ``author`` are
        cleared. Slice index, origin, creation time and extra fields stay. The old values are
        wiped from the database file as well (secure delete, VACUUM, WAL truncated).

        ``save_key`` receives the key ({old patient id: pseudonym}) under the write lock before
        any id is replaced: when it raises, the bank is left unchanged (the key is never lost).
        """
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", prefix):
            raise BankError(f"Invalid pseudonym prefix {prefix!r}: use letters, digits, '-', '_' "
                            "and start with a letter (at most 32 characters)")
        self._check_writable("pseudonymising it")
        self._db.execute("PRAGMA secure_delete = ON")
        with self._transaction() as db:  # the key matches the rows: no writer can come between
            patients: dict[str, str] = {}
            cases: dict[str, str] = {}
            per_patient: dict[str, int] = {}
            rows = []
            for exemplar_id, case, patient in db.execute(
                    "SELECT id, case_id, patient_id FROM exemplars ORDER BY id").fetchall():
                alias = patients.setdefault(patient, f"{prefix}-{len(patients) + 1:04d}")
                if case not in cases:
                    per_patient[alias] = per_patient.get(alias, 0) + 1
                    cases[case] = f"{alias}-case-{per_patient[alias]:03d}"
                rows.append((cases[case], alias, exemplar_id))
            if save_key is not None:
                save_key(patients)
            db.executemany("UPDATE exemplars SET case_id = ?, patient_id = ?, source = '', "
                           "author = NULL WHERE id = ?", rows)
        try:
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise BankError(f"The bank at {self._path} was pseudonymised, but its database file "
                            f"could not be compacted ({exc}): old ids may remain in unused parts "
                            "of the file; free some space and run anonymise again") from exc
        return patients

    @_locked
    def rebuild_index(self) -> list[int]:
        """Rebuild the search index from the stored embeddings and save it.

        Returns the ids of exemplars left out because their embedding is damaged.
        """
        self._check_writable("rebuilding its index")
        self._sync_index(rebuild=True)
        return list(self._damaged)

    # --- search ---------------------------------------------------------------------------
    @_locked
    def search(self, query_embeddings: np.ndarray, k: int, retriever_version: str,
               exclude_patients: Sequence[str | None] | None = None,
               exclude_ids: Sequence[Iterable[int]] | None = None) -> list[list[Hit]]:
        """The ``k`` most similar exemplars of each query, best first.

        ``exclude_patients[q]`` removes every exemplar of that patient from query ``q``'s results
        (no leakage), ``exclude_ids[q]`` removes single exemplars. A query gets fewer than ``k``
        hits when fewer eligible exemplars exist.
        """
        queries = np.asarray(query_embeddings)
        if queries.ndim != 2 or queries.shape[1] != self._embed_dim:
            raise BankError(f"Query embeddings must have shape (Q, {self._embed_dim}), got "
                            f"{queries.shape}: the retriever does not match this bank")
        with self._snapshot():  # index, rows and counts from one state of the bank
            rebuilt = self._refresh_index()
            hits = self._search(queries, k, retriever_version, exclude_patients, exclude_ids)
        if rebuilt:
            self._try_save_index()
        return hits

    def _search(self, queries: np.ndarray, k: int, retriever_version: str,
                exclude_patients: Sequence[str | None] | None,
                exclude_ids: Sequence[Iterable[int]] | None) -> list[list[Hit]]:
        """:meth:`search` inside a snapshot whose embeddings the cached index reflects."""
        total, embedded = self._db.execute(
            "SELECT COUNT(*), COUNT(embedding) FROM exemplars").fetchone()
        if total == 0:
            raise BankError(f"The exemplar bank at {self._path} is empty: add exemplars first")
        if embedded < total:
            raise BankError(f"{total - embedded} of {total} exemplars have no embedding: re-embed "
                            "the bank with the current retriever (`napari-jras bank rebuild`)")
        if self._damaged:
            raise self._damaged_error(self._damaged)
        stored = self._versions()
        if stored != [retriever_version]:
            raise BankError(
                f"The bank's embeddings were made by retriever version {', '.join(stored)} but "
                f"the current one is {retriever_version}: re-embed the bank "
                "(`napari-jras bank rebuild`)")
        exclude = [set() for _ in range(len(queries))]
        for name, given in (("exclude_patients", exclude_patients), ("exclude_ids", exclude_ids)):
            if given is not None and len(given) != len(queries):
                raise BankError(f"{name} has {len(given)} entries for {len(queries)} queries")
        if exclude_ids is not None:
            for blocked, extra in zip(exclude, exclude_ids, strict=True):
                blocked.update(_id_list(extra))
        if exclude_patients is not None:
            for patient in {p for p in exclude_patients if p is not None}:
                same = {r[0] for r in self._db.execute(
                    "SELECT id FROM exemplars WHERE patient_id = ?", (str(patient),))}
                for blocked, p in zip(exclude, exclude_patients, strict=True):
                    if p == patient:
                        blocked.update(same)
        scores, ids = self._index.search(queries, k, exclude)
        found = {int(i) for i in ids.flat if i >= 0}
        rows = self._fetch(found, RECORD_COLUMNS)
        return [[Hit(int(i), float(s), _record(rows[int(i)])) for s, i in zip(srow, irow, strict=True) if i >= 0]
                for srow, irow in zip(scores, ids, strict=True)]

    # --- internals: validation ------------------------------------------------------------
    def _check_pixels(self, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate images/masks and return them resized as uint8 (N, size, size) stacks."""
        images, masks = np.asarray(images), np.asarray(masks)
        if images.ndim != 3:
            raise BankError(f"images must be a stack (N, H, W), got shape {images.shape}; "
                            "for a single slice pass image[None]")
        if masks.shape != images.shape:
            raise BankError(f"masks shape {masks.shape} does not match images shape {images.shape}")
        if images.size == 0 and images.shape[0]:
            raise BankError(f"images are empty (shape {images.shape})")
        for name, arr in (("images", images), ("masks", masks)):
            if arr.dtype.kind not in "biuf":
                raise BankError(f"{name} must be numbers, got data type {arr.dtype}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise BankError(f"{name} contain NaN or infinite values")
        if images.size and (images.min() < -RANGE_TOLERANCE or images.max() > 1 + RANGE_TOLERANCE):
            raise BankError(f"images must be scaled to [0, 1], got values from {images.min():g} to "
                            f"{images.max():g}: normalise them first")
        if masks.dtype.kind == "b":
            masks = masks.astype(np.uint8)
        if masks.dtype.kind == "f" and not np.array_equal(masks, np.round(masks)):
            raise BankError("masks must hold whole-number class indices")
        if masks.size and (masks.min() < 0 or masks.max() >= self._num_classes):
            raise BankError(
                f"masks hold class value {masks.min() if masks.min() < 0 else masks.max():g} but "
                f"this bank has {self._num_classes} classes (0..{self._num_classes - 1})")
        if not images.shape[0]:
            empty = np.empty((0, self._size, self._size), dtype=np.uint8)
            return empty, empty
        side = (self._size, self._size)
        images = np.round(np.clip(resize_images(images, side), 0.0, 1.0) * 255).astype(np.uint8)
        return images, resize_labels(masks.astype(np.uint8), side)

    def _check_embeddings(self, embeddings: np.ndarray, n: int) -> np.ndarray:
        vecs = np.asarray(embeddings)
        if vecs.shape != (n, self._embed_dim):
            raise BankError(f"Expected embeddings of shape ({n}, {self._embed_dim}), "
                            f"got {vecs.shape}")
        if vecs.dtype.kind not in "biuf" or not np.isfinite(vecs).all():
            raise BankError("Embeddings must be finite numbers (found NaN, infinity or non-numbers)")
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _check_version_matches(self, retriever_version: str) -> None:
        stored = self._versions()
        if stored and stored != [retriever_version]:
            raise BankError(
                f"These embeddings were made by retriever version {retriever_version} but the "
                f"bank holds embeddings of version {', '.join(stored)}: re-embed the bank "
                "(`napari-jras bank rebuild`) or embed the new exemplars with that version")

    # --- internals: storage ---------------------------------------------------------------
    def _check_writable(self, action: str) -> None:
        if self._read_only:
            raise BankError(f"The bank at {self._path} is open read-only: {action} needs write "
                            "access (copy the bank to a writable folder, or open it for writing)")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._check_writable("changing it")
        with _transaction(self._db, self._path):
            yield self._db

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent state of the bank, never waiting for writers (WAL)."""
        self._db.execute("BEGIN")
        try:
            yield self._db
        finally:
            if self._db.in_transaction:
                self._db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _versions(self) -> list[str]:
        versions = [r[0] for r in self._db.execute(
            "SELECT DISTINCT retriever_version FROM exemplars "
            "WHERE retriever_version IS NOT NULL ORDER BY 1")]
        for version in versions:
            if not isinstance(version, str) or not VERSION_PATTERN.match(version):
                raise BankError(f"The bank at {self._path} is damaged: it names a retriever "
                                f"version {version!r} that is not a plain token")
        return versions

    def _fetch(self, ids: Iterable[int], columns: str) -> dict[int, tuple]:
        """Rows of ``ids`` keyed by id, in the given order; unknown ids raise."""
        ids = _id_list(ids)
        rows: dict[int, tuple] = {}
        for start in range(0, len(ids), SQL_CHUNK):
            part = ids[start:start + SQL_CHUNK]
            for row in self._db.execute(
                    f"SELECT id, {columns} FROM exemplars WHERE id IN "
                    f"({', '.join('?' * len(part))})", part):
                rows[row[0]] = row[1:]
        missing = [i for i in ids if i not in rows]
        if missing:
            raise BankError(f"No exemplar with id {missing[0]} in the bank at {self._path}")
        return {i: rows[i] for i in ids}

    def _pixel_file(self, exemplar_id: int) -> Path:
        if isinstance(exemplar_id, bool) or not isinstance(exemplar_id, (int, np.integer)):
            raise BankError(f"The bank at {self._path} is damaged: exemplar id {exemplar_id!r} "
                            "is not a whole number")
        return self._path / PIXELS_DIR / f"{int(exemplar_id)}.npz"

    def _read_pixels(self, exemplar_id: int) -> tuple[np.ndarray, np.ndarray]:
        file = self._pixel_file(exemplar_id)
        try:
            with np.load(file) as data:
                image, mask = data["image"], data["mask"]
        except FileNotFoundError as exc:
            raise BankError(f"The pixels of exemplar {exemplar_id} are missing ({file}): "
                            "restore the file or remove the exemplar") from exc
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise BankError(f"The pixels of exemplar {exemplar_id} are damaged ({file}): "
                            "restore the file or remove the exemplar") from exc
        side = (self._size, self._size)
        if image.shape != side or mask.shape != side or image.dtype != np.uint8 \
                or mask.dtype != np.uint8:
            raise BankError(f"The pixels of exemplar {exemplar_id} are damaged ({file})")
        return image, mask

    def _stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays) if arrays else np.empty((0, self._size, self._size), np.uint8)

    def _clean_orphans(self) -> None:
        """Delete pixel files without a committed row (left by an interrupted add or remove)."""
        with self._transaction() as db:  # the write lock waits for another process's add
            known = {r[0] for r in db.execute("SELECT id FROM exemplars")}
            for file in (self._path / PIXELS_DIR).iterdir():
                match = PIXEL_NAME.match(file.name)
                if match and (match.group(2) or int(match.group(1)) not in known):
                    file.unlink(missing_ok=True)

    # --- internals: search index ----------------------------------------------------------
    def _read_embeddings(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(ids, (N, D) float32) of the well-formed stored embeddings and the ids of damaged ones
        (not a blob of ``embed_dim`` float32 values, or holding NaN / infinity)."""
        nbytes = self._embed_dim * 4
        ids, blobs, damaged = [], [], []
        for exemplar_id, blob in self._db.execute(
                "SELECT id, embedding FROM exemplars WHERE embedding IS NOT NULL ORDER BY id"):
            if isinstance(blob, bytes) and len(blob) == nbytes \
                    and np.isfinite(np.frombuffer(blob, dtype=np.float32)).all():
                ids.append(exemplar_id)
                blobs.append(blob)
            else:
                damaged.append(exemplar_id)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), self._embed_dim)
        return np.asarray(ids, dtype=np.int64), vecs, damaged

    def _damaged_error(self, damaged: Sequence[int]) -> BankError:
        shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
        return BankError(
            f"{len(damaged)} exemplar(s) of the bank at {self._path} have a damaged embedding "
            f"(id {shown}): re-embed the bank from its stored pixels with "
            f"`napari-jras bank rebuild --bank {self._path} --model RUN`")

    def _bump_token(self) -> tuple[bool, str]:
        """Mark the stored embeddings as changed (call inside a transaction).

        Returns whether the cached index matched them before the change, and the new token.
        """
        was_current = self._meta("embeddings_token") == self._index_token
        token = _token()
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'embeddings_token'", (token,))
        return was_current, token

    def _changed_index(self, was_current: bool, token: str) -> None:
        """Record that the cached index was updated to ``token`` (or must be reloaded)."""
        self._index_token = token if was_current else None
        self._index_dirty = was_current

    def _sync_index(self, rebuild: bool = False) -> None:
        """Make the cached index match the stored embeddings; save it when it was rebuilt."""
        with self._snapshot():
            rebuilt = self._refresh_index(rebuild)
        if rebuilt:
            self._try_save_index()

    def _refresh_index(self, rebuild: bool = False) -> bool:
        """Inside a transaction: reuse, load or rebuild the cached index; True when rebuilt."""
        token = self._meta("embeddings_token")
        if token == self._index_token and not rebuild:
            return False
        ids, vecs, damaged = self._read_embeddings()
        index = None if rebuild else self._load_index_file(token, len(ids))
        rebuilt = index is None
        if rebuilt and ids.size:
            index = EmbeddingIndex(ids, vecs, use_gpu=self._use_gpu)
        self._index, self._index_token, self._index_dirty = index, token, False
        self._damaged = damaged
        return rebuilt

    def _load_index_file(self, token: str, count: int) -> EmbeddingIndex | None:
        """The saved index when it matches the ``count`` well-formed stored embeddings, or None."""
        file = self._path / INDEX_FILE
        try:
            before = _identity(file)
            if self._meta("index_token") != token or self._meta("index_sha256") != _sha256(file):
                return None
            index = EmbeddingIndex.load(file, self._embed_dim, use_gpu=self._use_gpu)
            if _identity(file) != before:  # another process replaced it meanwhile
                return None
        except (BankError, OSError):
            return None
        return index if len(index) == count else None

    def _try_save_index(self) -> None:
        """Write index.faiss; failure only costs a rebuild next time, so it is a warning.

        The file and the metadata naming the embeddings it reflects are written under the
        write lock, so that concurrent processes never mix or mislabel index files; a cached index
        that another process's change made stale is not saved.
        """
        if self._read_only:
            return  # the index lives in memory only
        file = self._path / INDEX_FILE
        try:
            with self._transaction() as db:
                if self._meta("embeddings_token") == self._index_token:
                    if self._index is None:
                        file.unlink(missing_ok=True)
                    else:
                        self._index.save(file)
                        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                       [("index_token", self._index_token),
                                        ("index_sha256", _sha256(file))])
            self._index_dirty = False
        except (BankError, OSError) as exc:
            warnings.warn(f"Could not save the search index of {self._path}: {exc}", stacklevel=3)


# --- module helpers ------------------------------------------------------------------------
def _connect(file: Path) -> sqlite3.Connection:
    db = sqlite3.connect(file, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA synchronous = FULL")  # a committed change survives a power cut
    return db


def is_writable(folder: str | Path) -> bool:
    """True when a bank folder and its database can be written (not a read-only mount)."""
    folder = Path(folder)
    pixels = folder / PIXELS_DIR
    return os.access(folder, os.W_OK) and os.access(folder / DB_FILE, os.W_OK) \
        and (not pixels.is_dir() or os.access(pixels, os.W_OK))


def _connect_read_only(file: Path, writable: bool) -> sqlite3.Connection:
    """A connection that never writes to the database (or, on a read-only folder, its folder).

    SQLite needs the ``-wal``/``-shm`` files of a WAL database; in a folder that cannot be
    written they cannot be created, so a database without pending changes is opened as
    immutable. Pending changes in a ``-wal`` file that cannot be read that way are refused.
    """
    if writable:  # a plain connection removes its -wal/-shm files on close; mode=ro leaves them
        db = _connect(file)
        db.execute("PRAGMA query_only = ON")
        return db
    uri = f"{file.resolve().as_uri()}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
    wal = file.with_name(f"{file.name}-wal")
    if wal.exists() and wal.stat().st_size:
        raise BankError(f"The bank at {file.parent} is read-only and {wal.name} holds changes "
                        "not yet merged into the database: open it once where it can be written "
                        "(or copy the folder to a writable place)")
    return sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None,
                           check_same_thread=False)


@contextmanager
def _transaction(db: sqlite3.Connection, path: Path) -> Iterator[None]:
    """One write transaction (taken at once, so concurrent writers queue up); rolled back on error."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise BankError(f"The bank at {path} is busy or read-only ({exc}); try again") from exc
    try:
        yield
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise BankError(f"Cannot write to the bank at {path}: {exc}") from exc
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _write_pixels(file: Path, image: np.ndarray, mask: np.ndarray) -> None:
    """Write one exemplar's pixels through a temporary file (crash-safe, never recreating a
    deleted bank folder); raises :class:`StorageError` without leaving the temporary file."""
    buffer = io.BytesIO()  # one write is much faster than savez's many small ones
    np.savez_compressed(buffer, image=image, mask=mask)
    atomic_write_bytes(file, buffer.getbuffer(), tmp=file.with_name(f".{file.stem}.partial"),
                       make_parents=False, what="the exemplar pixels")


def _check_version_name(version: str) -> None:
    """Refuse retriever versions that are not plain tokens (they name files in workspaces)."""
    if not VERSION_PATTERN.match(version):
        raise BankError(f"Invalid retriever version {version!r}: use letters, digits, '.', '_' "
                        "and '-' only (at most 64 characters)")


def _check_provenance(provenance: Sequence[Mapping], n: int) -> list[tuple]:
    """Validate provenance dicts and return database rows (without embedding columns)."""
    if isinstance(provenance, Mapping) or len(provenance) != n:
        raise BankError(f"Expected a list of {n} provenance dicts (one per exemplar)")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for i, p in enumerate(provenance):
        where = f"provenance[{i}]"
        if not isinstance(p, Mapping):
            raise BankError(f"{where} must be a dict, got {type(p).__name__}")
        if not p.get("case_id"):
            raise BankError(f"{where} needs a 'case_id'")
        if p.get("origin") not in ORIGINS:
            raise BankError(f"{where}: 'origin' must be one of {', '.join(ORIGINS)}, "
                            f"got {p.get('origin')!r}")
        try:
            slice_index = operator.index(p.get("slice_index", 0))
        except TypeError:
            slice_index = -1
        if slice_index < 0:
            raise BankError(f"{where}: 'slice_index' must be a whole number >= 0")
        extra = {k: v for k, v in p.items() if k not in PROVENANCE_KEYS}
        if "id" in extra:
            raise BankError(f"{where}: 'id' is set by the bank, do not pass it")
        try:
            extra_json = json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise BankError(f"{where}: extra fields must be plain values (text, numbers, lists): "
                            f"{exc}") from exc
        author = p.get("author")
        case_id = str(p["case_id"])
        rows.append((case_id, str(p.get("patient_id") or patient_of(case_id)), slice_index,
                     str(p.get("source") or ""), p["origin"], None if author is None else str(author),
                     str(p.get("created") or now), extra_json))
    return rows


def _record(row: Sequence) -> dict:
    """Record dict of a row selected with RECORD_COLUMNS."""
    keys = ("id",) + PROVENANCE_KEYS
    try:
        extra = json.loads(row[len(keys)])
        if not isinstance(extra, dict):
            raise TypeError("not a JSON object")
    except (TypeError, ValueError) as exc:
        raise BankError(f"The provenance of exemplar {row[0]} is damaged ({exc})") from exc
    return {**dict(zip(keys, row[:len(keys)], strict=True)), **extra}


def _id_list(ids: Iterable[int]) -> list[int]:
    try:
        return [operator.index(i) for i in ids]
    except TypeError as exc:
        raise BankError(f"Exemplar ids must be whole numbers ({exc})") from exc


def _token() -> str:
    return uuid.uuid4().hex


def _identity(file: Path) -> tuple[int, int, int]:
    """(inode, size, mtime): changes when a file is replaced by a rename."""
    st = file.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
