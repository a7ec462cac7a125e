"""Propagation (Qt-free): outward order, memory of the nearest accepted slices, stop rule,
cancel, chain; same-volume priority through a workspace (accepted corrections as memory)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_jras.core.engine import InferenceEngine
from napari_jras.core.errors import JRASError
from napari_jras.core.io import read_volume
from napari_jras.core.prediction import Prediction
from napari_jras.core.propagate import propagate, slice_confidence
from napari_jras.core.volume_memory import PREDICTED_PENALTY, VolumeMemory
from napari_jras.core.workspace import OWN_CORRECTION, Workspace

CASE = "patient045_frame01"


@pytest.fixture(scope="module")
def volume(data_dir):
    return read_volume(data_dir / "acdc" / f"{CASE}_image.tif").data


@pytest.fixture(scope="module")
def labels(data_dir):
    return read_volume(data_dir / "acdc" / f"{CASE}_label.tif").data.astype(np.uint8)


@pytest.fixture(scope="module")
def engine(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("propagate") / "run"
    shutil.copytree(tiny_run, run)
    return InferenceEngine.from_run(run, device="cpu")


class Scripted:
    """A predictor whose slice z gets ``fill[z]`` (a class) with probability ``conf[z]``;
    records the calls (slices, memory)."""

    def __init__(self, fill: dict[int, int], conf: dict[int, float] | None = None):
        self.fill, self.conf, self.calls = fill, conf or {}, []

    def predict(self, image, modality=None, slices=None, cancel=None,
                return_probabilities=False, memory=None):
        self.calls.append((list(slices), memory))
        labels = np.zeros(image.shape, np.uint8)
        probs = np.zeros((4, *image.shape), np.float16)
        probs[0] = 1.0
        for z in slices:
            labels[z, 2:6, 2:6] = self.fill.get(z, 1)
            confidence = self.conf.get(z, 0.9)
            probs[:, z, 2:6, 2:6] = (1 - confidence) / 3
            probs[1, z, 2:6, 2:6] = confidence
        return Prediction(labels, list(slices), probabilities=probs)


def test_propagation_goes_outward_with_the_nearest_accepted_slices_as_memory(engine, volume,
                                                                              labels):
    accepted = {4: labels[4], 6: labels[6]}
    seen = []
    result = propagate(engine, volume, accepted, start=4, protected=[2], case_id=CASE,
                       progress=lambda p: seen.append((p.done, p.total)),
                       min_confidence=0.0, stop_on_empty=False)
    assert result.filled == [5, 3, 7, 1, 0]  # rings: 5 and 3, (6 accepted, 2 protected), ...
    assert set(result.labels) == {0, 1, 3, 5, 7}
    assert seen[-1] == (5, 5) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.stopped == {"forward": "end", "backward": "end"} and not result.cancelled
    for z in result.filled:
        own = [e for e in result.exemplars[z] if e.record.get("origin") == OWN_CORRECTION]
        nearest = sorted(accepted, key=lambda s: (abs(s - z), s))
        assert [e.record["slice_index"] for e in own] == nearest
        assert own[0].id == -1 and own[0].record["dz"] == nearest[0] - z
        assert result.labels[z].shape == volume.shape[1:]
        assert 0.0 <= result.confidence[z] <= 1.0
    # slice 5 lies between two accepted slices: both next door, both score 1.0
    assert [e.score for e in result.exemplars[5][:2]] == [1.0, 1.0]


def test_memory_changes_the_prediction_and_slots_zero_turns_it_off(engine, volume, labels):
    on = propagate(engine, volume, {3: labels[3]}, start=3, min_confidence=0.0,
                   stop_on_empty=False)
    off = propagate(engine, volume, {3: labels[3]}, start=3, slots=0, min_confidence=0.0,
                    stop_on_empty=False)
    assert on.filled == off.filled
    assert all(e.record.get("origin") != OWN_CORRECTION
               for items in off.exemplars.values() for e in items)
    assert any(not np.array_equal(on.labels[z], off.labels[z]) for z in on.filled) or any(
        on.confidence[z] != off.confidence[z] for z in on.filled)


def test_stop_rule_empty_and_low_confidence_per_direction():
    image = np.random.default_rng(0).random((9, 8, 8)).astype(np.float32)
    start = np.zeros((8, 8), np.uint8)
    start[2:6, 2:6] = 1
    fake = Scripted(fill={6: 0}, conf={2: 0.3})
    result = propagate(fake, image, {4: start}, start=4)
    # forward: 5 filled, 6 empty -> filled (empty) and stop; backward: 3 filled, 2 too unsure
    assert result.filled == [5, 3, 6]
    assert not result.labels[6].any()
    assert 2 not in result.labels and result.confidence[2] == pytest.approx(0.3, abs=1e-3)
    assert result.stopped == {"forward": "empty", "backward": "confidence"}
    assert [c[0] for c in fake.calls] == [[5, 3], [6, 2]]
    loose = propagate(Scripted(fill={6: 0}, conf={2: 0.3}), image, {4: start}, start=4,
                      min_confidence=0.2, stop_on_empty=False)
    assert sorted(loose.filled) == [0, 1, 2, 3, 5, 6, 7, 8]


def test_cancel_keeps_what_was_filled():
    image = np.zeros((9, 8, 8), np.float32)
    start = np.ones((8, 8), np.uint8)
    fake = Scripted(fill={})
    result = propagate(fake, image, {4: start}, start=4, cancel=lambda: len(fake.calls) >= 2)
    assert result.cancelled and result.filled == [5, 3, 6, 2]
    assert result.stopped == {"forward": "cancelled", "backward": "cancelled"}


def test_chain_uses_predictions_as_weaker_memory():
    image = np.zeros((6, 8, 8), np.float32)
    fake = Scripted(fill={})
    propagate(fake, image, {0: np.ones((8, 8), np.uint8)}, start=0, chain=True)
    (_, first), (_, second) = fake.calls[:2]
    assert first.nearest(1) == [(0, 1.0)]
    assert second.predicted == frozenset({1})
    assert second.nearest(2) == [(0, 0.9), (1, pytest.approx(1.0 - PREDICTED_PENALTY))]
    plain = Scripted(fill={})
    propagate(plain, image, {0: np.ones((8, 8), np.uint8)}, start=0)
    assert all(set(m.labels) == {0} for _, m in plain.calls)


def test_volume_memory_ranks_predicted_slices_below_annotated_ones():
    labels = {z: np.zeros((4, 4), np.uint8) for z in (2, 5, 6)}
    memory = VolumeMemory(labels, slots=2, predicted=frozenset({5}))
    # slice 4: 5 is next door but predicted (0.8), 2 is two away (0.9), 6 two away (0.9)
    assert memory.nearest(4) == [(2, 0.9), (6, 0.9)]
    assert VolumeMemory(labels, slots=3).nearest(4) == [(5, 1.0), (2, 0.9), (6, 0.9)]


@pytest.mark.parametrize("kwargs, message", [
    ({"image": np.zeros((8, 8))}, "3-D volume"),
    ({"start": 9}, "out of range"),
    ({"start": 1}, "no annotation"),
    ({"accepted": {0: np.zeros((8, 8), np.uint8), 3: np.zeros((4, 4), np.uint8)}},
     "does not fit"),
    ({"min_confidence": 1.5}, "min_confidence"),
])
def test_bad_input_is_refused_clearly(kwargs, message):
    args = {"image": np.zeros((4, 8, 8), np.float32), "accepted": {0: np.zeros((8, 8), np.uint8)},
            "start": 0, **kwargs}
    with pytest.raises(JRASError, match=message):
        propagate(Scripted({}), **args)


def test_slice_confidence():
    probs = np.zeros((3, 4, 4), np.float32)
    probs[0] = 1.0
    labels = np.zeros((4, 4), np.uint8)
    assert slice_confidence(probs, labels) == 1.0
    labels[0, :2] = 2
    probs[:, 0, :2] = [[0.2, 0.1], [0.2, 0.3], [0.6, 0.6]]
    assert slice_confidence(probs, labels) == pytest.approx(0.6)


def test_workspace_memory_holds_accepted_corrections_and_keeps_them_out_of_retrieval(
        tiny_run, tmp_path, volume, labels):
    ws = Workspace.open(shutil.copytree(tiny_run, tmp_path / "run"), home=tmp_path / "home")
    try:
        assert ws.volume_memory(CASE, volume.shape) is None  # nothing accepted yet
        ws.accept(volume, labels, slices=[3, 5], case_id=CASE, author="ann")
        stored, info = ws.accepted_slices(CASE, volume.shape[1:])
        assert sorted(stored) == [3, 5] and stored[3].shape == volume.shape[1:]
        assert (stored[3] == labels[3]).mean() > 0.95  # bank round trip (nearest resize)
        assert info[5]["author"] == "ann" and info[5]["created"]
        memory = ws.volume_memory(CASE, volume.shape, slots=1)
        pred = ws.predict(volume, slices=[4, 6], memory=memory)
        for z in (4, 6):
            items = pred.exemplars[z]
            assert items[0].record["origin"] == OWN_CORRECTION
            assert items[0].record["created"] == info[items[0].record["slice_index"]]["created"]
            retrieved = [e for e in items if e.id >= 0]
            twice = [e for e in retrieved if e.record.get("case_id") == CASE
                     and e.record["slice_index"] == items[0].record["slice_index"]]
            assert retrieved and not twice  # the memory slice is not retrieved again
        assert pred.exemplars[6][0].record["slice_index"] == 5
        # an accepted slice itself is not in its own memory, and its correction stays
        # retrievable: the retrieved slot holds it, or the identical training exemplar (the
        # tiny run's bank was made from this same volume, so the two tie at similarity 1)
        again = ws.predict(volume, slices=[3], memory=memory).exemplars[3]
        assert again[0].record["slice_index"] == 5
        own = ws.bank.images([info[3]["correction_id"]])[0]
        retrieved = [e for e in again if e.id >= 0]
        same = np.corrcoef(retrieved[0].image.ravel(), np.asarray(own, float).ravel())[0, 1]
        assert retrieved and (retrieved[0].id == info[3]["correction_id"] or same > 0.99)
        assert ws.volume_memory(CASE, volume.shape, slots=0) is None
        painted = ws.volume_memory("other", volume.shape, extra={2: labels[2]})
        assert list(painted.labels) == [2] and painted.records[2]["not_accepted"]
    finally:
        ws.close()
