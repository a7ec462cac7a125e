"""Where a slice's exemplars come from: retrieved, none, random, the volume's own annotated
slices (neighbour / oracle diagnostics, accepted corrections first), through engine and CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from napari_jras.cli import main
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.errors import JRASError
from napari_jras.core.io import read_volume
from napari_jras.core.volume_memory import VolumeMemory, diagnostic_memory, memory_score


@pytest.fixture(scope="module")
def volume(data_dir):
    return read_volume(data_dir / "acdc" / "patient045_frame01_image.tif").data


@pytest.fixture(scope="module")
def labels(data_dir):
    return read_volume(data_dir / "acdc" / "patient045_frame01_label.tif").data.astype(np.uint8)


def _one_case(data_dir, tmp_path):
    """A data folder holding one ACDC case (patient045_frame01)."""
    data = tmp_path / "data"
    data.mkdir()
    for suffix in ("image", "label"):
        shutil.copy(data_dir / "acdc" / f"patient045_frame01_{suffix}.tif", data)
    return data


@pytest.fixture(scope="module")
def engine(tiny_run, tmp_path_factory):
    """One pass: the guide sources as such (self-guidance: test_self_guide.py)."""
    run = tmp_path_factory.mktemp("sources") / "run"
    shutil.copytree(tiny_run, run)
    return InferenceEngine.from_run(run, device="cpu", self_guide=False)


def test_neighbour_source_gives_each_slice_the_ground_truth_of_z_plus_minus_1(engine, volume,
                                                                            labels):
    pred = engine.predict(volume, memory=diagnostic_memory("neighbour", labels),
                          return_probabilities=True)
    for z, items in pred.exemplars.items():
        expected = [s for s in (z - 1, z + 1) if 0 <= s < len(volume)]
        assert sorted(e.record["slice_index"] for e in items) == expected
        assert all(e.record["origin"] == "neighbour ground truth" for e in items)
        assert sum(e.weight for e in items) == pytest.approx(1.0, abs=1e-5)
        for e in items:  # the exemplar mask is that slice's ground truth at the model size
            assert e.mask.shape == (engine.model.config.size,) * 2
            assert set(np.unique(e.mask)) <= set(np.unique(labels[e.record["slice_index"]]))


def test_oracle_source_uses_the_slice_itself_and_changes_the_prediction(engine, volume, labels):
    oracle = engine.predict(volume, memory=diagnostic_memory("oracle", labels),
                            return_probabilities=True)
    none = engine.predict(volume, guide_source="none", return_probabilities=True)
    assert all([e.record["slice_index"] for e in items] == [z]
               for z, items in oracle.exemplars.items())
    assert all(items == [] for items in none.exemplars.values())
    # the readout model's prediction depends on its exemplars
    assert not np.array_equal(oracle.probabilities, none.probabilities)


def test_random_source_draws_k_exemplars_of_other_patients(engine, volume):
    k = engine.model.config.k
    by_patient = {r["id"]: r["patient_id"] for r in engine.bank.records()}
    pred = engine.predict(volume, guide_source="random", exclude_patient="p0")
    again = engine.predict(volume, guide_source="random", exclude_patient="p0")
    for z, items in pred.exemplars.items():
        assert len(items) == k
        assert "p0" not in {by_patient[e.id] for e in items}
        assert [e.id for e in items] == [e.id for e in again.exemplars[z]]


def test_accepted_slices_of_the_volume_come_first_and_retrieval_fills_the_rest(engine, volume,
                                                                              labels):
    memory = VolumeMemory({3: labels[3]}, slots=2)
    pred = engine.predict(volume, slices=[4, 6], memory=memory)
    k = engine.model.config.k
    for z in (4, 6):
        items = pred.exemplars[z]
        assert len(items) == k
        assert items[0].record["slice_index"] == 3 and items[0].id == -1
        assert all(e.id >= 0 for e in items[1:])  # the other slots come from the bank
        assert items[0].score == pytest.approx(memory_score(3 - z))
    near, far = pred.exemplars[4][0], pred.exemplars[6][0]
    assert near.score > far.score  # nearer accepted slices count more


def test_memory_rules_and_bad_sources(engine, volume, labels):
    memory = VolumeMemory({z: labels[z] for z in (0, 2, 5)}, slots=2)
    assert [s for s, _ in memory.nearest(3)] == [2, 5]
    assert [s for s, _ in memory.nearest(2)] == [0, 5]  # never itself unless include_self
    assert memory_score(1) == 1.0 and memory_score(-3) == pytest.approx(0.8)
    assert memory_score(20) == 0.5
    with pytest.raises(JRASError, match="guide source"):
        engine.predict(volume, guide_source="best")
    with pytest.raises(JRASError, match="ground-truth"):
        diagnostic_memory("neighbour", None)
    with pytest.raises(JRASError, match="out of range"):
        engine.predict(volume, memory=VolumeMemory({99: labels[0]}))
    with pytest.raises(JRASError, match="slots"):
        VolumeMemory({}, slots=-1)


def test_cli_evaluate_records_the_guide_source(tiny_run, data_dir, tmp_path, capsys):
    data = _one_case(data_dir, tmp_path)
    reports = {}
    for source in ("retrieved", "none", "neighbour", "oracle", "random"):
        out = tmp_path / f"{source}.json"
        assert main(["evaluate", "--model", str(tiny_run), "--data", str(data), "--report",
                     str(out), "--guide-source", source, "--quiet", "--device", "cpu"]) == 0
        reports[source] = json.loads(out.read_text())
        assert reports[source]["guide_source"] == source
    dice = {s: r["summary"]["mean"]["dice"]["mean"] for s, r in reports.items()}
    assert len(set(dice.values())) > 1  # the exemplars change the score
    with pytest.raises(SystemExit) as err:
        main(["evaluate", "--model", str(tiny_run), "--data", str(data), "--report",
              str(tmp_path / "x.json"), "--guide-source", "best"])
    assert err.value.code == 2


def test_readout_only_scores_the_propagated_mask_alone(tiny_run, tiny_baseline_run, data_dir,
                                                       tmp_path, volume, labels):
    engine = InferenceEngine.from_run(tiny_run, device="cpu", readout_only=True)
    oracle = engine.predict(volume, memory=diagnostic_memory("oracle", labels),
                            return_probabilities=True)
    none = engine.predict(volume, guide_source="none")
    assert not none.labels.any()  # no exemplar: nothing is propagated, all background
    # the propagated own mask puts more foreground where the structures are than elsewhere
    # (an untrained readout's affinity is diffuse, so only the ordering is certain)
    fg_prob = 1.0 - oracle.probabilities[0].astype(np.float32)
    assert fg_prob[labels > 0].mean() > fg_prob[labels == 0].mean() + 0.01
    full = InferenceEngine.from_run(tiny_run, device="cpu").predict(
        volume, memory=diagnostic_memory("oracle", labels))
    assert not np.array_equal(full.labels, oracle.labels)
    with pytest.raises(JRASError, match="readout fusion"):
        InferenceEngine.from_run(tiny_baseline_run, device="cpu", readout_only=True)
    data = _one_case(data_dir, tmp_path)
    out = tmp_path / "readout.json"
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(data), "--report", str(out),
                 "--guide-source", "neighbour", "--readout-only", "--quiet", "--device",
                 "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["provenance"]["readout_only"] is True
    assert report["guide_source"] == "neighbour"


def test_accepted_slices_of_the_volume_are_trusted_other_exemplars_are_not(tiny_run, volume,
                                                                           labels):
    """readout_trust mixes the propagated mask in for annotated same-volume slices only."""
    def engine(**options):
        return InferenceEngine.from_run(tiny_run, device="cpu", **options)

    assert engine().readout_trust == pytest.approx(0.75)  # the default of new runs
    full, none_ = engine(readout_trust=1.0), engine(readout_trust=0.0)
    read = engine(readout_only=True)
    oracle = {name: e.predict(volume, memory=diagnostic_memory("oracle", labels),
                              return_probabilities=True).probabilities.astype(np.float32)
              for name, e in (("full", full), ("none", none_), ("read", read))}
    # trust 1 on the slice's own annotation: the prediction is the propagated mask (up to
    # where the resize to the volume's size happens: on log-probabilities, or probabilities)
    assert np.abs(oracle["full"] - oracle["read"]).mean() < 0.01
    assert (oracle["full"].argmax(0) == oracle["read"].argmax(0)).mean() > 0.99
    assert np.abs(oracle["full"] - oracle["none"]).mean() > 0.05  # trust changes it
    for memory in (None, VolumeMemory({0: labels[0], 2: labels[2]}, predicted=frozenset({0, 2}))):
        # retrieved exemplars, and the model's own predicted slices, are not trusted
        a = full.predict(volume, memory=memory, return_probabilities=True).probabilities
        b = none_.predict(volume, memory=memory, return_probabilities=True).probabilities
        np.testing.assert_array_equal(a, b)


def test_readout_trust_is_checked_and_recorded(tiny_run, tiny_baseline_run, data_dir, tmp_path):
    with pytest.raises(JRASError, match="between 0 and 1"):
        InferenceEngine.from_run(tiny_run, device="cpu", readout_trust=1.5)
    with pytest.raises(JRASError, match="readout fusion"):
        InferenceEngine.from_run(tiny_baseline_run, device="cpu", readout_trust=0.5)
    data = _one_case(data_dir, tmp_path)
    out = tmp_path / "trust.json"
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(data), "--report", str(out),
                 "--guide-source", "neighbour", "--readout-trust", "0.5", "--quiet", "--device",
                 "cpu"]) == 0
    assert json.loads(out.read_text())["provenance"]["readout_trust"] == 0.5
