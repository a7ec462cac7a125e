"""Workspace: creation and re-opening, accepted corrections, drafts, baseline workspaces."""

from __future__ import annotations

import ast
import gc
import inspect
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import napari_jras
from napari_jras.core import workspace as ws_module
from napari_jras.core.errors import BankError, DataError, JRASError, ModelError
from napari_jras.core.io import read_volume
from napari_jras.core.workspace import BUILTIN, Workspace, builtin_model_dir, home_dir

NIFTI = Path(__file__).parent / "data" / "nifti"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def ws(tiny_run, home):
    with Workspace.open(tiny_run) as workspace:
        yield workspace


@pytest.fixture(scope="module")
def frame02() -> tuple[np.ndarray, np.ndarray]:
    """Another time frame of the test patient: similar to, but not in, the tiny run's bank."""
    image = read_volume(NIFTI / "patient045_frame02_image.nii.gz").data
    label = read_volume(NIFTI / "patient045_frame02_label.nii.gz").data
    return image, label.astype(np.uint8)


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_home_dir_follows_environment(home):
    assert home_dir() == home


def test_open_creates_a_copy_and_reopens_it(tiny_run, home):
    gc.collect()  # the fixture's own bank handle closes (and checkpoints its WAL) when collected
    before = files_of(tiny_run)
    ws = Workspace.open(tiny_run)
    assert ws.path.parent == home / "workspaces" and ws.path.name.startswith("jras-")
    assert [v.name for v in ws.versions()] == ["v000"] and ws.active.name == "v000"
    assert (ws.active.path / "model.safetensors").is_file()
    assert (ws.active.path / "train_config.json").is_file()
    assert len(ws.bank) == 8 and ws.bank.path == ws.path / "bank"
    assert ws.num_classes == 4 and ws.class_names[3] == "LV"
    meta = json.loads((ws.path / "workspace.json").read_text())
    assert meta["source"] == str(tiny_run.resolve()) and meta["active"] == "v000"
    assert not [p for p in ws.path.parent.iterdir() if p.name.startswith(".")]
    ws.close()
    assert files_of(tiny_run) == before  # the source run is never written to
    again = Workspace.open(tiny_run)
    assert again.path == ws.path and again.created == ws.created
    again.close()
    with Workspace.open(ws.path) as direct:  # a workspace folder opens itself
        assert direct.path == ws.path


def test_builtin_source(tiny_run, home, tmp_path, monkeypatch):
    fake_package = tmp_path / "pkg" / "napari_jras"
    monkeypatch.setattr(napari_jras, "__file__", str(fake_package / "__init__.py"))
    with pytest.raises(ModelError, match="bundled cardiac MRI model is not installed"):
        Workspace.open(BUILTIN)
    assert not (home / "workspaces" / "builtin-cardiac-mri").exists()
    shutil.copytree(tiny_run, fake_package / "_builtin" / "cardiac_mri")
    assert builtin_model_dir() == fake_package / "_builtin" / "cardiac_mri"
    with Workspace.open() as ws:
        assert ws.path == home / "workspaces" / "builtin-cardiac-mri" and ws.source == BUILTIN


def test_bad_sources_create_nothing(tiny_run, home, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    no_bank = tmp_path / "no_bank"
    shutil.copytree(tiny_run, no_bank)
    shutil.rmtree(no_bank / "bank")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(tmp_path / "missing", ModelError, "not found"), (empty, ModelError, "no config.json"),
             (broken, ModelError, "damaged"), (no_bank, BankError, "no exemplar bank")]
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            Workspace.open(source)
    workspaces = home / "workspaces"
    assert not workspaces.exists() or not any(workspaces.iterdir())


def test_accepted_correction_is_the_next_top_hit(ws, frame02):
    image, label = frame02
    version = ws.engine().version
    before = ws.predict(image[3])
    assert all(e.record["origin"] == "training" for e in before.exemplars[0])
    ids = ws.accept(image[3], label[3], source="patient045_frame02_image.nii.gz", author="me")
    assert len(ids) == 1 and len(ws.bank) == 9
    after = ws.predict(image[3])
    top = after.exemplars[0][0]
    assert top.id == ids[0] and top.score > 0.999
    assert top.record["origin"] == "correction" and top.record["case_id"] == "patient045_frame02"
    assert top.record["patient_id"] == "patient045" and top.record["author"] == "me"
    assert top.record["model_version"] == "v000"
    assert ws.engine().version == version  # no retraining, no re-embedding
    assert np.array_equal(top.mask, np.asarray(ws.bank.masks(ids)[0]))


