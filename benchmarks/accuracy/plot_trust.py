"""Plot what each guide source gives a readout model at 4 and 10 training patients.

Usage (from the repository root)::

    python benchmarks/accuracy/plot_trust.py --out benchmarks/results/fusion_study/trust.png

Reads the committed evaluate reports of ``fusion_study/p4_trust`` and ``fusion_study/p10``
(per seed: baseline, readout with retrieved exemplars, with the accepted neighbour at trust 0
and at 0.75, the readout's mask alone) and the copy-the-neighbour line of their stats files, and
draws the mean over seeds with each seed as a dot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fusion_study"
# label -> report name pattern per training-set size ({n}: patients, {s}: seed)
BARS = {
    "baseline": {4: "baseline_{n}p_seed{s}_retrieved", 10: "baseline_{n}p_seed{s}_retrieved"},
    "retrieved": {4: "readout_{n}p_seed{s}_retrieved", 10: "readout_{n}p_seed{s}_retrieved"},
    "neighbour,\ntrust 0": {4: "readout_{n}p_seed{s}_neighbour",
                            10: "readout-trust0_{n}p_seed{s}_neighbour"},
    "readout's\nmask alone": {4: "readout_{n}p_seed{s}_neighbour_readout",
                              10: "readout_{n}p_seed{s}_neighbour_readout"},
    "neighbour,\ntrust 0.75": {4: "readout-trust_{n}p_seed{s}_neighbour",
                               10: "readout_{n}p_seed{s}_neighbour"},
}
FOLDERS = {4: RESULTS / "p4_trust", 10: RESULTS / "p10"}


def dice(path: Path) -> float:
    """Mean foreground Dice of an evaluate report."""
    return json.loads(path.read_text())["summary"]["mean"]["dice"]["mean"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (n, folder) in zip(axes, FOLDERS.items(), strict=True):
        for x, (label, names) in enumerate(BARS.items()):
            values = [dice(folder / (names[n].format(n=n, s=s) + ".json")) for s in (0, 1, 2)]
            ax.bar(x, sum(values) / 3, color="#4c72b0" if "0.75" in label else "#a0a0a0")
            ax.scatter([x] * 3, values, color="black", s=10, zorder=3)
        stats = json.loads((folder / "stats_readout.json").read_text())
        copy = stats["means"]["copy_neighbour"]["mean"]
        ax.axhline(copy, color="#c44e52", ls="--", lw=1)
        ax.text(-0.4, copy + 0.01, "copying the neighbour", color="#c44e52", ha="left",
                fontsize=8)
        ax.set_xticks(range(len(BARS)), list(BARS), fontsize=8)
        ax.set_title(f"ACDC, {n} training patients (3 seeds)", fontsize=10)
        ax.set_ylim(0.3, 0.9)
    axes[0].set_ylabel("mean foreground Dice, acdc/val")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
