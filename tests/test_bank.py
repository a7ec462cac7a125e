"""ExemplarBank: persistence, search without leakage, versions, crash safety, validation."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import napari_jras.core.bank.pixels as pixels_module
from napari_jras.core.bank import ExemplarBank, Hit
from napari_jras.core.errors import BankError

SIZE, CLASSES, DIM = 16, 3, 8


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exemplars(n: int, seed: int = 0, shape: tuple[int, int] = (SIZE, SIZE), patient: str = "p"):
    """n random (images, masks, provenance) with two slices per patient."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, *shape), dtype=np.float32)
    masks = rng.integers(0, CLASSES, (n, *shape))
    provenance = [{"case_id": f"{patient}{i // 2}_slice{i % 2}", "slice_index": i % 2,
                   "source": f"/data/{patient}{i // 2}.nii.gz", "origin": "training"}
                  for i in range(n)]
    return images, masks, provenance


@pytest.fixture
def bank(tmp_path):
    with ExemplarBank.create(tmp_path / "bank", SIZE, CLASSES, DIM) as b:
        yield b


def test_create_open_round_trip(tmp_path):
    images, masks, prov = exemplars(4)
    prov[0].update(author="dr. who", scanner="1.5T")
    with ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM, ["bg", "lv", "myo"]) as b:
        ids = b.add(images, masks, prov, unit(4), "v1")
        records = b.records()
    with ExemplarBank.open(tmp_path / "b") as b:
        assert (b.size, b.num_classes, b.embed_dim) == (SIZE, CLASSES, DIM)
        assert b.class_names == ["bg", "lv", "myo"] and b.retriever_version == "v1"
        assert len(b) == 4 and b.records() == records == b.records(ids)
        got_ids, got_images, got_masks = b.load_all()
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got_images, images, atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(got_masks, masks)
        np.testing.assert_array_equal(b.masks(ids[::-1]), masks[::-1])
        np.testing.assert_array_equal(b.embeddings()[1], unit(4))
    first = records[0]
    assert first["id"] == ids[0] and first["patient_id"] == "p0" and first["case_id"] == "p0_slice0"
    assert first["author"] == "dr. who" and first["scanner"] == "1.5T"
    assert first["origin"] == "training" and first["created"].endswith("+00:00")
    assert records[1]["author"] is None and records[1]["slice_index"] == 1


def test_images_of_any_size_are_resized(bank):
    images, masks, prov = exemplars(2, shape=(40, 24))
    ids = bank.add(images, masks, prov)
    assert bank.images(ids).shape == (2, SIZE, SIZE) and bank.images(ids).dtype == np.float32
    assert bank.masks(ids).dtype == np.uint8 and bank.masks(ids).max() < CLASSES


def test_create_refuses_existing_bank_or_used_folder(tmp_path):
    ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM).close()
    with pytest.raises(BankError, match="already exists"):
        ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(BankError, match="not an empty folder"):
        ExemplarBank.create(tmp_path / "data", SIZE, CLASSES, DIM)
    with pytest.raises(BankError, match="class_names"):
        ExemplarBank.create(tmp_path / "c", SIZE, CLASSES, DIM, ["only one"])


def test_added_exemplar_is_searchable_at_once(bank):
    images, masks, prov = exemplars(6)
    bank.add(images, masks, prov, unit(6), "v1")
    query = unit(1, seed=9)
    [new_id] = bank.add(images[:1], masks[:1], [{"case_id": "x", "origin": "correction"}],
                        query, "v1")
    [hits] = bank.search(query, 2, "v1")
    assert isinstance(hits[0], Hit) and hits[0].id == new_id
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].record["origin"] == "correction" and hits[0].record["id"] == new_id


def test_same_patient_is_excluded(bank):
    images, masks, prov = exemplars(8)  # patients p0..p3, two slices each
    emb = unit(8)
    ids = bank.add(images, masks, prov, emb, "v1")
    results = bank.search(emb[:3], 8, "v1", exclude_patients=["p0", "p1", None])
    assert {h.record["patient_id"] for h in results[0]} == {"p1", "p2", "p3"}
    assert "p1" not in {h.record["patient_id"] for h in results[1]}
    assert len(results[2]) == 8 and results[2][0].id == ids[2]
    [hits] = bank.search(emb[:1], 3, "v1", exclude_patients=["p1"], exclude_ids=[{ids[0]}])
    assert all(h.id != ids[0] and h.record["patient_id"] != "p1" for h in hits)