def test_accept_volume_stores_foreground_slices_and_replaces(ws, frame02):
    image, label = frame02
    label = label.copy()
    label[6:] = 0
    ids = ws.accept(image, label, case_id="case A")
    assert [r["slice_index"] for r in ws.corrections()] == list(range(6))
    again = ws.accept(image, label, slices=[0, 1], case_id="case A")
    records = ws.corrections()
    assert len(records) == 6 and {r["id"] for r in records} == set(ids[2:]) | set(again)
    assert ws.corrections_since_finetune == 6
    ws.accept(image, label, slices=[7], case_id="case A")  # an empty slice on request
    assert len(ws.corrections()) == 7


def test_bad_accept_inputs_leave_the_bank_unchanged(ws, frame02):
    image, label = frame02
    bad = [(image, label[:4], "does not match"),
           (image, np.full_like(label, 4), "4 classes"),
           (image, label + 0.5, "non-integer"),
           (image, -np.ones(label.shape, np.int16), "negative"),
           (image, np.zeros_like(label), "empty"),
           (np.full(image.shape, np.nan), label, "NaN")]
    for img, lbl, message in bad:
        with pytest.raises(DataError, match=message):
            ws.accept(img, lbl)
    for slices, message in (([8], "out of range"), ([], "No slices")):
        with pytest.raises(DataError, match=message):
            ws.accept(image, label, slices=slices)
    assert len(ws.bank) == 8 and ws.corrections() == []


def test_corrections_survive_reopening(ws, frame02):
    image, label = frame02
    ids = ws.accept(image[2], label[2], case_id="c1")
    ws.close()
    with Workspace.open(ws.source) as again:
        assert [r["id"] for r in again.corrections()] == ids
        assert again.predict(image[2]).exemplars[0][0].id == ids[0]


