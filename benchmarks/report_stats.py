"""Statistics of the benchmark reports: paired comparisons done as the issue-14 audit asked.

* **Unit of comparison: the patient.** Cases of one patient (ACDC: the ED and ES frames; a
  near-duplicate group of BUSI / COVID CT images) are averaged first, so two frames of one heart
  are not counted as two independent observations (:func:`unit_means`).
* **Seeds:** the spread over seeds is reported as mean +- sd (sample sd, ``ddof=1``) of the
  per-seed means (:func:`mean_sd`). A verdict of better / worse needs at least ``MIN_SEEDS`` = 3
  seeds (:func:`verdict`).
* **Tests:** paired Wilcoxon signed-rank over patients (each patient's difference averaged over
  the seeds, so the test is conditional on the seeds run), then **Holm**'s step-down correction
  across all comparisons of one table (:func:`holm`). The effect is the mean paired difference
  with a **percentile bootstrap 95 % CI** (10,000 resamples, seeded; :func:`bootstrap_ci`); with
  several seeds the bootstrap is two-level (seeds, then patients, drawn with replacement), so
  the CI also carries the seed-to-seed variation, which at short training dominates. A verdict
  needs both: Holm p < 0.05 and a CI clear of 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import wilcoxon

MIN_SEEDS = 3
ALPHA = 0.05


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values, in the input order (None stays None and is not counted).

    The i-th smallest of m p-values is multiplied by (m - i + 1), made non-decreasing along the
    sorted order and capped at 1; rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha.
    """
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    m = len(present)
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * float(p)))
        adjusted[i] = running
    return adjusted


def unit_means(values: Mapping[str, float], unit_of: Mapping[str, str]) -> dict[str, float]:
    """Mean of the case ``values`` per unit (patient or duplicate group); NaN cases left out."""
    groups: dict[str, list[float]] = {}
    for case, value in values.items():
        if value is not None and not np.isnan(value):
            groups.setdefault(unit_of.get(case, case), []).append(float(value))
    return {unit: float(np.mean(v)) for unit, v in groups.items()}


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``; None for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def bootstrap_ci(diff: Sequence[float] | np.ndarray, level: float = 0.95,
                 resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of the paired differences ``diff``.

    ``diff`` is one difference per unit, or a (seeds, units) array: then each resample draws
    seeds and, independently, units with replacement (two-level bootstrap).
    """
    arr = np.asarray(diff, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no differences to bootstrap")
    rng = np.random.default_rng(seed)
    if arr.ndim == 1:
        means = arr[rng.integers(0, arr.size, (resamples, arr.size))].mean(axis=1)
    else:
        n_seeds, n_units = arr.shape
        s = rng.integers(0, n_seeds, (resamples, n_seeds, 1))
        u = rng.integers(0, n_units, (resamples, 1, n_units))
        means = arr[s, u].mean(axis=(1, 2))
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def paired(a: Mapping[str, float] | Sequence[Mapping[str, float]],
           b: Mapping[str, float] | Sequence[Mapping[str, float]]) -> dict:
    """Compare per-unit values ``a`` (e.g. J-RAS) with ``b`` (e.g. the baseline).

    ``a`` and ``b`` are ``{unit: value}``, or one such dict per seed (seed i of ``a`` paired
    with seed i of ``b``). Returns ``n_units``, ``n_seeds``, ``mean_diff`` (a - b), ``ci95``
    (bootstrap, two-level with several seeds), ``wilcoxon_p`` (over the seed-averaged unit
    differences; None with fewer than 6 units or all differences zero) and
    ``a_better_units``.
    """
    a_seeds, b_seeds = ([a] if isinstance(a, Mapping) else list(a),
                        [b] if isinstance(b, Mapping) else list(b))
    if len(a_seeds) != len(b_seeds):
        raise ValueError(f"{len(a_seeds)} seeds against {len(b_seeds)}")
    units = sorted(set.intersection(*(set(d) for d in a_seeds + b_seeds)))
    if not units:
        raise ValueError("the two results share no case / patient")
    diff = np.array([[x[u] - y[u] for u in units] for x, y in zip(a_seeds, b_seeds, strict=True)])
    per_unit = diff.mean(axis=0)
    p = float(wilcoxon(per_unit).pvalue) if len(units) >= 6 and np.any(per_unit) else None
    return {"n_units": len(units), "n_seeds": len(a_seeds), "mean_diff": float(diff.mean()),
            "ci95": list(bootstrap_ci(diff if len(diff) > 1 else per_unit)), "wilcoxon_p": p,
            "a_better_units": int((per_unit > 0).sum())}


def verdict(comparison: Mapping, n_seeds: int, p_holm: float | None) -> str:
    """``better`` / ``worse`` only with >= MIN_SEEDS seeds, Holm p < ALPHA and a CI clear of 0."""
    if n_seeds < MIN_SEEDS:
        return f"no claim ({n_seeds} seed{'s' if n_seeds != 1 else ''})"
    lo, hi = comparison["ci95"]
    if p_holm is None or p_holm >= ALPHA or lo <= 0 <= hi:
        return "no significant difference"
    return "better" if comparison["mean_diff"] > 0 else "worse"
