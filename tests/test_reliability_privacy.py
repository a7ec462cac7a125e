"""Patient data: no network at run time, no identifying metadata in exported models, and
pseudonymising a bank (docs/reliability.md, "Patient data")."""

from __future__ import annotations

import csv
import json
import shutil
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_MODEL

from napari_jras.cli import main
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.checkpoint import load_model
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.errors import BankError
from napari_jras.core.io import read_volume
from napari_jras.core.pipeline import train_run
from napari_jras.core.train import TrainConfig
from napari_jras.core.workspace import Workspace, builtin_model_dir

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_jras" / "_sample"
ACDC = Path(__file__).parent / "data" / "acdc" / "patient045_frame01"
SECRETS = ("Jane Roe", "MRN4711", "roe_notes", "St_Elsewhere_Hospital")
REGEX = r"^(p\d+)_"


@pytest.fixture
def offline(monkeypatch) -> list[tuple]:
    """Every attempt to open a network connection fails (and is recorded)."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    return attempts


def test_predict_and_train_without_network(offline, acdc_slices_dir, tmp_path):
    engine = InferenceEngine.from_run(builtin_model_dir(), device="cpu")
    image = read_volume(SAMPLE / "patient002_frame01_image.tif").data
    labels = engine.predict(image, slices=[4, 5]).labels
    assert labels[4:6].any() and labels.max() <= 3
    run = train_run(acdc_slices_dir, tmp_path / "run", dict(TINY_MODEL, use_retrieval=True),
                    TrainConfig(steps=2, batch_size=4, checkpoint_every=100), patient_regex=REGEX)
    load_model(run)
    assert offline == []


def _case_with_identifying_header(folder: Path, stem: str, z: int) -> None:
    """A real MRI slice as NIfTI whose header names a (fictitious) patient."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, data in (("image", read_volume(f"{ACDC}_image.tif").data[z]),
                       ("label", read_volume(f"{ACDC}_label.tif").data[z].astype(np.uint8))):
        img = nib.Nifti1Image(data.T[..., None], np.eye(4))
        img.header["descrip"] = b"Jane Roe DOB 1970-01-01"
        img.header["db_name"] = b"MRN4711"
        img.header["aux_file"] = b"roe_notes.txt"
        img.header["intent_name"] = b"MRN4711"
        nib.save(img, folder / f"{stem}_{kind}.nii.gz")


def _leaks(folder: Path, secrets: tuple[str, ...]) -> list[str]:
    """Files under ``folder`` whose bytes contain one of ``secrets``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            found += [f"{path.relative_to(folder)}: {s}" for s in secrets if s.encode() in raw]
    return found


def test_exported_models_hold_no_identifying_metadata(tmp_path, monkeypatch):
    data = tmp_path / "St_Elsewhere_Hospital" / "export" / "train"
    for z in range(4):
        _case_with_identifying_header(data, f"p{z // 2}_slice{z % 2}", 2 + z)
    run = train_run(data, tmp_path / "run", dict(TINY_MODEL, use_retrieval=True),
                    TrainConfig(steps=2, batch_size=2, checkpoint_every=1),
                    val=None, patient_regex=REGEX)
    secrets = (*SECRETS, str(tmp_path))
    assert _leaks(run, secrets) == []
    record = json.loads((run / "train_config.json").read_text())
    assert record["data"]["path"] == "train" and record["val"] is None
    with ExemplarBank.open(run / "bank") as bank:  # what a bank holds: case ids and file names
        assert {r["source"] for r in bank.records()} == {
            f"p{z // 2}_slice{z % 2}_image.nii.gz" for z in range(4)}
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    with Workspace.open(run) as ws:
        assert _leaks(ws.path / "versions", secrets) == []


def test_workspace_copy_strips_paths_of_older_run_folders(tiny_run, tmp_path, monkeypatch):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    record = json.loads((run / "train_config.json").read_text())
    record["data"]["path"], record["val"] = "/data/St_Elsewhere_Hospital/train", "/data/val"
    (run / "train_config.json").write_text(json.dumps(record))
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    with Workspace.open(run) as ws:
        copied = json.loads((ws.active.path / "train_config.json").read_text())
    assert copied["data"]["path"] == "train" and copied["val"] == "val"


def test_anonymise_a_bank(tiny_run, tmp_path, capsys):
    bank_dir = Path(shutil.copytree(tiny_run / "bank", tmp_path / "bank"))
    with ExemplarBank.open(bank_dir) as bank:
        before = bank.records()
        ids, images, masks = bank.load_all()
        emb = bank.embeddings()[1]
        version = bank.retriever_version
    key = tmp_path / "key.csv"
    assert main(["bank", "anonymise", "--bank", str(bank_dir), "--key", str(key)]) == 0
    assert "Pseudonymised 4 patient(s) in 8 exemplars" in capsys.readouterr().out
    pairs = dict(csv.reader(key.read_text().splitlines()[1:]))
    assert sorted(pairs) == ["p0", "p1", "p2", "p3"]
    assert sorted(pairs.values()) == [f"patient-{i:04d}" for i in range(1, 5)]
    with ExemplarBank.open(bank_dir) as bank:
        after = bank.records()
        for old, new in zip(before, after, strict=True):
            assert new["patient_id"] == pairs[old["patient_id"]]
            assert new["case_id"].startswith(f"{new['patient_id']}-case-")
            assert new["source"] == "" and new["slice_index"] == old["slice_index"]
        got = bank.load_all()
        np.testing.assert_array_equal(got[0], ids)
        np.testing.assert_array_equal(got[1], images)
        np.testing.assert_array_equal(got[2], masks)
        assert [h[0].id for h in bank.search(emb, 1, version)] == ids.tolist()
    old_values = {r["case_id"] for r in before} | {r["source"] for r in before}
    assert _leaks(bank_dir, tuple(old_values)) == []  # also gone from the database file
    # the key is never overwritten
    assert main(["bank", "anonymise", "--bank", str(bank_dir), "--key", str(key)]) == 2
    assert "exists" in capsys.readouterr().err
    with ExemplarBank.open(bank_dir) as bank, pytest.raises(BankError, match="prefix"):
        bank.pseudonymise("../x")
