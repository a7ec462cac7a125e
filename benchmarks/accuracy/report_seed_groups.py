"""Summarise ``napari-jras evaluate`` reports by group of seeds (e.g. one learning rate each).

Usage (repository root)::

    python benchmarks/accuracy/report_seed_groups.py \\
        --group "10 patients, lr 1e-3" R_seed0.json R_seed1.json R_seed2.json \\
        --group "10 patients, lr 1e-2" ... --out benchmarks/results/lr_sweep/summary.json

For every group: each report's mean foreground Dice and per-class Dice, the mean and standard
deviation over the reports, how many reports have every class above 0.7 (the recipe target of
issue 17) and how many left a class unlearned (Dice below 0.1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

from napari_jras.core.provenance import provenance, script_command, write_report  # noqa: E402

LEARNED = 0.7
UNLEARNED = 0.1


def summarise(reports: list[Path]) -> dict:
    """Per-report and over-report Dice of one group."""
    runs = []
    for path in reports:
        summary = json.loads(path.read_text())["summary"]
        runs.append({"report": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                     "dice": round(summary["mean"]["dice"]["mean"], 4),
                     "per_class": {c: round(v["dice"]["mean"], 4)
                                   for c, v in summary["per_class"].items()}})
    means = [r["dice"] for r in runs]
    return {"runs": runs, "mean": round(float(np.mean(means)), 4),
            "sd": round(float(np.std(means, ddof=1)), 4) if len(means) > 1 else None,
            f"every_class_above_{LEARNED}": sum(min(r["per_class"].values()) > LEARNED
                                                 for r in runs),
            "a_class_unlearned": sum(min(r["per_class"].values()) < UNLEARNED for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True,
                        metavar=("NAME", "REPORT"), help="a group's name, then its reports")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    groups = {}
    for name, *reports in args.group:
        if not reports:
            parser.error(f"group {name!r} has no report")
        groups[name] = summarise([Path(r).resolve() for r in reports])
        print(f"{name}: {groups[name]['mean']} ({[r['dice'] for r in groups[name]['runs']]})")
    write_report(args.out, {"groups": groups,
                            "provenance": provenance(command=script_command(__file__, argv))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
