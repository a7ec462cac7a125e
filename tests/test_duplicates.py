"""Near-duplicate grouping (core/duplicates.py) and its use in training and evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL

from napari_jras.cli import main
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.duplicates import THRESHOLD, duplicate_groups, duplicate_pairs, thumbnails
from napari_jras.core.io import find_cases, read_volume
from napari_jras.core.pipeline import evaluate_run, train_run
from napari_jras.core.train import TrainConfig

DATA = Path(__file__).parent / "data"
# BUSI benign_433 == malignant_145; benign_435 a near copy (see tests/data/README.md)
BUSI_TWINS = Path(__file__).parent / "data_duplicates"


def blobs(rng: np.random.Generator, shape=(90, 120)) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.random(shape), 6).astype(np.float32)


def test_synthetic_near_duplicates_are_grouped():
    rng = np.random.default_rng(0)
    a, b, c = blobs(rng), blobs(rng), blobs(rng)
    brighter = 3.0 * a + 10  # the same image, other brightness and contrast
    bigger = np.kron(a, np.ones((2, 2), np.float32))  # and at twice the size
    noisy = a + rng.normal(0, 0.002, a.shape).astype(np.float32)
    names = ["a", "b", "c", "a_bright", "a_big", "a_noisy", "flat"]
    images = [a, b, c, brighter, bigger, noisy, np.full((50, 50), 7.0)]
    groups = duplicate_groups(names, images)
    assert {n for n, g in groups.items() if g == "a"} == {"a", "a_bright", "a_big", "a_noisy"}
    assert groups["b"] == "b" and groups["c"] == "c" and groups["flat"] == "flat"
    t = thumbnails(images)
    np.testing.assert_allclose(np.linalg.norm(t[:6], axis=1), 1.0, rtol=1e-5)
    assert not t[6].any()  # a constant image correlates with nothing


def test_groups_are_transitive_and_repeated_names_stay_together():
    rng = np.random.default_rng(1)
    a, far = blobs(rng), blobs(rng)
    mid = a + 0.5 * (far - a) * 0.4  # close to a
    end = a + (far - a) * 0.4  # close to mid, less close to a
    t = thumbnails([a, mid, end])
    corr = t @ t.T
    threshold = float(min(corr[0, 1], corr[1, 2])) - 1e-4
    assert corr[0, 2] < threshold  # a and end are no duplicates by themselves ...
    groups = duplicate_groups(["a", "mid", "end"], [a, mid, end], threshold=threshold)
    assert set(groups.values()) == {"a"}  # ... but one group through mid
    # slices of one patient always share a group
    assert duplicate_groups(["p1", "p1", "p2"], [a, far, blobs(rng)]) == {"p1": "p1", "p2": "p2"}


def test_duplicate_pairs_between_two_sets():
    rng = np.random.default_rng(2)
    a, b, c = blobs(rng), blobs(rng), blobs(rng)
    assert duplicate_pairs(thumbnails([a, b]), thumbnails([c, b * 2, a])) == [(0, 2), (1, 1)]
    with pytest.raises(ValueError, match="names"):
        duplicate_groups(["x"], [a, b])


def test_real_busi_duplicates_are_grouped():
    """benign_433 and malignant_145 are the same scan (a copy in two class folders)."""
    cases = find_cases(BUSI_TWINS) + find_cases(DATA / "busi")
    images = [read_volume(c.image_path).data for c in cases]
    groups = duplicate_groups([c.case_id for c in cases], images)
    assert groups["malignant_145"] == groups["benign_433"] == "benign_433"
    assert groups["benign_435"] == "benign_433"  # correlation 0.952 at 64 px
    assert groups["benign_100"] == "benign_100"
    t = thumbnails(images)
    assert float(t[0] @ t[2]) > 0.999 and THRESHOLD == 0.95


@pytest.fixture(scope="module")
def busi_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Tiny J-RAS runs trained on the BUSI twins + benign_100 (each image its own patient),
    with and without duplicate grouping, and a query folder holding benign_433."""
    root = tmp_path_factory.mktemp("dups")
    data = shutil.copytree(BUSI_TWINS, root / "train")
    for f in (DATA / "busi").iterdir():
        shutil.copy(f, data / f.name)
    model = dict(TINY_MODEL, use_retrieval=True, modality="us", class_names=["background", "lesion"])
    runs = [train_run(data, root / name, model, TrainConfig(steps=2, batch_size=2, seed=0),
                      group_duplicates=group) for name, group in (("grouped", True), ("plain", False))]
    query = root / "query"
    query.mkdir()
    for f in BUSI_TWINS.glob("benign_433_*"):
        shutil.copy(f, query / f.name)
    return runs[0], runs[1], query


def test_training_with_grouped_duplicates_stores_pseudo_patients(busi_runs):
    run, plain, _ = busi_runs
    with ExemplarBank.open(run / "bank") as bank:
        patients = {r["case_id"]: r["patient_id"] for r in bank.records()}
    assert patients == {"benign_433": "benign_433", "benign_435": "benign_433",
                        "malignant_145": "benign_433", "benign_100": "benign_100"}
    assert json.loads((run / "run_settings.json").read_text())["data"]["group_duplicates"]
    with ExemplarBank.open(plain / "bank") as bank:
        assert all(r["case_id"] == r["patient_id"] for r in bank.records())


def test_evaluate_never_retrieves_near_duplicates_of_the_query(busi_runs):
    _, run, query = busi_runs  # the bank holds the copies under their own names
    grouped = evaluate_run(run, query, device="cpu")  # auto: every case is its own patient
    case = grouped["cases"][0]
    assert grouped["provenance"]["group_duplicates"] is True
    assert case["retrieved_patients"] == ["benign_100"]
    assert len(case["excluded_duplicates"]) == 3  # itself, its copy and its near copy
    plain = evaluate_run(run, query, device="cpu", group_duplicates=False)["cases"][0]
    assert plain["excluded_duplicates"] == []
    assert {"malignant_145", "benign_435"} & set(plain["retrieved_patients"])  # the leak


def test_evaluate_cli_group_duplicates_flag(busi_runs, tmp_path):
    _, run, query = busi_runs
    report = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(run), "--data", str(query), "--report", str(report),
                 "--group-duplicates", "off", "--device", "cpu", "--quiet"]) == 0
    assert json.loads(report.read_text())["provenance"]["group_duplicates"] is False
