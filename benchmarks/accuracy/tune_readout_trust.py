"""Tune ``readout_trust`` on held-out ACDC training patients, never on ``acdc/val``.

Usage (from the repository root)::

    python benchmarks/accuracy/tune_readout_trust.py --runs RUN [RUN ...] \
        --exclude TRAIN_SUBSET [TRAIN_SUBSET ...] --out benchmarks/results/fusion_study/p4_trust/tune.json

``readout_trust`` is how much the readout's propagated mask counts, against the network's
probabilities, for a slice guided by accepted slices of its own volume
(:func:`napari_jras.core.readout.trust_readout`). This draws ``--patients`` patients (``--seed``)
from ``acdc/train`` that no run was trained on (``--exclude``: the runs' training folders),
predicts each of their volumes with ``--guide-source neighbour`` (the ground truth of slices
z +- 1, what an annotator's accepted neighbours give) at every ``--trust`` value, and writes the
mean foreground Dice per run and value, and the value with the best mean over the runs.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

from napari_jras.core.engine import load_engine  # noqa: E402
from napari_jras.core.io import find_cases  # noqa: E402
from napari_jras.core.provenance import provenance, script_command, write_report  # noqa: E402
from napari_jras.core.trust_tuning import TRUST_GRID, best_trust, neighbour_dice  # noqa: E402


def held_out(train: Path, exclude: list[Path], n_patients: int, seed: int) -> list:
    """Cases of ``n_patients`` patients of ``train`` drawn with ``seed`` from those in no
    ``exclude`` folder."""
    used = {c.patient_id for folder in exclude for c in find_cases(folder)}
    cases = find_cases(train)
    free = sorted({c.patient_id for c in cases} - used)
    chosen = set(random.Random(seed).sample(free, n_patients))
    return [c for c in cases if c.patient_id in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--exclude", type=Path, nargs="+", required=True,
                        help="the runs' training folders: their patients are never drawn")
    parser.add_argument("--train", type=Path, default=REPO.parent / "shared/data/acdc/train")
    parser.add_argument("--patients", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust", type=float, nargs="+", default=list(TRUST_GRID))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cases = held_out(args.train, args.exclude, args.patients, args.seed)
    dice: dict[str, dict[str, float]] = {}
    for run in args.runs:
        scores, _ = neighbour_dice(load_engine(run, device="cpu"), cases, args.trust)
        dice[str(run)] = {str(t): round(d, 4) for t, d in scores.items()}
        print(f"{run.name}: {dice[str(run)]}", flush=True)
    mean = {str(t): round(float(np.mean([d[str(t)] for d in dice.values()])), 4)
            for t in args.trust}
    best = best_trust({float(t): mean[str(t)] for t in args.trust})
    report = {"what": "mean foreground Dice with --guide-source neighbour per readout_trust, on "
                      "ACDC training patients none of the runs was trained on",
              "patients": sorted({c.patient_id for c in cases}), "dice": dice,
              "mean_over_runs": mean, "best": best,
              "provenance": provenance(data=args.train, cases=cases,
                                       command=script_command(__file__, argv))}
    print(f"best trust {best} (mean {mean[str(best)]:.4f})")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