def test_retriever_version_mismatch(bank):
    images, masks, prov = exemplars(4)
    ids = bank.add(images, masks, prov, unit(4), "v1")
    with pytest.raises(BankError, match="re-embed"):
        bank.search(unit(1), 2, "v2")
    with pytest.raises(BankError, match="re-embed"):
        bank.add(images, masks, prov, unit(4), "v2")
    assert len(bank) == 4 and not bank.needs_embedding("v1") and bank.needs_embedding("v2")
    bank.set_embeddings(ids, unit(4, seed=5), "v2")
    assert bank.retriever_version == "v2" and not bank.needs_embedding("v2")
    assert bank.search(unit(4, seed=5)[:1], 1, "v2")[0][0].id == ids[0]
    with pytest.raises(BankError, match="exactly the bank's 4 exemplars"):
        bank.set_embeddings(ids[:3], unit(3), "v3")


def test_exemplars_without_embeddings_block_search(bank):
    images, masks, prov = exemplars(3)
    bank.add(images[:2], masks[:2], prov[:2], unit(2), "v1")
    bank.add(images[2:], masks[2:], prov[2:])
    assert bank.needs_embedding("v1")
    with pytest.raises(BankError, match="1 of 3 exemplars have no embedding"):
        bank.search(unit(1), 1, "v1")


def test_empty_bank_search_raises(bank):
    assert bank.retriever_version is None and not bank.needs_embedding("v1")
    with pytest.raises(BankError, match="add exemplars first"):
        bank.search(unit(1), 2, "v1")


def test_bad_queries_raise(bank):
    images, masks, prov = exemplars(2)
    bank.add(images, masks, prov, unit(2), "v1")
    with pytest.raises(BankError, match=r"shape \(Q, 8\)"):
        bank.search(np.ones((1, 4), np.float32), 1, "v1")
    with pytest.raises(BankError, match="k must be"):
        bank.search(unit(1), 0, "v1")


def test_k_larger_than_bank_returns_fewer(bank):
    images, masks, prov = exemplars(3)
    bank.add(images, masks, prov, unit(3), "v1")
    [hits] = bank.search(unit(1, seed=3), 10, "v1")
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    [hits] = bank.search(unit(1, seed=3), 10, "v1", exclude_patients=["p0"])
    assert [h.record["patient_id"] for h in hits] == ["p1"]


