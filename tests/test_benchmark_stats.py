"""Statistics of the benchmark reports (benchmarks/report_stats.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from report_stats import bootstrap_ci, holm, mean_sd, paired, unit_means, verdict  # noqa: E402


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, None, 0.01]) == [pytest.approx(0.2), None, pytest.approx(0.02)]
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == [] and holm([0.03]) == [0.03]


def test_unit_means_average_the_frames_of_a_patient():
    values = {"p1_frame01": 0.8, "p1_frame12": 0.6, "p2_frame01": 0.5, "p3_frame01": float("nan")}
    unit_of = {"p1_frame01": "p1", "p1_frame12": "p1", "p2_frame01": "p2", "p3_frame01": "p3"}
    assert unit_means(values, unit_of) == {"p1": pytest.approx(0.7), "p2": 0.5}
    assert unit_means({"a": 1.0}, {}) == {"a": 1.0}  # no unit: the case is its own


def test_bootstrap_ci_is_seeded_and_sensible():
    rng = np.random.default_rng(0)
    diff = rng.normal(0.1, 0.05, 40)
    lo, hi = bootstrap_ci(diff)
    assert lo < diff.mean() < hi and lo > 0.07 and hi < 0.13
    assert bootstrap_ci(diff) == (lo, hi)  # seeded
    wide = bootstrap_ci(diff[:8])
    assert wide[1] - wide[0] > hi - lo
    assert bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_paired_comparison_and_verdict():
    a = {f"p{i}": 0.8 + 0.01 * i for i in range(10)}
    b = {f"p{i}": 0.7 + 0.005 * i for i in range(10)}
    b["only_b"] = 0.1
    cmp = paired(a, b)
    assert cmp["n_units"] == 10 and cmp["a_better_units"] == 10
    assert cmp["mean_diff"] == pytest.approx(np.mean([0.1 + 0.005 * i for i in range(10)]))
    assert cmp["wilcoxon_p"] < 0.01 and cmp["ci95"][0] > 0
    assert verdict(cmp, 3, cmp["wilcoxon_p"]) == "better"
    assert verdict(cmp, 1, cmp["wilcoxon_p"]) == "no claim (1 seed)"
    assert verdict(cmp, 3, 0.2) == "no significant difference"
    assert verdict(paired(b, a), 3, 0.001) == "worse"
    assert paired(dict.fromkeys("abc", 1.0), dict.fromkeys("abc", 1.0))["wilcoxon_p"] is None
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_sd([0.5]) == (0.5, None)


def test_seed_disagreement_widens_the_ci():
    """Patients agree within each seed, but the seeds disagree: no claim of a difference."""
    rng = np.random.default_rng(3)
    base = [{f"p{i}": 0.7 + 0.01 * rng.random() for i in range(10)} for _ in range(3)]
    shift = [-0.02, 0.18, -0.04]  # like the ACDC seed table: one seed far better
    jras = [{p: v + s + 0.002 * rng.random() for p, v in b.items()} for b, s in zip(base, shift, strict=True)]
    cmp = paired(jras, base)
    assert cmp["n_seeds"] == 3 and cmp["mean_diff"] == pytest.approx(np.mean(shift), abs=0.01)
    assert cmp["wilcoxon_p"] < 0.01  # conditional on the seeds: every patient gained on average
    assert cmp["ci95"][0] < 0 < cmp["ci95"][1]  # but the seed-to-seed spread dominates
    assert verdict(cmp, 3, holm([cmp["wilcoxon_p"]])[0]) == "no significant difference"
    with pytest.raises(ValueError, match="seeds"):
        paired(jras, base[:2])
