"""Packing a bank's pixels into one file, and where the packed ones are (see :mod:`.pixels`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from .pixels import PixelStore
from .schema import PACKED_FORMAT_VERSION, PACKED_TABLE, fetch, meta_value, set_meta


def pack_name(db: sqlite3.Connection) -> str | None:
    """The file name of the bank's pixel pack (None when it has none)."""
    return meta_value(db, "pixel_pack")


def packed_spans(db: sqlite3.Connection, path: Path, ids: Sequence[int],
                 pack: str | None) -> dict[int, tuple[int, int]]:
    """(byte offset, byte length) in the pack ``pack`` of those ``ids`` stored there.

    Args:
        db: the bank's connection.
        path: the bank folder (for error messages).
        ids: exemplar ids.
        pack: the pack's file name (None when the bank has none: the result is empty).

    Returns:
        The spans keyed by id; ids whose pixels are in their own file are left out.
    """
    if pack is None:
        return {}
    return fetch(db, path, ids, "byte_offset, byte_length", "packed_pixels")


def unpacked_ids(db: sqlite3.Connection) -> set[int]:
    """Ids of the exemplars whose pixels are in their own file."""
    ids = {r[0] for r in db.execute("SELECT id FROM exemplars")}
    if pack_name(db) is not None:
        ids -= {r[0] for r in db.execute("SELECT id FROM packed_pixels")}
    return ids


def forget_packed(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Drop the pack entries of deleted exemplars (inside their write transaction); their bytes
    stay in the pack until it is written again."""
    if pack_name(db) is not None:
        db.executemany("DELETE FROM packed_pixels WHERE id = ?", [(i,) for i in ids])


def pack_pixels(db: sqlite3.Connection, path: Path,
                store: PixelStore) -> tuple[list[int], str, str | None]:
    """Copy every exemplar's pixels into a new pack file; call inside a write transaction.

    The stored archives are copied byte for byte, each decoded first (damaged pixels raise
    :class:`BankError` and nothing changes). The new pack is written (crash-safe) before the
    ``packed_pixels`` table and the ``pixel_pack`` entry switch to it; the bank's format version
    becomes 2. The caller deletes the per-exemplar files and the previous pack after the commit.

    Args:
        db: the bank's connection, inside a write transaction.
        path: the bank folder.
        store: the bank's pixel store.

    Returns:
        The packed ids, the new pack's file name and the previous one (None: there was none).
    """
    old = pack_name(db)
    ids = [r[0] for r in db.execute("SELECT id FROM exemplars ORDER BY id")]
    name, spans = store.write_pack(store.raw(ids, packed_spans(db, path, ids, old), old))
    try:
        db.execute(PACKED_TABLE)
        db.execute("DELETE FROM packed_pixels")
        db.executemany("INSERT INTO packed_pixels VALUES (?, ?, ?)",
                       [(i, *span) for i, span in zip(ids, spans, strict=True)])
        set_meta(db, pixel_pack=name, format_version=str(PACKED_FORMAT_VERSION))
    except BaseException:
        (path / name).unlink(missing_ok=True)
        raise
    return ids, name, old
