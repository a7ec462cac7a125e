"""Packed bank pixels: one pack file instead of one file per exemplar (``napari-jras bank pack``).

Packing keeps ids, records, pixels and embeddings; a packed bank stays writable (new exemplars
get their own files), crashes during a pack leave the old or the new layout, per-file banks open
unchanged, and the built-in bank ships packed with the content it had as 371 files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from test_bank import CLASSES, DIM, SIZE, exemplars, unit

import napari_jras.core.bank.pack as pack_module
from napari_jras.cli import main
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.bank.pixels import PixelStore
from napari_jras.core.errors import BankError
from napari_jras.core.workspace import builtin_model_dir


def _filled(tmp_path: Path, n: int = 6) -> tuple[Path, list[int]]:
    path = tmp_path / "bank"
    images, masks, prov = exemplars(n)
    with ExemplarBank.create(path, SIZE, CLASSES, DIM) as b:
        ids = b.add(images, masks, prov, unit(n), "v1")
    return path, ids


def _content(path: Path) -> tuple:
    """Everything a bank holds, as comparable values."""
    with ExemplarBank.open(path, read_only=True) as b:
        ids, images, masks = b.load_all()
        return (ids.tolist(), images.tobytes(), masks.tobytes(), b.embeddings()[1].tobytes(),
                b.records(), b.retriever_version)


def _meta(path: Path, key: str) -> str | None:
    with sqlite3.connect(path / "bank.sqlite") as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def _packs(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("pixels-*.pack"))


def test_pack_keeps_the_content_and_replaces_the_files(tmp_path):
    path, ids = _filled(tmp_path)
    before = _content(path)
    index_before = (path / "index.faiss").read_bytes()
    with ExemplarBank.open(path) as b:
        count, file = b.pack()
        assert count == len(ids) and file.parent == path
        assert [h[0].id for h in b.search(unit(6), 1, "v1")] == ids
    assert _content(path) == before
    assert list((path / "pixels").iterdir()) == [] and _packs(path) == [file.name]
    assert _meta(path, "format_version") == "2" and _meta(path, "pixel_pack") == file.name
    assert (path / "index.faiss").read_bytes() == index_before  # embeddings were not touched


def _dump(path: Path) -> list[str]:
    db = sqlite3.connect(path / "bank.sqlite")
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_a_per_file_bank_opens_unchanged(tmp_path):
    path, ids = _filled(tmp_path)
    files = sorted(p.name for p in (path / "pixels").iterdir())
    database = _dump(path)
    with ExemplarBank.open(path) as b:
        b.load_all()
        b.search(unit(6), 2, "v1")
    assert _dump(path) == database  # no pack table, same metadata: older versions still read it
    assert _meta(path, "format_version") == "1" and _meta(path, "pixel_pack") is None
    assert sorted(p.name for p in (path / "pixels").iterdir()) == files == \
        sorted(f"{i}.npz" for i in ids)
    assert _packs(path) == []


def test_a_packed_bank_stays_writable(tmp_path):
    path, ids = _filled(tmp_path)
    images, masks, prov = exemplars(3, seed=1, patient="q")
    with ExemplarBank.open(path) as b:
        b.pack()
        new = b.add(images, masks, prov, unit(3, seed=1), "v1")  # into their own files
        assert sorted(p.name for p in (path / "pixels").iterdir()) == \
            sorted(f"{i}.npz" for i in new)
        b.remove([ids[0], new[0]])
        assert not (path / "pixels" / f"{new[0]}.npz").exists()
        np.testing.assert_array_equal(b.masks(new[1:]), masks[1:])
        np.testing.assert_array_equal(b.masks(ids[1:2]), exemplars(6)[1][1:2])
        before = _content(path)
        old_pack = _packs(path)
        b.pack()  # packs again: every exemplar, the old pack and the files go
        assert len(_packs(path)) == 1 and _packs(path) != old_pack
        assert list((path / "pixels").iterdir()) == []
    assert _content(path) == before
    with sqlite3.connect(path / "bank.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM packed_pixels").fetchone()[0] == len(ids) + 1


def test_a_packed_bank_opens_without_its_pixels_folder(tmp_path):
    path, ids = _filled(tmp_path)
    with ExemplarBank.open(path) as b:
        b.pack()
    before = _content(path)
    (path / "pixels").rmdir()  # git and wheels do not keep empty folders
    with ExemplarBank.open(path) as b:
        assert _content(path) == before
        [new] = b.add(*exemplars(1, seed=2), unit(1, seed=2), "v1")  # the folder is made again
    assert (path / "pixels" / f"{new}.npz").is_file()


def test_pack_interrupted_before_the_commit_changes_nothing(tmp_path, monkeypatch):
    path, ids = _filled(tmp_path)
    before = _content(path)

    def fail(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(pack_module, "set_meta", fail)
    with ExemplarBank.open(path) as b, pytest.raises(BankError, match="disk I/O error"):
        b.pack()
    monkeypatch.undo()
    assert _packs(path) == [] and _meta(path, "format_version") == "1"
    assert _content(path) == before


class Died(BaseException):
    """The process dies here."""


def test_leftovers_of_a_pack_are_cleaned_when_opened(tmp_path, monkeypatch):
    path, ids = _filled(tmp_path)
    with ExemplarBank.open(path) as b:
        b.pack()
        old = _packs(path)
        [new] = b.add(*exemplars(1, seed=3), unit(1, seed=3), "v1")
    before = _content(path)

    def die(self, ids):
        raise Died

    monkeypatch.setattr(PixelStore, "discard", die)  # after the commit, before cleaning up
    with ExemplarBank.open(path) as b, pytest.raises(Died):
        b.pack()
    monkeypatch.undo()
    assert len(_packs(path)) == 2 and (path / "pixels" / f"{new}.npz").is_file()
    stray = path / f"pixels-{'0' * 32}.pack"
    stray.write_bytes(b"a pack whose commit never happened")
    with ExemplarBank.open(path):
        pass
    assert _packs(path) == [_meta(path, "pixel_pack")] != old
    assert list((path / "pixels").iterdir()) == []
    assert _content(path) == before


def test_damaged_or_missing_pack_names_the_exemplar(tmp_path):
    path, ids = _filled(tmp_path)
    with ExemplarBank.open(path) as b:
        _, file = b.pack()
    data = bytearray(file.read_bytes())
    with sqlite3.connect(path / "bank.sqlite") as db:
        offset, length = db.execute("SELECT byte_offset, byte_length FROM packed_pixels "
                                    "WHERE id = ?", (ids[1],)).fetchone()
    data[offset + length // 2] ^= 0xFF  # inside the compressed pixels of the second exemplar
    file.write_bytes(bytes(data))
    with ExemplarBank.open(path) as b:
        np.testing.assert_array_equal(b.masks(ids[:1]), exemplars(6)[1][:1])
        with pytest.raises(BankError, match=f"pixels of exemplar {ids[1]} are damaged"):
            b.masks(ids[1:2])
        with pytest.raises(BankError, match=f"pixels of exemplar {ids[1]} are damaged"):
            b.pack()  # damaged pixels are never packed again silently
    file.write_bytes(bytes(data[:offset]))  # cut short
    with ExemplarBank.open(path) as b, \
            pytest.raises(BankError, match=f"pixels of exemplar {ids[1]} are damaged"):
        b.load_all()
    file.unlink()
    with ExemplarBank.open(path) as b, \
            pytest.raises(BankError, match=f"pixels of exemplar {ids[0]} are missing"):
        b.images(ids[:1])


def test_a_pack_name_that_is_not_a_pack_is_refused(tmp_path):
    path, ids = _filled(tmp_path)
    with ExemplarBank.open(path) as b:
        b.pack()
    with sqlite3.connect(path / "bank.sqlite") as db:
        db.execute("UPDATE meta SET value = '../../etc/passwd' WHERE key = 'pixel_pack'")
    with ExemplarBank.open(path) as b, pytest.raises(BankError, match="not a pack file name"):
        b.masks(ids[:1])


def test_a_read_only_packed_bank_is_read(tmp_path, read_only_folder):
    path, ids = _filled(tmp_path)
    with ExemplarBank.open(path) as b:
        b.pack()
    before = _content(path)
    with read_only_folder(path), ExemplarBank.open(path, read_only=None) as b:
        assert b.read_only and _content(path) == before
        with pytest.raises(BankError, match="open read-only: packing its pixels needs write"):
            b.pack()


def test_cli_bank_pack(tmp_path, capsys):
    path, ids = _filled(tmp_path)
    assert main(["bank", "pack", "--bank", str(path)]) == 0
    [name] = _packs(path)
    assert capsys.readouterr().out.startswith(f"Packed the pixels of {len(ids)} exemplar(s) "
                                              f"into {name} (")
    assert main(["bank", "pack", "--bank", str(tmp_path / "nothing")]) == 2
    assert "napari-jras bank: error: No exemplar bank folder" in capsys.readouterr().err


# ids, masks and images: computed from the built-in bank as it shipped before packing (371 files
# under pixels/, commit e3d4071); packing must not change a single one. Embeddings and records:
# those of the built-in model retrained with the readout fusion (docs/builtin_model.md), whose
# retriever embedded the same 371 slices.
BUILTIN_SHA256 = {
    "ids": "80abf252f42e5ca284cfc3303b3f950cc1d48b141fbb157e424853c1d039ebf0",
    "masks": "2c086cef13932e0b4d6936779b9aa7492bec4b2499396f0495ab2b70cdfb1409",
    "images": "8e6b97c5d3ae03390a977a21e4cde367a6213bad36374513da174fc71b1a5329",
    "embeddings": "67751bc02f808d9a1bbce77d0d0a6bc37f9a3bc0102b5491604d00070d74be31",
    "records": "f5c70f2cd8639956fc2e8710a0f40173592c32d494da52f6223ec12b856a09d2",
}


def test_builtin_bank_ships_packed_with_its_content(tmp_path):
    shipped = builtin_model_dir() / "bank"
    assert not list(shipped.glob("pixels/*.npz")) and len(list(shipped.glob("*.pack"))) == 1
    path = tmp_path / "bank"
    shutil.copytree(shipped, path)  # never opened in place: a test must not change it

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    with ExemplarBank.open(path, read_only=True) as b:
        ids, images, masks = b.load_all()
        got = {"ids": sha(ids.tobytes()), "masks": sha(masks.tobytes()),
               "images": sha(np.round(images * 255).astype(np.uint8).tobytes()),
               "embeddings": sha(b.embeddings()[1].tobytes()),
               "records": sha(json.dumps(b.records(), sort_keys=True).encode())}
    assert len(ids) == 371 and got == BUILTIN_SHA256


def test_bank_tools_return_data_and_print_nothing(tmp_path, capsys):
    from napari_jras.core import bank_tools

    path, ids = _filled(tmp_path)
    with sqlite3.connect(path / "bank.sqlite") as db:
        db.execute("UPDATE exemplars SET embedding = ? WHERE id = ?", (b"\x00" * 7, ids[2]))
    with ExemplarBank.open(path) as b:
        info, records = bank_tools.listing(b, 2)
        assert info["exemplars"] == len(ids) and info["damaged_embeddings"] == [ids[2]]
        assert [r["id"] for r in records] == ids[:2] and bank_tools.listing(b, 0)[1] == []
        result = bank_tools.rebuild(b)
        assert result == bank_tools.RebuildResult(None, [], len(ids) - 1, [ids[2]])
    assert bank_tools.pack(path)[:1] == (len(ids),)
    assert bank_tools.distinct_ids([3, 1, 3]) == [3, 1]
    assert capsys.readouterr() == ("", "")


def test_a_failed_create_closes_its_database(tmp_path, monkeypatch):
    from napari_jras.core.bank import exemplar_bank

    closed = []
    real = exemplar_bank.create_database

    def recording(*args, **kwargs):
        db = real(*args, **kwargs)

        class Db:  # the real connection, with its close recorded
            def __getattr__(self, name):
                return getattr(db, name)

            def close(self):
                closed.append(True)
                db.close()
        return Db()

    def failing_init(self, *args, **kwargs):
        raise RuntimeError("index could not be built")

    monkeypatch.setattr(exemplar_bank, "create_database", recording)
    monkeypatch.setattr(exemplar_bank.ExemplarBank, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="index could not be built"):
        exemplar_bank.ExemplarBank.create(tmp_path / "bank", size=16, num_classes=2, embed_dim=4)
    assert closed == [True]