def test_remove(bank):
    images, masks, prov = exemplars(4)
    emb = unit(4)
    ids = bank.add(images, masks, prov, emb, "v1")
    bank.remove([ids[1]])
    assert len(bank) == 3 and ids[1] not in [r["id"] for r in bank.records()]
    assert not (bank.path / "pixels" / f"{ids[1]}.npz").exists()
    assert bank.search(emb[1:2], 3, "v1")[0][0].id != ids[1]
    with pytest.raises(BankError, match=f"No exemplar with id {ids[1]}"):
        bank.images([ids[1]])
    with pytest.raises(BankError, match="No exemplar"):
        bank.remove([ids[1]])
    bank.remove(ids[:1] + ids[2:])
    assert len(bank) == 0 and bank.retriever_version is None


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_index_file_is_rebuilt(tmp_path, damage):
    images, masks, prov = exemplars(6)
    emb = unit(6)
    with ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM) as b:
        ids = b.add(images, masks, prov, emb, "v1")
    index_file = tmp_path / "b" / "index.faiss"
    data = index_file.read_bytes()
    if damage == "delete":
        index_file.unlink()
    elif damage == "truncate":
        index_file.write_bytes(data[: len(data) // 2])
    else:  # still a readable index, but with a wrong vector
        index_file.write_bytes(data[:-200] + bytes(b ^ 0xFF for b in data[-200:-100]) + data[-100:])
    with ExemplarBank.open(tmp_path / "b") as b:
        assert index_file.is_file()
        assert [hits[0].id for hits in b.search(emb, 1, "v1")] == ids


def test_stale_index_file_is_rebuilt(tmp_path):
    images, masks, prov = exemplars(4)
    emb = unit(5)
    with ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM) as b:
        b.add(images, masks, prov, emb[:4], "v1")
    old_index = (tmp_path / "b" / "index.faiss").read_bytes()
    with ExemplarBank.open(tmp_path / "b") as b:
        [new_id] = b.add(images[:1], masks[:1], prov[:1], emb[4:], "v1")
    (tmp_path / "b" / "index.faiss").write_bytes(old_index)  # as if the save never happened
    with ExemplarBank.open(tmp_path / "b") as b:
        assert b.search(emb[4:], 1, "v1")[0][0].id == new_id


def test_failed_add_keeps_committed_exemplars(bank, monkeypatch):
    images, masks, prov = exemplars(4)
    ids = bank.add(images[:2], masks[:2], prov[:2], unit(2), "v1")
    real_write, calls = pixels_module._write_pixels, []

    def write_then_fail(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(*args)

    monkeypatch.setattr(pixels_module, "_write_pixels", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        bank.add(images[2:], masks[2:], prov[2:], unit(2, seed=1), "v1")
    monkeypatch.undo()
    assert len(bank) == 2 and sorted(p.name for p in (bank.path / "pixels").iterdir()) == \
        sorted(f"{i}.npz" for i in ids)
    assert [h.id for h in bank.search(unit(2), 1, "v1")[0]] == [ids[0]]
    assert len(bank.add(images[2:], masks[2:], prov[2:], unit(2, seed=1), "v1")) == 2


def test_process_killed_mid_add_leaves_bank_usable(tmp_path):
    images, masks, prov = exemplars(4)
    emb = unit(4)
    with ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM) as b:
        ids = b.add(images[:2], masks[:2], prov[:2], emb[:2], "v1")
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        import napari_jras.core.bank.pixels as pixels_module
        from napari_jras.core.bank import ExemplarBank
        real_write = pixels_module._write_pixels
        def write_then_die(*args):
            real_write(*args)
            os._exit(3)  # the process dies after one pixel file, before the commit
        pixels_module._write_pixels = write_then_die
        bank = ExemplarBank.open({str(tmp_path / "b")!r})
        bank.add(np.zeros((2, 8, 8)), np.zeros((2, 8, 8), int),
                 [{{"case_id": "new", "origin": "correction"}}] * 2,
                 np.eye(2, {DIM}, dtype=np.float32), "v1")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 3
    assert len(list((tmp_path / "b" / "pixels").iterdir())) == 3  # an orphan was left behind
    with ExemplarBank.open(tmp_path / "b") as b:
        assert len(b) == 2 and [r["id"] for r in b.records()] == ids
        assert sorted(p.name for p in (b.path / "pixels").iterdir()) == sorted(
            f"{i}.npz" for i in ids)
        np.testing.assert_array_equal(b.masks(ids), masks[:2])
        assert [hits[0].id for hits in b.search(emb[:2], 1, "v1")] == ids
        assert len(b.add(images[2:], masks[2:], prov[2:], emb[2:], "v1")) == 2


def test_opening_something_else_raises(tmp_path):
    with pytest.raises(BankError, match="No exemplar bank folder"):
        ExemplarBank.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BankError, match="not an exemplar bank"):
        ExemplarBank.open(tmp_path / "plain")
    (tmp_path / "plain" / "bank.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BankError, match="damaged"):
        ExemplarBank.open(tmp_path / "plain")
    (tmp_path / "other").mkdir()
    other = sqlite3.connect(tmp_path / "other" / "bank.sqlite")
    other.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    other.commit()
    other.close()
    with pytest.raises(BankError, match="not a napari-jras exemplar bank"):
        ExemplarBank.open(tmp_path / "other")


def test_invalid_exemplars_are_rejected_and_nothing_added(bank):
    images, masks, prov = exemplars(3)
    bad_masks = masks.copy()
    bad_masks[1, 0, 0] = CLASSES
    cases = [
        ((images, bad_masks, prov), "class value 3 but this bank has 3 classes"),
        ((images, -masks - 1, prov), "class value -"),
        ((images, masks[:2], prov), "does not match"),
        ((np.where(images > 0.5, np.nan, images), masks, prov), "NaN"),
        ((images * 255, masks, prov), r"scaled to \[0, 1\]"),
        ((images[0], masks[0], prov[:1]), r"stack \(N, H, W\)"),
        ((images, masks, prov[:2]), "3 provenance dicts"),
        ((images, masks, [{**p, "origin": "guess"} for p in prov]), "'origin' must be one of"),
        ((images, masks, [{"origin": "training"}] * 3), "needs a 'case_id'"),
        ((images, masks, prov, unit(3)), "retriever_version"),
        ((images, masks, prov, unit(2), "v1"), r"shape \(3, 8\)"),
    ]
    for args, message in cases:
        with pytest.raises(BankError, match=message):
            bank.add(*args)
    assert len(bank) == 0 and not list((bank.path / "pixels").iterdir())


def test_two_handles_see_each_others_changes(tmp_path):
    images, masks, prov = exemplars(3)
    emb = unit(3)
    with ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM) as first:
        first.add(images[:2], masks[:2], prov[:2], emb[:2], "v1")
        first.search(emb[:1], 1, "v1")  # the first handle has its index cached
        with ExemplarBank.open(tmp_path / "b") as second:
            [new_id] = second.add(images[2:], masks[2:], prov[2:], emb[2:], "v1")
            assert first.search(emb[2:], 1, "v1")[0][0].id == new_id
            second.remove([new_id])
        [again] = first.add(images[2:], masks[2:], prov[2:], emb[2:], "v1")  # stale cache
        [hits] = first.search(emb[2:], 3, "v1")
        assert hits[0].id == again and new_id not in [h.id for h in hits]


def test_closed_bank_refuses_work(tmp_path):
    b = ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM)
    b.close()
    b.close()
    with pytest.raises(BankError, match="closed"):
        len(b)


