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
    ["bank", "rebuild"], ["bank", "remove"], ["bank", "anonymise"], ["demo"], ["info"]])
def test_help_of_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: napari-jras {' '.join(argv)}" in capsys.readouterr().out


def test_info_prints_versions_and_device(capsys):
    assert cli("info") == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split("  ")[0].strip() for line in lines}
    assert {"torch", "faiss", "device (auto)", "cuda available", "faiss gpu"} <= keys


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
    assert set(report) == {"provenance", "model", "bank", "data", "device", "summary", "cases"}
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
    from napari_jras.core.provenance import case_list_sha256
    from napari_jras.core.io import find_cases

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


# --- errors ---------------------------------------------------------------------------------
def test_bad_training_inputs_exit_2_with_one_line(acdc_slices_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = [
        (["--data", tmp_path / "missing"], "not found"),
        (["--data", tmp_path / "empty"], "_image"),
        (["--data", acdc_slices_dir, "--k", "9"], "K must be between 1 and 8"),
        (["--data", acdc_slices_dir, "--align-shift", "0.9"], "align_shift must be between"),
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


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ModelError, match="Model folder not found"):
        cli("--debug", "evaluate", "--model", tmp_path / "missing", "--data", tmp_path,
            "--report", tmp_path / "r.json")
