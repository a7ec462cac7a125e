"""Statistics of a fusion study (``fusion_study.py``): per guide source, paired by seed and patient.

Usage (repository root)::

    python benchmarks/accuracy/report_fusion_study.py --reports benchmarks/results/fusion_study/p4 \\
        --variant readout --baseline baseline --out benchmarks/results/fusion_study/p4_stats.json

Reads the ``napari-jras evaluate`` reports ``<variant>_<N>p_seed<S>_<source>.json`` found in the
``--reports`` folders, averages each patient's frames (the unit of comparison), and compares,
for every seed present in both sides (paired by seed):

- the variant with ``retrieved`` / ``none`` / ``neighbour`` exemplars against the baseline;
- ``neighbour`` (of ``--neighbour-variant`` if given) against ``retrieved`` and against copying
  the neighbour's mask (slice z gets the ground truth of z-1, z+1 for the first slice: no
  network);
- ``oracle`` against ``none`` (does the model read its exemplars at all?).

Holm's correction runs across the table; verdicts follow ``benchmarks/report_stats.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from report_stats import holm, mean_sd, paired, unit_means, verdict  # noqa: E402

from napari_jras.core.io import find_cases, load_case  # noqa: E402
from napari_jras.core.metrics import mean_dice  # noqa: E402
from napari_jras.core.provenance import provenance  # noqa: E402

NAME = re.compile(r"^(?P<variant>.+)_(?P<patients>\d+)p_seed(?P<seed>\d+)_(?P<source>[a-z]+)\.json$")


def load(folders: list[Path]) -> dict[tuple[str, int, str], dict[int, dict[str, float]]]:
    """``{(variant, patients, source): {seed: {patient: Dice}}}`` from the report files."""
    found: dict = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            m = NAME.match(path.name)
            if not m:
                continue
            report = json.loads(path.read_text())
            values = {c["case_id"]: c["mean"]["dice"] for c in report["cases"]}
            unit_of = {c["case_id"]: c["patient_id"] for c in report["cases"]}
            key = (m["variant"], int(m["patients"]), m["source"])
            found.setdefault(key, {})[int(m["seed"])] = unit_means(values, unit_of)
    return found


def copy_neighbour_cases(val: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Per case: Dice of predicting slice z by the ground truth of z-1 (z+1 for z = 0), what
    copying an accepted neighbour gives with no network; and each case's patient."""
    values, unit_of = {}, {}
    for case in find_cases(val):
        _, label = load_case(case)
        label = np.asarray(label)
        copied = np.concatenate([label[1:2], label[:-1]])
        values[case.case_id] = mean_dice(copied, label, int(label.max()) + 1)
        unit_of[case.case_id] = case.patient_id
    return values, unit_of


def copy_neighbour(val: Path) -> dict[str, float]:
    """Per patient (mean of its cases): :func:`copy_neighbour_cases`."""
    return unit_means(*copy_neighbour_cases(val))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, nargs="+", required=True)
    parser.add_argument("--variant", default="readout")
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--neighbour-variant", default=None,
                        help="take the neighbour reports of this variant (e.g. the same runs "
                             "evaluated with another --readout-trust); default: --variant")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--val", type=Path, default=REPO.parent / "shared/data/acdc/val")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    found = load(args.reports)
    n = args.patients

    def side(variant: str, source: str) -> dict[int, dict[str, float]]:
        return found.get((variant, n, source), {})

    base = side(args.baseline, "retrieved")
    neighbour = side(args.neighbour_variant or args.variant, "neighbour")
    copy = copy_neighbour(args.val)
    rows = []
    comparisons = [
        ("retrieved vs baseline", side(args.variant, "retrieved"), base),
        ("none vs baseline", side(args.variant, "none"), base),
        ("neighbour vs baseline", neighbour, base),
        ("neighbour vs retrieved", neighbour, side(args.variant, "retrieved")),
        ("neighbour vs copying the neighbour", neighbour, dict.fromkeys(neighbour, copy)),
        ("retrieved vs none", side(args.variant, "retrieved"), side(args.variant, "none")),
        ("oracle vs none", side(args.variant, "oracle"), side(args.variant, "none")),
    ]
    for name, a, b in comparisons:
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        result = paired([a[s] for s in seeds], [b[s] for s in seeds])
        rows.append({"comparison": name, "seeds": seeds, **result})
    for row, p in zip(rows, holm([r["wilcoxon_p"] for r in rows]), strict=True):
        row["p_holm"] = p
        row["verdict"] = verdict(row, len(row["seeds"]), p)
    means = {}
    for (variant, patients, source), by_seed in sorted(found.items()):
        if patients == n:
            per_seed = [float(np.mean(list(v.values()))) for _, v in sorted(by_seed.items())]
            m, sd = mean_sd(per_seed)
            means[f"{variant}/{source}"] = {"seeds": sorted(by_seed), "per_seed": per_seed,
                                            "mean": m, "sd": sd}
    means["copy_neighbour"] = {"mean": float(np.mean(list(copy.values())))}
    report = {"provenance": provenance(data=args.val, command=" ".join(sys.argv),
                                       reports=[str(p) for p in args.reports]),
              "patients": n, "unit": "patient (mean of its frames)", "means": means,
              "comparisons": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for key, value in means.items():
        sd = value.get("sd")
        print(f"{key:28s} {value['mean']:.3f}" + (f" +- {sd:.3f}" if sd else "")
              + (f"  seeds {value['seeds']}" if "seeds" in value else ""))
    for row in rows:
        lo, hi = row["ci95"]
        print(f"{row['comparison']:36s} {row['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]  "
              f"p_holm {row['p_holm'] if row['p_holm'] is None else round(row['p_holm'], 4)}"
              f"  {row['verdict']}")


if __name__ == "__main__":
    main()