# --- read-only banks, damaged embeddings, pseudonym keys ---------------------------------------
def _filled(tmp_path, n: int = 4):
    images, masks, prov = exemplars(n)
    with ExemplarBank.create(tmp_path / "b", SIZE, CLASSES, DIM) as b:
        ids = b.add(images, masks, prov, unit(n), "v1")
    return tmp_path / "b", ids


def _snapshot(folder):
    """Every file of a folder tree with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_read_only_bank_is_searched_and_refuses_changes(tmp_path, read_only_folder):
    path, ids = _filled(tmp_path)
    (path / "index.faiss").unlink()  # rebuilt in memory, never saved
    before = _snapshot(path)
    with read_only_folder(path):
        with pytest.raises(BankError, match="is read-only .* copy the bank to a writable folder"):
            ExemplarBank.open(path)  # opening for writing says why, not "damaged"
        for read_only in (True, None):
            with ExemplarBank.open(path, read_only=read_only) as b:
                assert b.read_only and len(b) == 4 and b.retriever_version == "v1"
                assert [h[0].id for h in b.search(unit(4), 1, "v1")] == ids
                np.testing.assert_array_equal(b.masks(ids[:1]), exemplars(4)[1][:1])
                for change in (lambda: b.remove(ids[:1]), b.pseudonymise, b.rebuild_index,
                               lambda: b.set_embeddings(ids, unit(4), "v2"),
                               lambda: b.add(*exemplars(1), unit(1), "v1")):
                    with pytest.raises(BankError, match="open read-only: .* needs write access"):
                        change()
    assert _snapshot(path) == before
    with ExemplarBank.open(path) as b:  # writable again: nothing was lost
        assert len(b) == 4


def test_read_only_open_of_a_writable_bank_leaves_no_files(tmp_path):
    path, ids = _filled(tmp_path)
    before = _snapshot(path)
    with ExemplarBank.open(path, read_only=True) as b:
        assert [h[0].id for h in b.search(unit(4), 1, "v1")] == ids
        with pytest.raises(BankError, match="read-only"):
            b.remove(ids[:1])
    assert _snapshot(path) == before


def _damage_embedding(path, exemplar_id, blob=b"\x00" * 7):
    db = sqlite3.connect(path / "bank.sqlite")
    db.execute("UPDATE exemplars SET embedding = ? WHERE id = ?", (blob, exemplar_id))
    db.commit()
    db.close()


@pytest.mark.parametrize("blob", [b"\x00" * 7, np.full(DIM, np.nan, np.float32).tobytes(), "text"])
def test_a_damaged_embedding_is_reported_not_fatal(tmp_path, blob):
    path, ids = _filled(tmp_path)
    _damage_embedding(path, ids[1], blob)
    with ExemplarBank.open(path) as b:  # opening used to fail for every command
        assert b.damaged_embeddings() == [ids[1]] and len(b) == 4
        with pytest.raises(BankError, match=rf"1 exemplar\(s\) .* damaged embedding \(id {ids[1]}\)"
                                            r".*bank rebuild --bank .* --model RUN"):
            b.search(unit(4), 1, "v1")
        with pytest.raises(BankError, match="damaged embedding"):
            b.embeddings()
        assert b.rebuild_index() == [ids[1]]  # the others are indexed
        b.set_embeddings(ids, unit(4), "v1")  # re-embedding repairs it
        assert b.damaged_embeddings() == []
        assert [h[0].id for h in b.search(unit(4), 1, "v1")] == ids


def test_removing_a_damaged_exemplar_heals_the_bank(tmp_path):
    path, ids = _filled(tmp_path)
    _damage_embedding(path, ids[0])
    with ExemplarBank.open(path) as b:
        b.remove(ids[:1])
        assert [h[0].id for h in b.search(unit(4)[1:], 1, "v1")] == ids[1:]


def _records(path):
    with ExemplarBank.open(path) as b:
        return b.records()


def test_anonymise_writes_the_key_before_touching_the_bank(tmp_path, monkeypatch):
    from napari_jras.core import bank_tools
    from napari_jras.core.errors import JRASError, StorageError

    path, _ = _filled(tmp_path)
    before = _records(path)
    (tmp_path / "file").write_text("a file")
    bad_keys = {tmp_path / "file" / "key.csv": "a part of its folder path is a file",
                path / "key.csv": "inside the bank folder",
                path / "bank.sqlite": "exists"}
    for key, message in bad_keys.items():
        with ExemplarBank.open(path) as b, pytest.raises(JRASError, match=message):
            bank_tools.anonymise(b, "anon", key)
        assert _records(path) == before

    def full_disk(*args, **kwargs):
        raise StorageError("Cannot write the pseudonym key: No space left on device")

    monkeypatch.setattr(bank_tools, "atomic_write_bytes", full_disk)
    key = tmp_path / "key.csv"
    with ExemplarBank.open(path) as b, pytest.raises(StorageError, match="No space"):
        bank_tools.anonymise(b, "anon", key)
    assert _records(path) == before and not key.exists()
    monkeypatch.undo()
    with ExemplarBank.open(path) as b:
        patients = bank_tools.anonymise(b, "anon", key)
    assert key.read_text().splitlines()[1:] == [f"{k},{v}" for k, v in patients.items()]
    assert {r["patient_id"] for r in _records(path)} == set(patients.values())
    first_key = key.read_bytes()
    with ExemplarBank.open(path) as b, pytest.raises(BankError, match="never overwritten"):
        bank_tools.anonymise(b, "again", key)  # a second run would destroy the only key
    assert key.read_bytes() == first_key


def test_read_only_bank_with_unmerged_changes_is_refused_clearly(tmp_path, read_only_folder):
    path, ids = _filled(tmp_path)
    writer = sqlite3.connect(path / "bank.sqlite", isolation_level=None)
    try:  # a copy taken while another process had changes in the WAL, without its -shm file
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("UPDATE exemplars SET author = 'x'")
        copy = Path(shutil.copytree(path, tmp_path / "copy"))
    finally:
        writer.close()
    (copy / "bank.sqlite-shm").unlink()
    assert (copy / "bank.sqlite-wal").stat().st_size
    with read_only_folder(copy), pytest.raises(BankError, match="read-only and bank.sqlite-wal "
                                                               "holds changes not yet merged"):
        ExemplarBank.open(copy, read_only=True)
    with ExemplarBank.open(copy, read_only=True) as b:  # writable again: the changes are there
        assert {r["author"] for r in b.records()} == {"x"}
