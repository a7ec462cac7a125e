"""Keeping a bank's search index (``index.faiss`` and its in-memory copy) in step with the
embeddings stored in the database.

The ``embeddings_token`` metadata entry changes with every change of the stored embeddings. The
cached index remembers the token it reflects, so each process notices the others' changes before
searching; ``index.faiss`` is trusted only when the ``index_token`` and ``index_sha256`` entries
written with it match. A damaged embedding (not ``embed_dim`` finite float32 values) is left out
of the index and reported.
"""

from __future__ import annotations

import hashlib
import sqlite3
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from ..errors import BankError
from ..index import EmbeddingIndex
from .schema import meta_value, new_token, set_meta

INDEX_FILE = "index.faiss"


class IndexSync:
    """The cached search index of one bank and the stored embeddings it reflects.

    Args:
        path: the bank folder.
        embed_dim: the embedding length.
        use_gpu: passed to :class:`EmbeddingIndex`.
    """

    def __init__(self, path: Path, embed_dim: int, use_gpu: bool | None) -> None:
        self._path = path
        self._embed_dim = embed_dim
        self._use_gpu = use_gpu
        self.index: EmbeddingIndex | None = None
        self.token: str | None = None  # embeddings_token the cached index reflects
        self.dirty = False  # cached index is newer than index.faiss
        self.damaged: list[int] = []  # exemplars whose embedding the cached index left out

    def read_embeddings(self, db: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The well-formed stored embeddings and the ids of damaged ones.

        Returns:
            ids (int64), (N, D) float32 vectors, by id, and the ids whose embedding is not a
            blob of ``embed_dim`` float32 values or holds NaN / infinity.
        """
        nbytes = self._embed_dim * 4
        ids, blobs, damaged = [], [], []
        for exemplar_id, blob in db.execute(
                "SELECT id, embedding FROM exemplars WHERE embedding IS NOT NULL ORDER BY id"):
            if isinstance(blob, bytes) and len(blob) == nbytes \
                    and np.isfinite(np.frombuffer(blob, dtype=np.float32)).all():
                ids.append(exemplar_id)
                blobs.append(blob)
            else:
                damaged.append(exemplar_id)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), self._embed_dim)
        return np.asarray(ids, dtype=np.int64), vecs, damaged

    # --- recording changes (the caller holds the write transaction) -------------------------
    def bump_token(self, db: sqlite3.Connection) -> tuple[bool, str]:
        """Mark the stored embeddings as changed (call inside a transaction).

        Returns:
            Whether the cached index matched them before the change, and the new token.
        """
        was_current = meta_value(db, "embeddings_token") == self.token
        token = new_token()
        db.execute("UPDATE meta SET value = ? WHERE key = 'embeddings_token'", (token,))
        return was_current, token

    def added(self, ids: Sequence[int], vecs: np.ndarray, was_current: bool, token: str) -> None:
        """Exemplars with embeddings were committed: add them to a current cached index.

        Args:
            ids: the new exemplars' ids.
            vecs: their (len(ids), embed_dim) float32 embeddings.
            was_current: whether the cached index matched the stored embeddings before the
                change (from :meth:`bump_token`); when not, it is reloaded before the next search.
            token: the new ``embeddings_token`` (from :meth:`bump_token`).
        """
        if was_current and self.index is not None:
            self.index.add(ids, vecs)
        elif was_current:
            self.index = EmbeddingIndex(ids, vecs, use_gpu=self._use_gpu)
        self._changed(was_current, token)

    def removed(self, gone: Sequence[int], was_current: bool, token: str) -> None:
        """Embedded exemplars were deleted: drop them from a current cached index.

        Args:
            gone: the deleted exemplars that had an embedding.
            was_current: as for :meth:`added`; an index that left out a deleted (damaged)
                embedding is reloaded instead.
            token: the new ``embeddings_token``.
        """
        was_current = was_current and not set(gone) & set(self.damaged)  # else: rebuild
        if was_current:
            self.index.remove(gone)
            self.index = self.index if len(self.index) else None
        self._changed(was_current, token)

    def replaced(self, ids: Sequence[int], vecs: np.ndarray, token: str) -> None:
        """Every embedding was replaced by ``vecs``: the cached index is built from them.

        Args:
            ids: every exemplar id of the bank.
            vecs: their (len(ids), embed_dim) float32 embeddings.
            token: the new ``embeddings_token``.
        """
        self.index = EmbeddingIndex(ids, vecs, use_gpu=self._use_gpu) if ids else None
        self.damaged = []
        self._changed(True, token)

    def _changed(self, was_current: bool, token: str) -> None:
        """Record that the cached index was updated to ``token`` (or must be reloaded)."""
        self.token = token if was_current else None
        self.dirty = was_current

    # --- reading ----------------------------------------------------------------------------
    def refresh(self, db: sqlite3.Connection, rebuild: bool = False) -> bool:
        """Inside a transaction: reuse, load or rebuild the cached index.

        Returns:
            True when the index was rebuilt (and should be saved).
        """
        token = meta_value(db, "embeddings_token")
        if token == self.token and not rebuild:
            return False
        ids, vecs, damaged = self.read_embeddings(db)
        index = None if rebuild else self._load_file(db, token, len(ids))
        rebuilt = index is None
        if rebuilt and ids.size:
            index = EmbeddingIndex(ids, vecs, use_gpu=self._use_gpu)
        self.index, self.token, self.dirty = index, token, False
        self.damaged = damaged
        return rebuilt

    def _load_file(self, db: sqlite3.Connection, token: str, count: int) -> EmbeddingIndex | None:
        """The saved index when it matches the ``count`` well-formed stored embeddings, or None."""
        file = self._path / INDEX_FILE
        try:
            before = _identity(file)
            if meta_value(db, "index_token") != token or meta_value(db, "index_sha256") \
                    != _sha256(file):
                return None
            index = EmbeddingIndex.load(file, self._embed_dim, use_gpu=self._use_gpu)
            if _identity(file) != before:  # another process replaced it meanwhile
                return None
        except (BankError, OSError):
            return None
        return index if len(index) == count else None

    def try_save(self, transaction: Callable[[], AbstractContextManager[sqlite3.Connection]]
                 ) -> None:
        """Write index.faiss; failure only costs a rebuild next time, so it is a warning.

        The file and the metadata naming the embeddings it reflects are written under the
        write lock, so that concurrent processes never mix or mislabel index files; a cached
        index that another process's change made stale is not saved.

        Args:
            transaction: opens the bank's write transaction, yielding its connection.
        """
        file = self._path / INDEX_FILE
        try:
            with transaction() as db:
                if meta_value(db, "embeddings_token") == self.token:
                    if self.index is None:
                        file.unlink(missing_ok=True)
                    else:
                        self.index.save(file)
                        set_meta(db, index_token=self.token, index_sha256=_sha256(file))
            self.dirty = False
        except (BankError, OSError) as exc:
            warnings.warn(f"Could not save the search index of {self._path}: {exc}", stacklevel=4)


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
