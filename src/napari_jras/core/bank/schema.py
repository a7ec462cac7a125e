"""The bank's SQLite database: schema, format versions, connections and transactions.

Format versions: 1 stores every exemplar's pixels in its own file under ``pixels/``; 2 adds the
``packed_pixels`` table for exemplars whose pixels live in one pack file (see
:mod:`.pixels`). A bank is only raised to version 2 when it is packed, so banks that were never
packed stay readable by older napari-jras versions, and a packed bank is refused by them with
"made by a newer napari-jras" rather than read wrongly.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import BankError
from .pixels import PIXELS_DIR

FORMAT = "napari-jras-bank"
FORMAT_VERSION = 2  # the newest format this version reads
FILES_FORMAT_VERSION = 1  # every exemplar's pixels in their own file (what create writes)
PACKED_FORMAT_VERSION = 2  # some exemplars' pixels in a pack file
DB_FILE = "bank.sqlite"
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
PACKED_TABLE = """CREATE TABLE IF NOT EXISTS packed_pixels (
    id INTEGER PRIMARY KEY,
    byte_offset INTEGER NOT NULL,
    byte_length INTEGER NOT NULL
)"""


@dataclass(frozen=True)
class BankSettings:
    """The fixed settings of a bank, read from its ``meta`` table."""

    size: int
    num_classes: int
    embed_dim: int
    class_names: list[str]


def new_token() -> str:
    """A fresh random token (marks a change of the stored embeddings, names a pack file)."""
    return uuid.uuid4().hex


def create_schema(db: sqlite3.Connection, path: Path, settings: BankSettings) -> None:
    """Create the tables of a new (format 1) bank and store its settings, in one transaction.

    Args:
        db: a connection to the new, empty database file.
        path: the bank folder (for error messages).
        settings: the bank's size, classes and embedding size.
    """
    meta = {"format": FORMAT, "format_version": FILES_FORMAT_VERSION, "size": settings.size,
            "num_classes": settings.num_classes, "embed_dim": settings.embed_dim,
            "class_names": json.dumps(list(settings.class_names)),
            "embeddings_token": new_token()}
    with transaction(db, path):
        for statement in SCHEMA:
            db.execute(statement)
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])


def create_database(path: Path, settings: BankSettings) -> sqlite3.Connection:
    """Create the folder (new or empty), ``pixels/`` and the database of a new bank.

    Returns:
        A read-write connection to the new database.
    """
    if (path / DB_FILE).exists():
        raise BankError(f"A bank already exists at {path}: open it, or choose a new folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BankError(f"{path} is not an empty folder: choose a new folder for the bank")
    try:
        (path / PIXELS_DIR).mkdir(parents=True, exist_ok=True)
        db = connect(path / DB_FILE)
    except (OSError, sqlite3.Error) as exc:
        raise BankError(f"Cannot create a bank at {path}: {exc}") from exc
    create_schema(db, path, settings)
    return db


def open_database(path: Path, read_only: bool | None) -> tuple[sqlite3.Connection, bool]:
    """Connect to the database of the bank folder ``path``.

    Args:
        path: the bank folder.
        read_only: True: never write; None: read-only only when the folder or database cannot
            be written; False: refuse a bank that cannot be written.

    Returns:
        The connection and whether it is read-only.
    """
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
        db = connect_read_only(path / DB_FILE, writable) if read_only else connect(path / DB_FILE)
    except sqlite3.Error as exc:
        raise BankError(f"Cannot open the bank at {path}: {exc} (is {DB_FILE} damaged?)") from exc
    return db, read_only


def read_settings(db: sqlite3.Connection, path: Path) -> BankSettings:
    """Check that ``db`` is a bank this version can read and return its settings.

    Raises:
        BankError: not a bank, made by a newer napari-jras, or damaged metadata.
    """
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT:
            raise BankError(f"{path} is not a napari-jras exemplar bank")
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise BankError(f"The bank at {path} was made by a newer napari-jras: upgrade it")
        settings = BankSettings(int(meta["size"]), int(meta["num_classes"]),
                                int(meta["embed_dim"]), list(json.loads(meta["class_names"])))
        if db.execute("SELECT COUNT(*) FROM exemplars WHERE typeof(id) != 'integer'"
                      ).fetchone()[0]:
            raise ValueError("some exemplar ids are not whole numbers")
    except (KeyError, ValueError, TypeError) as exc:
        raise BankError(f"The bank metadata in {path / DB_FILE} is damaged ({exc})") from exc
    return settings


def meta_value(db: sqlite3.Connection, key: str) -> str | None:
    """The value of ``key`` in the ``meta`` table, or None."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(db: sqlite3.Connection, **values: str | None) -> None:
    """Set (or, for None, delete) ``meta`` entries; call inside a write transaction."""
    for key, value in values.items():
        if value is None:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def id_list(ids: Iterable[int]) -> list[int]:
    """``ids`` as a list of Python ints; raises :class:`BankError` for anything else."""
    try:
        return [operator.index(i) for i in ids]
    except TypeError as exc:
        raise BankError(f"Exemplar ids must be whole numbers ({exc})") from exc


