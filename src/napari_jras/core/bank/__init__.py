"""Exemplar bank: a folder of annotated slices with their embeddings and provenance.

Layout (copy the whole folder to move or share a bank)::

    bank.sqlite           metadata, provenance and embeddings with the retriever version that
                          made them (WAL mode, one transaction per change)
    pixels/<id>.npz       compressed image (uint8, 0..255) and mask (uint8 class indices)
    pixels-<token>.pack   packed banks only (``napari-jras bank pack``): the same archives of
                          many exemplars in one file, located by the ``packed_pixels`` table
    index.faiss           search index, derived from the stored embeddings; rebuilt when
                          missing, stale or damaged

Crash safety: pixel files are written under temporary names, renamed into place, then the rows are
committed in one transaction; files without a committed row are deleted when the bank is opened.

Several processes may use one bank. Every change (rows, pixel files, ``index.faiss`` and the
metadata that says which embeddings it reflects) happens inside one SQLite write transaction
(``BEGIN IMMEDIATE``): writers queue up behind each other (busy timeout
``schema.BUSY_TIMEOUT_S``, then a :class:`BankError` "busy"), readers are never blocked by the
WAL journal and each process notices the others' embedding changes before searching. Nothing
stored in the bank is ever used as a path: pixel files are named after integer ids, pack names
are checked and retriever versions must be plain tokens.

A bank on a read-only folder (a read-only mount, a shared archive) opens read-only
(``open(..., read_only=True)``, or ``None``: read-only only when it cannot be written): searching
and reading work, nothing is cleaned up or saved, and every change is refused with a
:class:`BankError` saying the bank is read-only. A damaged embedding (not ``embed_dim`` finite
float32 values) never stops a bank from opening: it is left out of the index, reported by
:meth:`ExemplarBank.damaged_embeddings`, refused by search, and repaired by re-embedding.

Modules: :mod:`.schema` (database, format versions, transactions), :mod:`.pixels` (pixel
files and packs), :mod:`.pack` (packing), :mod:`.index_sync` (search index),
:mod:`.checks` (provenance and integrity), :mod:`.search`, :mod:`.pseudonyms`, and
:mod:`.exemplar_bank` (the :class:`ExemplarBank` facade).
"""

from ..errors import BankError
from .checks import ORIGINS, PROVENANCE_KEYS
from .exemplar_bank import ExemplarBank
from .index_sync import INDEX_FILE
from .pixels import PIXELS_DIR
from .schema import DB_FILE, FORMAT, FORMAT_VERSION, is_writable
from .search import Hit

__all__ = ["DB_FILE", "FORMAT", "FORMAT_VERSION", "INDEX_FILE", "ORIGINS", "PIXELS_DIR",
           "PROVENANCE_KEYS", "BankError", "ExemplarBank", "Hit", "is_writable"]
