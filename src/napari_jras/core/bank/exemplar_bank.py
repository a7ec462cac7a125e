""":class:`ExemplarBank`, the bank's interface; it composes the other modules of the package."""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from ..errors import BankError
from . import checks
from .checks import RECORD_COLUMNS, record
from .index_sync import IndexSync
from .pack import forget_packed, pack_name, pack_pixels, packed_spans, unpacked_ids
from .pixels import PIXELS_DIR, PixelStore
from .pseudonyms import pseudonymise
from .schema import (
    DB_FILE,
    BankSettings,
    create_database,
    fetch,
    id_list,
    meta_value,
    open_database,
    read_settings,
    snapshot,
    transaction,
)
from .search import Hit, exclusions, hits


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
        self._read_only = read_only
        self._lock = threading.RLock()
        self._settings = read_settings(db, path)
        if not (path / PIXELS_DIR).is_dir() and meta_value(db, "pixel_pack") is None:
            raise BankError(f"The bank at {path} is damaged: its '{PIXELS_DIR}' folder is missing")
        self._pixels = PixelStore(path, self._settings.size)
        self._sync = IndexSync(path, self._settings.embed_dim, use_gpu)
        if not read_only:
            db.execute("PRAGMA journal_mode = WAL")  # only once the file is known to be a bank
            self._clean_orphans()
        self._sync_index()

    # --- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, size: int, num_classes: int, embed_dim: int,
               class_names: list[str] | None = None, *,
               use_gpu: bool | None = None) -> ExemplarBank:
        """Create an empty bank in a new (or empty) folder ``path``.

        Args:
            path: the bank folder (created when missing; must be empty).
            size: the side length images and masks are stored at (>= 8).
            num_classes: the number of mask classes, background included (2..256).
            embed_dim: the embedding length of the retriever used with the bank.
            class_names: one name per class (default ``background``, ``class 1``, ...).
            use_gpu: passed to the search index (:class:`~napari_jras.core.index.EmbeddingIndex`).

        Raises:
            BankError: invalid settings, or a folder that cannot hold a new bank.
        """
        path = Path(path)
        class_names = checks.check_settings(size, num_classes, embed_dim, class_names)
        db = create_database(path, BankSettings(size, num_classes, embed_dim, class_names))
        try:
            return cls(path, db, use_gpu)
        except BaseException:
            db.close()
            raise

    @classmethod
    def open(cls, path: str | Path, *, use_gpu: bool | None = None,
             read_only: bool | None = False) -> ExemplarBank:
        """Open an existing bank folder (cleans up after interrupted writes, repairs the index).

        Args:
            path: the bank folder.
            use_gpu: passed to the search index (:class:`~napari_jras.core.index.EmbeddingIndex`).
            read_only: True never writes to the folder (changes raise :class:`BankError`);
                None opens read-only only when the folder or database cannot be written; False
                (default) refuses such a bank with a clear message.

        Raises:
            BankError: no bank at ``path``, a damaged or newer bank, or (``read_only=False``) a
                bank that cannot be written.
        """
        path = Path(path)
        db, read_only = open_database(path, read_only)
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
                if self._sync.dirty:
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
        return self._settings.size

    @property
    def num_classes(self) -> int:
        """Number of mask classes (background included)."""
        return self._settings.num_classes

    @property
    def embed_dim(self) -> int:
        """Length of the embeddings."""
        return self._settings.embed_dim

    @property
    def class_names(self) -> list[str]:
        """Names of the mask classes, background first."""
        return list(self._settings.class_names)

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

        Args:
            images: (N, H, W) in [0, 1], resized to the bank size.
            masks: (N, H, W) class indices (or booleans), resized to the bank size.
            provenance: one dict per exemplar; needs ``case_id`` and ``origin`` (training /
                correction / import); ``patient_id`` (default: from the case id),
                ``slice_index`` (0), ``source``, ``author`` and ``created`` (now, UTC) are
                optional, other keys are kept as extra fields.
            embeddings: (N, embed_dim), or None to add the exemplars without embeddings.
            retriever_version: the version that made ``embeddings`` (given with them only); it
                must be the version of the embeddings already stored.

        Returns:
            The new ids, in the order of ``images``.

        Raises:
            BankError: invalid input, another retriever version, or a read-only bank (nothing
                is added).
        """
        images, masks = checks.check_pixels(images, masks, self.size, self.num_classes)
        rows = checks.check_provenance(provenance, len(images))
        blobs = checks.embedding_blobs(embeddings, retriever_version, len(images), self.embed_dim)
        if not rows:
            return []
        version = retriever_version if embeddings is not None else None
        ids: list[int] = []
        with self._transaction() as db:
            if embeddings is not None:
                checks.check_version_matches(self._versions(), retriever_version)
            for row, blob in zip(rows, blobs, strict=True):
                ids.append(db.execute(
                    "INSERT INTO exemplars (case_id, patient_id, slice_index, source, origin, "
                    "author, created, extra, embedding, retriever_version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, blob, version)).lastrowid)
            self._pixels.write(ids, images, masks)
            was_current, token = self._sync.bump_token(db) if embeddings is not None \
                else (False, None)
        if token is not None:
            vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), -1)
            self._sync.added(ids, vecs, was_current, token)
        return ids

    @_locked
    def remove(self, ids: Iterable[int]) -> None:
        """Delete exemplars (rows, pixels and embeddings); unknown ids raise :class:`BankError`."""
        embedded = fetch(self._db, self._path, ids, "embedding IS NOT NULL")
        with self._transaction() as db:
            db.executemany("DELETE FROM exemplars WHERE id = ?", [(i,) for i in embedded])
            forget_packed(db, list(embedded))
            gone = [i for i, (has,) in embedded.items() if has]
            was_current, token = self._sync.bump_token(db) if gone else (False, None)
        self._pixels.discard(list(embedded))
        if token is not None:
            self._sync.removed(gone, was_current, token)

    # --- reading --------------------------------------------------------------------------
    @_locked
    def records(self, ids: Iterable[int] | None = None) -> list[dict]:
        """Id and provenance of the given exemplars (all, by id, when ``ids`` is None)."""
        if ids is None:
            return [record(r) for r in self._db.execute(
                f"SELECT {RECORD_COLUMNS} FROM exemplars ORDER BY id")]
        ids = id_list(ids)
        rows = fetch(self._db, self._path, ids, RECORD_COLUMNS)
        return [record(rows[i]) for i in ids]

    @_locked
    def images(self, ids: Iterable[int]) -> np.ndarray:
        """Images of the given exemplars, (N, size, size) float32 in [0, 1]."""
        return self._stack([p[0] for p in self._read_pixels(ids)]).astype(np.float32) / 255.0

    @_locked
    def masks(self, ids: Iterable[int]) -> np.ndarray:
        """Masks of the given exemplars, (N, size, size) uint8 class indices."""
        return self._stack([p[1] for p in self._read_pixels(ids)])

    @_locked
    def load_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every exemplar: (ids int64, images (N, size, size) float32, masks uint8), by id."""
        with snapshot(self._db):
            ids = [r[0] for r in self._db.execute("SELECT id FROM exemplars ORDER BY id")]
            pixels = self._read_pixels(ids)
        images = self._stack([p[0] for p in pixels]).astype(np.float32) / 255.0
        return np.asarray(ids, dtype=np.int64), images, self._stack([p[1] for p in pixels])

    # --- embeddings -----------------------------------------------------------------------
    @_locked
    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored embeddings: (ids int64, (N, D) float32), by id, without exemplars that have none.

        Raises :class:`BankError` naming the exemplars whose embedding is damaged.
        """
        ids, vecs, damaged = self._sync.read_embeddings(self._db)
        if damaged:
            raise checks.damaged_error(damaged, self._path)
        return ids, vecs

    @_locked
    def damaged_embeddings(self) -> list[int]:
        """Ids of exemplars whose stored embedding is damaged (wrong length or type, NaN)."""
        return self._sync.read_embeddings(self._db)[2]

    @_locked
    def set_embeddings(self, ids: Iterable[int], embeddings: np.ndarray,
                       retriever_version: str) -> None:
        """Replace every exemplar's embedding at once (after re-embedding the whole bank).

        Args:
            ids: exactly the bank's exemplar ids, each once, in the order of ``embeddings``.
            embeddings: (len(ids), embed_dim) finite numbers.
            retriever_version: the version that made them; it becomes the bank's only version.

        Raises:
            BankError: missing or unknown ids, invalid embeddings or version, or a read-only
                bank (nothing changes).
        """
        ids, vecs = checks.check_replacement(ids, embeddings, retriever_version, self.embed_dim)
        with self._transaction() as db:
            stored = {r[0] for r in db.execute("SELECT id FROM exemplars")}
            if stored != set(ids):
                raise BankError(
                    f"set_embeddings needs exactly the bank's {len(stored)} exemplars, got "
                    f"{len(ids)} ids ({len(stored - set(ids))} missing, "
                    f"{len(set(ids) - stored)} unknown); re-embed the whole bank")
            db.executemany("UPDATE exemplars SET embedding = ?, retriever_version = ? WHERE id = ?",
                           [(v.tobytes(), retriever_version, i) for i, v in zip(ids, vecs, strict=True)])
            _, token = self._sync.bump_token(db)
        self._sync.replaced(ids, vecs, token)
        self._try_save_index()

    @_locked
    def needs_embedding(self, retriever_version: str) -> bool:
        """True when some exemplar has no embedding or one made by another retriever version."""
        return self._db.execute(
            "SELECT COUNT(*) FROM exemplars WHERE embedding IS NULL OR retriever_version IS NOT ?",
            (retriever_version,)).fetchone()[0] > 0

    # --- maintenance ----------------------------------------------------------------------
    @_locked
    def pseudonymise(self, prefix: str = "patient",
                     save_key: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
        """Replace patient and case ids by pseudonyms; returns {old patient id: pseudonym}.

        See :func:`napari_jras.core.bank.pseudonyms.pseudonymise` (``save_key`` receives the key
        before any id is replaced; when it raises, the bank is left unchanged).
        """
        checks.check_prefix(prefix)
        self._check_writable("pseudonymising it")
        return pseudonymise(self._db, self._path, prefix, save_key)

    @_locked
    def rebuild_index(self) -> list[int]:
        """Rebuild the search index from the stored embeddings and save it.

        Returns the ids of exemplars left out because their embedding is damaged.
        """
        self._check_writable("rebuilding its index")
        self._sync_index(rebuild=True)
        return list(self._sync.damaged)

    @_locked
    def pack(self) -> tuple[int, Path]:
        """Move every exemplar's pixels into one new pack file (the bank stays writable).

        The stored archives are copied byte for byte (each is decoded first: damaged pixels
        refuse the whole pack, changing nothing); per-exemplar files and the previous pack are
        deleted once the new pack is committed. Exemplars added later get their own files again.
        Pack a bank while no other process reads it (a reader may otherwise miss the old pack).

        Returns:
            The number of exemplars packed and the new pack file.
        """
        self._check_writable("packing its pixels")
        with self._transaction() as db:
            ids, name, old = pack_pixels(db, self._path, self._pixels)
        self._pixels.discard(ids)
        if old is not None:
            self._pixels.pack_file(old).unlink(missing_ok=True)
        return len(ids), self._path / name

    # --- search ---------------------------------------------------------------------------
    @_locked
    def search(self, query_embeddings: np.ndarray, k: int, retriever_version: str,
               exclude_patients: Sequence[str | None] | None = None,
               exclude_ids: Sequence[Iterable[int]] | None = None) -> list[list[Hit]]:
        """The ``k`` most similar exemplars of each query, best first.

        A query gets fewer than ``k`` hits when fewer eligible exemplars exist.

        Args:
            query_embeddings: (Q, embed_dim) embeddings of the queries.
            k: the number of hits wanted per query.
            retriever_version: the version that made the queries; it must be the one of the
                stored embeddings.
            exclude_patients: per query, a patient whose exemplars are all left out of its
                results (no leakage), or None.
            exclude_ids: per query, single exemplar ids to leave out.

        Returns:
            One list of :class:`~napari_jras.core.bank.search.Hit` per query.

        Raises:
            BankError: a wrong query shape, ``k`` < 1, exclusion lists of another length, an
                empty bank, missing or damaged embeddings, or another retriever version.
        """
        queries = np.asarray(query_embeddings)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise BankError(f"Query embeddings must have shape (Q, {self.embed_dim}), got "
                            f"{queries.shape}: the retriever does not match this bank")
        with snapshot(self._db) as db:  # index, rows and counts from one state of the bank
            rebuilt = self._sync.refresh(db)
            total, embedded = db.execute(
                "SELECT COUNT(*), COUNT(embedding) FROM exemplars").fetchone()
            checks.check_search_ready(total, embedded, self._sync.damaged, self._path)
            checks.check_query_version(self._versions(), retriever_version)
            exclude = exclusions(db, len(queries), exclude_patients, exclude_ids)
            found = hits(db, self._path, self._sync.index, queries, k, exclude)
        if rebuilt:
            self._try_save_index()
        return found

    # --- internals ------------------------------------------------------------------------
    def _check_writable(self, action: str) -> None:
        if self._read_only:
            raise BankError(f"The bank at {self._path} is open read-only: {action} needs write "
                            "access (copy the bank to a writable folder, or open it for writing)")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._check_writable("changing it")
        with transaction(self._db, self._path):
            yield self._db

    def _versions(self) -> list[str]:
        return checks.check_stored_versions([r[0] for r in self._db.execute(
            "SELECT DISTINCT retriever_version FROM exemplars "
            "WHERE retriever_version IS NOT NULL ORDER BY 1")], self._path)

    def _read_pixels(self, ids: Iterable[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Checked (image, mask) of each id; unknown ids raise."""
        ids = id_list(ids)
        with nullcontext() if self._db.in_transaction else snapshot(self._db):
            fetch(self._db, self._path, ids, "id")
            pack = pack_name(self._db)
            return self._pixels.read(ids, packed_spans(self._db, self._path, ids, pack), pack)

    def _stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays) if arrays else np.empty((0, self.size, self.size), np.uint8)

    def _clean_orphans(self) -> None:
        """Delete pixel files no committed row uses (left by an interrupted add, remove or pack)."""
        with self._transaction() as db:  # the write lock waits for another process's add
            self._pixels.clean_orphans(unpacked_ids(db), pack_name(db))

    def _sync_index(self, rebuild: bool = False) -> None:
        """Make the cached index match the stored embeddings; save it when it was rebuilt."""
        with snapshot(self._db):
            rebuilt = self._sync.refresh(self._db, rebuild)
        if rebuilt:
            self._try_save_index()

    def _try_save_index(self) -> None:
        if not self._read_only:  # else the index lives in memory only
            self._sync.try_save(self._transaction)