def fetch(db: sqlite3.Connection, path: Path, ids: Iterable[int], columns: str,
          table: str = "exemplars") -> dict[int, tuple]:
    """Rows of ``ids`` keyed by id, in the given order.

    Args:
        db: the bank's connection.
        path: the bank folder (for error messages).
        ids: exemplar ids.
        columns: the SQL column list to select (besides the id).
        table: ``exemplars``, or ``packed_pixels`` (where missing ids are simply left out).

    Raises:
        BankError: an id of ``exemplars`` that does not exist.
    """
    ids = id_list(ids)
    rows: dict[int, tuple] = {}
    for start in range(0, len(ids), SQL_CHUNK):
        part = ids[start:start + SQL_CHUNK]
        for row in db.execute(f"SELECT id, {columns} FROM {table} WHERE id IN "
                              f"({', '.join('?' * len(part))})", part):
            rows[row[0]] = row[1:]
    if table != "exemplars":
        return rows
    missing = [i for i in ids if i not in rows]
    if missing:
        raise BankError(f"No exemplar with id {missing[0]} in the bank at {path}")
    return {i: rows[i] for i in ids}


def connect(file: Path) -> sqlite3.Connection:
    """A read-write connection (busy timeout ``BUSY_TIMEOUT_S``, fully synchronous commits)."""
    db = sqlite3.connect(file, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA synchronous = FULL")  # a committed change survives a power cut
    return db


def connect_read_only(file: Path, writable: bool) -> sqlite3.Connection:
    """A connection that never writes to the database (or, on a read-only folder, its folder).

    SQLite needs the ``-wal``/``-shm`` files of a WAL database; in a folder that cannot be
    written they cannot be created, so a database without pending changes is opened as
    immutable. Pending changes in a ``-wal`` file that cannot be read that way are refused.

    Args:
        file: the database file.
        writable: whether the bank folder can be written (see :func:`is_writable`).
    """
    if writable:  # a plain connection removes its -wal/-shm files on close; mode=ro leaves them
        db = connect(file)
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


def is_writable(folder: str | Path) -> bool:
    """True when a bank folder and its database can be written (not a read-only mount)."""
    folder = Path(folder)
    pixels = folder / PIXELS_DIR
    return os.access(folder, os.W_OK) and os.access(folder / DB_FILE, os.W_OK) \
        and (not pixels.is_dir() or os.access(pixels, os.W_OK))


@contextmanager
def transaction(db: sqlite3.Connection, path: Path) -> Iterator[None]:
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


@contextmanager
def snapshot(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction: one consistent state of the bank, never waiting for writers (WAL)."""
    db.execute("BEGIN")
    try:
        yield db
    finally:
        if db.in_transaction:
            db.execute("COMMIT")
