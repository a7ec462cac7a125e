"""The assistant's Qt-free logic without a viewer: edited slices, merges, drafts, jobs, summary."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_jras._widgets.edits import (
    SliceEdits,
    accepted_slices,
    draft_key,
    draft_meta,
    edited_slices,
    kept_slices,
    restored_time,
    slice_list,
)
from napari_jras._widgets.jobs import accept_job, training_data, workspace_summary


def volume(*values: int) -> np.ndarray:
    """A (Z, 4, 4) labels volume whose slice z is filled with ``values[z]``."""
    return np.stack([np.full((4, 4), v, np.uint8) for v in values])


def test_edited_slices_2d_and_3d():
    base = volume(0, 1, 2, 3)
    data = base.copy()
    assert edited_slices(data, base) == []
    data[1, 0, 0] = 3
    data[3] = 0
    assert edited_slices(data, base) == [1, 3]
    flat = np.zeros((4, 4), np.uint8)
    assert edited_slices(flat, flat) == [] and edited_slices(flat + 1, flat) == [0]


def test_a_prediction_never_overwrites_edits_and_becomes_their_baseline():
    edits = SliceEdits(volume(0, 0, 0, 0), "key")
    data = volume(0, 2, 0, 0)  # slice 1 painted by the person
    kept = edits.merge_prediction(data, volume(1, 1, 1, 1), [0, 1, 2])
    assert kept == [1]
    np.testing.assert_array_equal(data, volume(1, 2, 1, 0))  # slice 3 was not predicted
    np.testing.assert_array_equal(edits.baseline, volume(1, 1, 1, 0))
    assert edits.predicted == {0, 1, 2} and edits.edited(data) == [1]
    flat = SliceEdits(np.zeros((4, 4), np.uint8), "key")
    image = np.zeros((4, 4), np.uint8)
    assert flat.merge_prediction(image, np.full((4, 4), 2, np.uint8), [0]) == []
    assert (image == 2).all() and flat.edited(image) == []


def test_a_draft_restores_its_edited_slices_only():
    edits = SliceEdits(volume(1, 1, 1), "key")
    data = volume(1, 1, 1)
    saved = volume(5, 6, 7)
    assert edits.restore_draft(data, (saved, {"edited": [2, 9, -1]})) == [2]
    np.testing.assert_array_equal(data, volume(1, 1, 7))
    assert edits.edited(data) == [2]
    assert edits.restore_draft(data, None) == []
    assert edits.restore_draft(data, (volume(5, 6), {"edited": [0]})) == []  # other shape
    np.testing.assert_array_equal(data, volume(1, 1, 7))


def test_propagation_and_box_results_skip_edited_slices():
    edits = SliceEdits(volume(0, 0, 0, 0), "key")
    data = volume(0, 0, 3, 0)
    written = edits.write_unedited(data, {3: np.full((4, 4), 1, np.uint8),
                                          2: np.full((4, 4), 1, np.uint8),
                                          0: np.full((4, 4), 2, np.uint8)})
    assert written == [3, 0]  # in the given order, the edited slice 2 left out
    np.testing.assert_array_equal(data, volume(2, 0, 3, 1))
    assert edits.predicted == {0, 3} and edits.edited(data) == [2]


def test_accepting_makes_slices_the_baseline():
    edits = SliceEdits(volume(0, 0, 0), "key")
    data = volume(1, 0, 2)
    edits.accept(data, [0])
    assert edits.edited(data) == [2]
    edits.accept(data, [2])
    assert edits.edited(data) == []


def test_propagation_start_painted_or_accepted():
    edits = SliceEdits(volume(0, 0, 0, 0), "key")
    data = volume(0, 3, 0, 2)
    painted, protected = edits.propagation_start(data, 1)
    assert list(painted) == [1] and (painted[1] == 3).all() and protected == [3]
    data[1, 0, 0] = 0
    assert painted[1][0, 0] == 3  # a copy: later edits do not change the start
    painted, protected = edits.propagation_start(data, 2)  # an accepted (not edited) start
    assert painted == {} and protected == [1, 3]


def test_accepted_and_kept_slices():
    records = [{"case_id": "a", "slice_index": 4}, {"case_id": "b", "slice_index": 1},
               {"case_id": "a", "slice_index": None}]
    assert accepted_slices(records, "a") == {4, 0}
    assert kept_slices([2, 4], records, "a") == {0, 2, 4}
    assert kept_slices([2], [], "a") == {2}


def test_draft_keys_are_those_of_earlier_versions():
    # autosaved drafts of earlier versions must still be found: the key is a stored name
    assert draft_key("patient 002/frame01", "/data/p2.nii.gz", (10, 256, 232)) == \
        "patient_002_frame01-9f6876b9d1"
    assert draft_key("...", "", (4, 4)) == "image-910ac8317e"


def test_small_texts():
    assert slice_list([3, 4, 5]) == "3, 4, 5"
    assert slice_list(list(range(10))) == "0..9 (10)"
    meta = draft_meta("img", [2, 5])
    assert meta["image"] == "img" and meta["edited"] == [2, 5] and len(meta["saved"]) == 19
    assert restored_time((np.zeros(1), meta)) == meta["saved"]
    assert restored_time((np.zeros(1), {})) == "earlier" and restored_time(None) == ""


def test_training_data_reads_the_first_config(tmp_path):
    missing, broken, good = tmp_path / "v2", tmp_path / "v1", tmp_path / "v0"
    for folder in (broken, good):
        folder.mkdir()
    (good / "train_config.json").write_text(json.dumps({"data": {"cases": 3, "patients": 2}}))
    assert training_data([missing, good]) == {"cases": 3, "patients": 2}
    (broken / "train_config.json").write_text("{not json")
    assert training_data([missing, broken, good]) == {}
    assert training_data([missing]) == {}


@pytest.fixture
def ws(tiny_run, tmp_path, monkeypatch):
    from napari_jras.core.workspace import Workspace

    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    with Workspace.open(tiny_run) as workspace:
        yield workspace


def test_accept_job_and_summary_without_a_viewer(ws, frame):
    image, labels = frame
    before = len(ws.bank)
    summary = workspace_summary(ws)
    assert f"<b>Bank</b> {before} exemplars" in summary and "0 accepted" in summary
    assert "<b>Version</b> v000 of 1" in summary and "<b>Training data</b>" in summary
    result = accept_job(ws, image=image, labels=labels, slices=[2], case_id="case")
    assert len(result["ids"]) == 1 and result["bank"] == before + 1
    assert result["corrections"] == 1 and result["pending"] == 1
    assert "1 accepted, 1 not yet fine-tuned on" in workspace_summary(ws)


@pytest.fixture
def frame(data_dir) -> tuple[np.ndarray, np.ndarray]:
    from napari_jras.core.io import read_volume

    acdc = data_dir / "acdc"
    image = read_volume(acdc / "patient045_frame01_image.tif").data
    labels = read_volume(acdc / "patient045_frame01_label.tif").data.astype(np.uint8)
    return image, labels


def test_the_logic_modules_do_not_import_qt_or_napari():
    code = ("import sys, napari_jras._widgets.edits, napari_jras._widgets.jobs\n"
            "gui = ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'vispy')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(gui)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
