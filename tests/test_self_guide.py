"""Self-guidance: a readout model predicts a volume twice, the second pass guided by the first
pass's prediction of each slice's nearest slice plus retrieved exemplars."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_jras.cli import main
from napari_jras.core.checkpoint import load_model
from napari_jras.core.data import resize_labels
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.io import read_volume
from napari_jras.core.self_guide import first_pass_memory
from napari_jras.core.volume_memory import PREDICTED_PENALTY, VolumeMemory, diagnostic_memory


@pytest.fixture(scope="module")
def volume(data_dir) -> np.ndarray:
    return read_volume(data_dir / "acdc" / "patient045_frame01_image.tif").data


@pytest.fixture(scope="module")
def engines(tiny_run):
    """(self-guided, one-pass) CPU engines sharing the tiny readout run's model and bank."""
    guided = InferenceEngine.from_run(tiny_run, device="cpu")
    return guided, InferenceEngine(guided.model, guided.bank, device="cpu", self_guide=False)


def test_second_pass_is_guided_by_the_first_pass_of_the_nearest_slice(engines, volume):
    guided, one_pass = engines
    k = guided.model.config.k
    pred = guided.predict(volume, exclude_patient="p0", return_probabilities=True)
    first = one_pass.predict(volume, exclude_patient="p0")
    for z, items in pred.exemplars.items():
        assert len(items) == k
        own = items[0]
        assert own.id == -1 and own.record["predicted"] is True
        assert own.record["slice_index"] == (z - 1 if z > 0 else 1)
        assert own.score == pytest.approx(1.0 - PREDICTED_PENALTY)
        expected = resize_labels(first.labels[[own.record["slice_index"]]], own.mask.shape)[0]
        np.testing.assert_array_equal(own.mask, expected)
        assert all(e.id >= 0 and e.record["patient_id"] != "p0" for e in items[1:])
    # exactly the one-pass engine given the first pass as predicted memory
    manual = one_pass.predict(volume, exclude_patient="p0", return_probabilities=True,
                              memory=first_pass_memory(first))
    np.testing.assert_array_equal(pred.labels, manual.labels)
    np.testing.assert_allclose(pred.probabilities.astype(np.float32),
                               manual.probabilities.astype(np.float32), atol=1e-3)
    # and the second pass changes what the network outputs
    single = one_pass.predict(volume, exclude_patient="p0", return_probabilities=True)
    assert not np.allclose(pred.probabilities.astype(np.float32),
                           single.probabilities.astype(np.float32), atol=1e-3)


def test_some_slices_predict_their_neighbours_first_and_only_return_their_own(engines, volume):
    guided, _ = engines
    full = guided.predict(volume)
    part = guided.predict(volume, slices=[3], return_probabilities=True)
    assert part.slices == [3] and sorted(part.exemplars) == [3]
    np.testing.assert_array_equal(part.labels[3], full.labels[3])
    assert not part.labels[[0, 1, 2, 4, 5, 6, 7]].any()
    assert not part.probabilities[:, [0, 1, 2, 4, 5, 6, 7]].any()


def test_progress_counts_both_passes(engines, volume):
    guided, _ = engines
    calls: list[tuple[int, int]] = []
    guided.batch_size = 4
    try:
        guided.predict(volume, progress=lambda p: calls.append((p.done, p.total)))
        assert calls == [(4, 16), (8, 16), (12, 16), (16, 16)]
        calls.clear()
        guided.predict(volume, slices=[0], progress=lambda p: calls.append((p.done, p.total)))
        assert calls == [(2, 3), (3, 3)]  # slices 0 and 1, then 0
    finally:
        guided.batch_size = 16


@pytest.mark.parametrize("case", ["2-D image", "memory given", "neighbour", "readout only"])
def test_one_pass_where_self_guidance_does_not_apply(engines, volume, case, data_dir, tiny_run):
    guided, one_pass = engines
    labels = read_volume(data_dir / "acdc" / "patient045_frame01_label.tif").data
    kwargs: dict = {}
    image = volume
    if case == "2-D image":
        image = volume[4]
    elif case == "memory given":
        kwargs["memory"] = VolumeMemory({3: labels[3]}, slots=1)
    elif case == "neighbour":
        kwargs["memory"] = diagnostic_memory("neighbour", labels)
        kwargs["guide_source"] = "neighbour"
    if case == "readout only":
        guided = InferenceEngine(guided.model, guided.bank, device="cpu", readout_only=True)
        one_pass = InferenceEngine(guided.model, guided.bank, device="cpu", readout_only=True,
                                   self_guide=False)
    a, b = guided.predict(image, **kwargs), one_pass.predict(image, **kwargs)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not any(e.record.get("predicted") for items in a.exemplars.values() for e in items)


def test_none_source_is_guided_by_the_first_pass_alone(engines, volume):
    guided, _ = engines
    pred = guided.predict(volume, guide_source="none")
    for items in pred.exemplars.values():
        assert len(items) == 1 and items[0].record["predicted"] is True


def test_baseline_predicts_in_one_pass(tiny_baseline_run, volume):
    model = load_model(tiny_baseline_run)
    calls: list[int] = []
    InferenceEngine(model, device="cpu").predict(volume, progress=lambda p: calls.append(p.total))
    assert set(calls) == {volume.shape[0]}


def test_evaluate_records_self_guidance_and_can_turn_it_off(tiny_run, data_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for suffix in ("image", "label"):
        (data / f"patient045_frame01_{suffix}.tif").write_bytes(
            (data_dir / "acdc" / f"patient045_frame01_{suffix}.tif").read_bytes())
    reports = {}
    for flag in ([], ["--no-self-guide"]):
        out = tmp_path / f"report{len(flag)}.json"
        assert main(["evaluate", "--model", str(tiny_run), "--data", str(data), "--report",
                     str(out), "--device", "cpu", "--quiet", *flag]) == 0
        reports[bool(flag)] = json.loads(out.read_text())
    assert reports[False]["provenance"]["self_guide"] is True
    assert reports[True]["provenance"]["self_guide"] is False
    neighbour = tmp_path / "neighbour.json"
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(data), "--report",
                 str(neighbour), "--device", "cpu", "--quiet", "--guide-source", "neighbour"]) == 0
    assert json.loads(neighbour.read_text())["provenance"]["self_guide"] is False
    flat = tmp_path / "flat"  # one 2-D slice: nothing to self-guide
    flat.mkdir()
    for suffix in ("image", "label"):
        data2d = read_volume(data_dir / "acdc" / f"patient045_frame01_{suffix}.tif").data[4]
        tifffile.imwrite(flat / f"patient045_frame01_{suffix}.tif", data2d)
    single = tmp_path / "single.json"
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(flat), "--report",
                 str(single), "--device", "cpu", "--quiet"]) == 0
    assert json.loads(single.read_text())["provenance"]["self_guide"] is False