def test_drafts_round_trip_and_survive_reopening(ws, tiny_run):
    labels = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    ws.save_draft("patient 1 é", labels, {"layer": "x", "z": [1, 2]})
    ws.save_draft("other", labels[0])
    assert ws.drafts() == ["other", "patient 1 é"]
    ws.close()
    with Workspace.open(tiny_run) as again:
        loaded, meta = again.load_draft("patient 1 é")
        assert loaded.dtype == np.uint16 and np.array_equal(loaded, labels)
        assert meta == {"layer": "x", "z": [1, 2]}
        again.save_draft("other", labels[1])  # overwrite
        assert np.array_equal(again.load_draft("other")[0], labels[1])
        again.discard_draft("other")
        again.discard_draft("other")
        assert again.drafts() == ["patient 1 é"] and again.load_draft("other") is None
        assert not [p for p in (again.path / "drafts").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("key", ["../escape", "a/b", "..", ".", "", "a\\b", ".hidden", "x" * 200])
def test_draft_keys_cannot_escape(ws, key):
    with pytest.raises(DataError, match="Invalid draft key"):
        ws.save_draft(key, np.zeros((2, 2), np.uint8), {})
    assert not (ws.path.parent / "escape.npz").exists()


def test_draft_validation(ws):
    with pytest.raises(DataError, match="whole numbers"):
        ws.save_draft("k", np.zeros((2, 2), np.float32), {})
    with pytest.raises(DataError, match="plain values"):
        ws.save_draft("k", np.zeros((2, 2), np.uint8), {"a": object()})
    (ws.path / "drafts").mkdir(exist_ok=True)
    (ws.path / "drafts" / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="damaged"):
        ws.load_draft("bad")
    assert ws.drafts() == ["bad"]


def test_baseline_workspace_keeps_corrections_for_finetuning(tiny_baseline_run, home, frame02):
    image, label = frame02
    with Workspace.open(tiny_baseline_run) as ws:
        assert ws.bank is None and not ws.model_config.use_retrieval
        pred = ws.predict(image[1:3])
        assert pred.labels.shape == (2, 112, 112) and pred.exemplars == {}
        ids = ws.accept(image, label, slices=[1, 2], case_id="c")
        assert [r["id"] for r in ws.corrections()] == ids
        with pytest.raises(DataError):
            ws.accept(image, label + 9)
        assert len(ws.corrections()) == 2 and ws.corrections_since_finetune == 2


def test_predict_and_accept_from_threads(ws, frame02):
    image, label = frame02
    errors: list[BaseException] = []

    def work(z: int) -> None:
        try:
            ws.predict(image[z])
            ws.accept(image[z], label[z], case_id=f"t{z}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(z,)) for z in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(ws.corrections()) == 4


def test_unknown_version_and_damaged_workspace_file(ws, tiny_run):
    with pytest.raises(ModelError, match="no version 'v009'"):
        ws.activate("v009")
    ws.close()
    (ws.path / "workspace.json").write_text("{")
    with pytest.raises(ModelError, match="damaged"):
        Workspace.open(tiny_run)
    assert ws_module.WORKSPACE_FILE == "workspace.json"


def test_snapshot_holds_the_active_version_and_every_exemplar(ws, frame02):
    image, label = frame02
    [new] = ws.accept(image, label, slices=[4], case_id="patient045_frame02")
    snap = ws.snapshot()
    assert snap.active == ws.active
    assert [r["id"] for r in snap.records] == snap.ids.tolist() == sorted(snap.ids.tolist())
    assert len(snap.ids) == len(ws.bank) and new == snap.ids[-1]
    assert snap.records[-1]["origin"] == "correction" and snap.records[0]["origin"] == "training"
    assert snap.images.shape == snap.masks.shape == (len(snap.ids), ws.bank.size, ws.bank.size)
    ids, images, masks = ws.bank.load_all()
    assert np.array_equal(ids, snap.ids) and np.array_equal(images, snap.images)
    assert np.array_equal(masks, snap.masks)


def test_finetune_slot_is_held_by_one_job_at_a_time(ws):
    with ws.finetune_slot("busy here"):
        with pytest.raises(JRASError, match="busy here"), ws.finetune_slot("busy here"):
            pass
        with pytest.raises(JRASError, match="is running: cancel it first"):
            ws.discard_finetune()
        with pytest.raises(JRASError, match="already running"):
            ws.finetune(steps=1)
    with ws.finetune_slot("free again"):
        pass
    ws.discard_finetune()


def test_next_version_name_skips_names_taken_on_disk(ws):
    assert ws.next_version_name() == "v001"
    (ws.path / "versions" / ".v001.partial").mkdir()  # a temporary folder does not take it
    assert ws.next_version_name() == "v001"
    (ws.path / "versions" / "v003").mkdir()  # e.g. left by a crash before installing
    assert ws.next_version_name() == "v004"


def test_finetune_uses_only_the_public_workspace_api():
    """core/finetune.py neither imports core/workspace.py (which imports it) nor touches the
    workspace's private members."""
    from napari_jras.core import finetune

    tree = ast.parse(inspect.getsource(finetune))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "workspace" not in imported and "napari_jras.core.workspace" not in imported
    private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and isinstance(node.value, ast.Name) and node.value.id == "ws"
               and node.attr.startswith("_")}
    assert private == set()


def test_slices_to_store_defaults_and_refusals():
    import numpy as np

    from napari_jras.core.corrections import slices_to_store
    from napari_jras.core.errors import DataError

    mask = np.zeros((4, 8, 8), np.uint8)
    mask[2, 3, 3] = 1
    assert slices_to_store(mask, None, 3) == [2]  # every slice with foreground
    assert slices_to_store(mask[:1] * 0, None, 2) == [0]  # a 2-D image's slice, even if empty
    assert slices_to_store(mask, [3, 1, 3], 3) == [1, 3]
    with pytest.raises(DataError, match="corrected mask is empty"):
        slices_to_store(np.zeros_like(mask), None, 3)
    with pytest.raises(DataError, match="No slices"):
        slices_to_store(mask, [], 3)
    with pytest.raises(DataError):
        slices_to_store(mask, [4], 3)
