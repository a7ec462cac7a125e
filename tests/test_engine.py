"""InferenceEngine on the tiny trained runs: shapes, exemplars, leakage, live bank, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_jras.core.bank import ExemplarBank
from napari_jras.core.checkpoint import load_model
from napari_jras.core.data import resize_images, resize_labels
from napari_jras.core.device import amp_dtype, select_device
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.errors import BankError, CancelledError, DataError, JRASError
from napari_jras.core.fusion import align_exemplars, combine
from napari_jras.core.io import read_volume
from napari_jras.core.normalize import normalize
from napari_jras.core.prediction import RetrievedExemplar

NUM_CLASSES = 4
TAU = 0.1
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def volume(data_dir) -> np.ndarray:
    """The raw ACDC test volume (8, 112, 112) uint16, the data the tiny runs were trained on."""
    return read_volume(data_dir / "acdc" / "patient045_frame01_image.tif").data


@pytest.fixture(scope="module")
def engine(tiny_run, tmp_path_factory) -> InferenceEngine:
    """A one-pass CPU engine on a private copy of the tiny J-RAS run (tests here must not change
    it); the self-guided second pass has its own tests (test_self_guide.py)."""
    run = tmp_path_factory.mktemp("engine") / "run"
    shutil.copytree(tiny_run, run)
    return InferenceEngine.from_run(run, device="cpu", self_guide=False)


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A throw-away copy of the tiny J-RAS run, for tests that change the bank or config."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def check_exemplars(items: list[RetrievedExemplar], k: int) -> None:
    """K well-formed exemplars, best first, with softmax(score / tau) weights summing to 1."""
    assert len(items) == k
    scores = np.array([e.score for e in items])
    weights = np.array([e.weight for e in items])
    assert np.all(np.diff(scores) <= 1e-6) and np.all(np.abs(scores) <= 1 + 1e-4)
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)
    expected = np.exp((scores - scores.max()) / TAU)
    np.testing.assert_allclose(weights, expected / expected.sum(), atol=1e-4)
    assert len({e.id for e in items}) == k
    for e in items:
        assert isinstance(e.id, int) and e.record["id"] == e.id
        assert {"case_id", "patient_id", "slice_index", "source", "origin"} <= set(e.record)
        assert e.image.shape == e.mask.shape == (32, 32)
        assert e.image.dtype == np.float32 and 0.0 <= e.image.min() <= e.image.max() <= 1.0
        assert e.mask.dtype == np.uint8 and e.mask.max() < NUM_CLASSES


# --- predictions ----------------------------------------------------------------------------
def test_predict_volume(engine, volume):
    pred = engine.predict(volume, return_probabilities=True)
    assert pred.labels.shape == volume.shape and pred.labels.dtype == np.uint8
    assert pred.slices == list(range(8)) and sorted(pred.exemplars) == list(range(8))
    probs = pred.probabilities.astype(np.float32)
    assert probs.shape == (NUM_CLASSES, *volume.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-2)
    assert (probs.argmax(0) == pred.labels).mean() > 0.99  # float16 storage may flip near-ties
    for items in pred.exemplars.values():
        check_exemplars(items, k=2)
    assert set(pred.timings) == {"embed", "search", "fusion", "network"}


def test_predict_2d_slice_and_subset(engine, volume):
    pred = engine.predict(volume[3], return_probabilities=True)
    assert pred.labels.shape == (112, 112) and pred.probabilities.shape == (NUM_CLASSES, 112, 112)
    assert list(pred.exemplars) == [0]
    check_exemplars(pred.exemplars[0], k=2)
    one = engine.predict(volume[3:4])  # a 2-D image is a one-slice volume (same normalisation)
    np.testing.assert_array_equal(pred.labels, one.labels[0])
    full = engine.predict(volume)
    part = engine.predict(volume, slices=[2, 5])
    assert sorted(part.exemplars) == [2, 5] and part.probabilities is None
    np.testing.assert_array_equal(part.labels[[2, 5]], full.labels[[2, 5]])
    assert not part.labels[[0, 1, 3, 4, 6, 7]].any()


def test_batch_size_does_not_change_the_result(engine, volume, tiny_run):
    small = InferenceEngine(load_model(tiny_run), engine.bank, device="cpu", batch_size=3,
                            self_guide=False)
    np.testing.assert_array_equal(small.predict(volume).labels, engine.predict(volume).labels)


def test_exclude_patient_keeps_that_patient_out(engine, volume):
    for patient in ("p0", "p2"):
        pred = engine.predict(volume, exclude_patient=patient)
        found = {e.record["patient_id"] for items in pred.exemplars.values() for e in items}
        assert found and patient not in found and found <= {"p0", "p1", "p2", "p3"}


def test_progress_and_cancel(engine, volume):
    calls: list[tuple[int, int]] = []
    engine.batch_size = 4
    engine.predict(volume, progress=lambda p: calls.append((p.done, p.total)))
    assert calls == [(4, 8), (8, 8)]
    with pytest.raises(CancelledError, match="cancelled"):
        engine.predict(volume, cancel=lambda: True)
    engine.batch_size = 16


# --- the bank at inference time -------------------------------------------------------------
def synthetic_slice() -> tuple[np.ndarray, np.ndarray]:
    """A raw 64x64 image unlike any bank exemplar (a bright square on a ramp) and its mask."""
    yy, xx = np.mgrid[:64, :64]
    mask = ((abs(yy - 20) < 9) & (abs(xx - 40) < 9)).astype(np.uint8) * 3
    image = (xx * 20 + (mask > 0) * 3000).astype(np.uint16)
    return image, mask


def test_added_exemplar_is_retrieved_by_the_next_prediction(run_copy):
    engine = InferenceEngine.from_run(run_copy, device="cpu")
    raw, mask = synthetic_slice()
    before = engine.predict(raw)
    assert all(e.record["case_id"] != "new_case" for e in before.exemplars[0])
    image = normalize(raw, engine.model.config.modality)  # what predict feeds the retriever
    [new_id] = engine.bank.add(
        image[None], mask[None],
        [{"case_id": "new_case", "patient_id": "new_patient", "slice_index": 0,
          "origin": "correction", "author": "tester"}],
        embeddings=engine.embed_for_bank(image[None]), retriever_version=engine.version)
    assert not engine.bank.needs_embedding(engine.version)  # no re-embedding, no retraining
    top = engine.predict(raw).exemplars[0][0]
    assert top.id == new_id and top.score == pytest.approx(1.0, abs=1e-4)
    assert top.record["origin"] == "correction" and top.record["author"] == "tester"
    np.testing.assert_array_equal(top.mask, resize_labels(mask[None], (32, 32))[0])
    excluded = engine.predict(raw, exclude_patient="new_patient").exemplars[0]
    assert new_id not in {e.id for e in excluded}


def test_k_larger_than_the_bank_uses_fewer_exemplars(run_copy, volume):
    """K beyond the eligible exemplars: each slice gets only the real hits; no repeats."""
    with ExemplarBank.open(run_copy / "bank") as bank:
        by_patient = {r["id"]: r["patient_id"] for r in bank.records()}
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "k": 8}))
    engine = InferenceEngine.from_run(run_copy, device="cpu", self_guide=False)
    pred = engine.predict(volume, exclude_patient="p0")
    for items in pred.exemplars.values():
        check_exemplars(items, k=6)  # 8 exemplars, 2 of them of the excluded patient
        assert "p0" not in {by_patient[e.id] for e in items}

    engine.bank.remove([i for i in by_patient if i != 5])  # one exemplar left
    with_k8 = engine.predict(volume, return_probabilities=True)
    assert all([e.id for e in items] == [5] and items[0].weight == pytest.approx(1.0)
               for items in with_k8.exemplars.values())
    engine.model.config.k = 1  # padded slots carry zero weight: same result as K=1
    with_k1 = engine.predict(volume, return_probabilities=True)
    np.testing.assert_array_equal(with_k8.probabilities, with_k1.probabilities)


def test_aligned_exemplars_guide_the_prediction(run_copy, volume):
    """A run trained with ``align_shift`` fuses exemplars translated onto each query slice."""
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "align_shift": 0.25}))
    engine = InferenceEngine.from_run(run_copy, device="cpu", self_guide=False)
    x = torch.from_numpy(resize_images(normalize(volume, engine.model.config.modality), (32, 32)))
    with torch.inference_mode():
        timings = dict.fromkeys(("embed", "search", "fusion"), 0.0)
        guide, shown = engine._guide(x, None, list(range(len(x))), None, (), "retrieved", None,
                                     timings)
        images, masks = engine._exemplar_tensors([e.id for row in shown for e in row])
    images, masks = images.view(len(x), -1, 32, 32), masks.view(len(x), -1, 32, 32)
    moved_images, moved_masks = align_exemplars(x, images, masks, 8)
    expected_image, expected_mask = combine(guide.weights, moved_images, moved_masks, NUM_CLASSES)
    torch.testing.assert_close(guide.image, expected_image)
    torch.testing.assert_close(guide.mask, expected_mask)
    assert not torch.equal(moved_masks, masks)  # some exemplar really moved
    pred = engine.predict(volume)
    assert pred.labels.shape == volume.shape
    for items in pred.exemplars.values():  # the gallery shows the stored exemplars
        check_exemplars(items, k=2)


def test_bank_of_another_retriever_version_is_re_embedded(run_copy, volume):
    bank = ExemplarBank.open(run_copy / "bank")
    ids, good = bank.embeddings()
    rng = np.random.default_rng(0)
    noise = rng.normal(size=good.shape).astype(np.float32)
    bank.set_embeddings(ids, noise / np.linalg.norm(noise, axis=1, keepdims=True), "old-retriever")
    engine = InferenceEngine(load_model(run_copy), bank, device="cpu")
    pred = engine.predict(volume)
    assert bank.retriever_version == engine.version and not bank.needs_embedding(engine.version)
    _, images, _ = bank.load_all()
    np.testing.assert_allclose(bank.embeddings()[1], engine.embed_for_bank(images), atol=1e-5)
    reference = InferenceEngine.from_run(run_copy, device="cpu").predict(volume)
    np.testing.assert_array_equal(pred.labels, reference.labels)
    assert engine.ensure_bank_embeddings() is False


def test_exemplar_without_embedding_triggers_re_embedding(run_copy):
    engine = InferenceEngine.from_run(run_copy, device="cpu")
    raw, mask = synthetic_slice()
    image = normalize(raw, "mri")
    engine.bank.add(image[None], mask[None], [{"case_id": "x", "origin": "import"}])
    assert engine.bank.needs_embedding(engine.version)
    engine.predict(raw)
    assert not engine.bank.needs_embedding(engine.version)


def test_incompatible_or_empty_banks_raise_bank_error(tiny_run, tmp_path, volume):
    model = load_model(tiny_run)
    three = ExemplarBank.create(tmp_path / "three", size=32, num_classes=3, embed_dim=16)
    with pytest.raises(BankError, match="3 classes but the model has 4"):
        InferenceEngine(model, three, device="cpu")
    wide = ExemplarBank.create(tmp_path / "wide", size=32, num_classes=4, embed_dim=8)
    with pytest.raises(BankError, match="8-d embeddings"):
        InferenceEngine(model, wide, device="cpu")
    empty = ExemplarBank.create(tmp_path / "empty", size=32, num_classes=4, embed_dim=16)
    engine = InferenceEngine(model, empty, device="cpu")
    with pytest.raises(BankError, match="empty"):
        engine.predict(volume)
    with pytest.raises(BankError, match="classes"):
        engine.set_bank(three)
    with pytest.raises(BankError, match="needs an exemplar bank"):
        InferenceEngine(model, None, device="cpu")


def test_run_without_bank_folder_needs_bank_argument(run_copy, tiny_run):
    shutil.rmtree(run_copy / "bank")
    with pytest.raises(BankError, match="no bank folder"):
        InferenceEngine.from_run(run_copy, device="cpu")
    engine = InferenceEngine.from_run(run_copy, bank=tiny_run / "bank", device="cpu")
    assert engine.bank.path == tiny_run / "bank"


def test_baseline_run_needs_no_bank(tiny_baseline_run, volume):
    engine = InferenceEngine.from_run(tiny_baseline_run, device="cpu")
    assert engine.bank is None and engine.version is None
    assert engine.embed_for_bank(np.zeros((1, 32, 32), np.float32)) is None
    pred = engine.predict(volume, return_probabilities=True)
    assert pred.labels.shape == volume.shape and pred.exemplars == {}
    np.testing.assert_allclose(pred.probabilities.astype(np.float32).sum(0), 1.0, atol=1e-2)


# --- bad input and devices ------------------------------------------------------------------
@pytest.mark.parametrize("shape, message", [
    ((2, 8, 64, 64), "4-D"), ((64, 64, 3), "RGB"), ((64,), "2-D or 3-D"), ((0, 64, 64), "empty")])
def test_wrong_input_dimensions_raise_data_error(engine, shape, message):
    with pytest.raises(DataError, match=message):
        engine.predict(np.zeros(shape, np.float32))
    assert issubclass(DataError, JRASError)


def test_bad_slices_and_values(engine, volume):
    with pytest.raises(JRASError, match="out of range"):
        engine.predict(volume, slices=[8])
    with pytest.raises(DataError, match="NaN"):
        engine.predict(np.full((32, 32), np.nan, np.float32))


def test_cpu_device_override(tiny_run):
    engine = InferenceEngine(load_model(tiny_run), ExemplarBank.open(tiny_run / "bank"),
                             device="cpu")
    assert engine.device == select_device("cpu") == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    if not torch.cuda.is_available():
        with pytest.raises(JRASError, match="CUDA is not available"):
            InferenceEngine.from_run(tiny_run, device="cuda")


@gpu
@needs_cuda
def test_cuda_amp_prediction_matches_cpu(tiny_run, volume):
    engine = InferenceEngine.from_run(tiny_run, device="cuda", amp=True)
    assert engine.device.type == "cuda"
    if torch.cuda.is_bf16_supported():
        assert amp_dtype(engine.device) is torch.bfloat16
    pred = engine.predict(volume, return_probabilities=True)
    assert pred.labels.shape == volume.shape
    np.testing.assert_allclose(pred.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-2)
    for items in pred.exemplars.values():
        check_exemplars(items, k=2)
    cpu = InferenceEngine.from_run(tiny_run, device="cpu").predict(volume)
    assert (cpu.labels == pred.labels).mean() > 0.95
