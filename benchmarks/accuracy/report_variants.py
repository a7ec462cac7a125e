"""Table and plot of the method variants measured by ``method_variants.sh``.

Usage (from the repository root)::

    python benchmarks/accuracy/report_variants.py benchmarks/results/method_variants

Reads ``<variant>_val.json`` (``napari-jras evaluate`` reports) and ``<variant>_loop_slice.json``
(slice-by-slice annotator simulation) and writes ``variants.md`` and ``variants.png`` there.
Sub-folders ``seed<N>/`` (``SEED=N LOOP=0 bash method_variants.sh OUT/seed<N> VARIANT...``) add
a table of the spread over seeds for the variants measured with every seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VARIANTS = {  # file stem: (label, what differs)
    "baseline": ("baseline", "same U-Net, no retrieval"),
    "jras_before": ("J-RAS as before", "no guide dropout, no centring"),
    "jras_dropout_only": ("+ guide dropout", "guide dropout 0.5, no centring"),
    "jras_default": ("+ dropout + centring (default)", "guide dropout 0.5, centred embeddings"),
    "jras_neighbours": ("+ neighbour guides", "dropout 0.3, neighbour guides 0.3, centred"),
    "jras_aligned": ("+ aligned exemplars", "default + exemplars translated onto the query "
                     "(--align-shift 0.25)"),
}


def main(folder: str) -> int:
    """Write variants.md and variants.png into ``folder``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    rows = []
    for stem, (label, what) in VARIANTS.items():
        mean = json.loads((out / f"{stem}_val.json").read_text())["summary"]["mean"]
        loop_file = out / f"{stem}_loop_slice.json"
        loop = json.loads(loop_file.read_text())["settings"][0] if loop_file.exists() else None
        rows.append((label, what, mean, loop))
    base_loop = rows[0][2]["dice"]["mean"]  # the baseline has no bank: its loop is its Dice
    lines = ["# J-RAS training variants (ACDC val, U-Net, 96 px, 1000 steps, seed 0)", "",
             "Command: `bash benchmarks/accuracy/method_variants.sh`; this table: "
             "`python benchmarks/accuracy/report_variants.py benchmarks/results/method_variants`",
             "", "| variant | what differs | Dice | HD95 px | HD px | slice-by-slice Dice | "
             "corrected pixels | slices retrieving their volume's corrections |",
             "|---|---|---|---|---|---|---|---|"]
    for label, what, mean, loop in rows:
        d, h95, hd = mean["dice"], mean["hd95"], mean["hd"]
        looped = (f"{loop['mean_dice']:.3f} | {loop['total_corrected_pixels']:,} | "
                  f"{loop['own_corrections_retrieved']:.0%}" if loop else
                  f"{base_loop:.3f} (no bank) | - | -")
        lines.append(f"| {label} | {what} | {d['mean']:.3f} +- {d['std']:.3f} | "
                     f"{h95['mean']:.2f} | {hd['mean']:.2f} | {looped} |")
    lines += seed_table(out)
    (out / "variants.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [r[0] for r in rows]
    axes[0].barh(labels, [r[2]["dice"]["mean"] for r in rows], color="#d95f02")
    axes[0].set(xlabel="mean Dice, ACDC val", xlim=(0.6, 0.85))
    axes[0].invert_yaxis()
    axes[1].barh(labels, [r[2]["hd95"]["mean"] for r in rows], color="#7570b3")
    axes[1].set(xlabel="mean HD95 (px), lower is better")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle("J-RAS training variants (U-Net, 96 px, 1000 steps)")
    fig.tight_layout()
    fig.savefig(out / "variants.png", dpi=120)
    print(f"wrote {out}/variants.md, variants.png")
    return 0


def _summary(report: Path) -> dict:
    return json.loads(report.read_text())["summary"]


def _missed_classes(summary: dict) -> str:
    """Classes the model never learned (mean Dice under 0.05), or '-'."""
    missed = [name for name, m in summary["per_class"].items() if m["dice"]["mean"] < 0.05]
    return ", ".join(missed) or "-"


def seed_table(out: Path) -> list[str]:
    """Markdown lines: Dice per seed, mean +- std over seeds, and the difference to the baseline."""
    import numpy as np

    folders = [out, *sorted(out.glob("seed[0-9]*"), key=lambda f: int(f.name[4:]))]
    if len(folders) == 1:
        return []
    seeds = ["0", *(f.name[4:] for f in folders[1:])]
    stems = [s for s in VARIANTS if all((f / f"{s}_val.json").exists() for f in folders)]
    if "baseline" not in stems:
        return []
    summaries = {s: [_summary(f / f"{s}_val.json") for f in folders] for s in stems}
    dice = {s: np.array([m["mean"]["dice"]["mean"] for m in summaries[s]]) for s in stems}
    lines = ["", f"## Spread over seeds {', '.join(seeds)} (no simulation)", "",
             "| variant | Dice per seed | Dice mean +- std | minus baseline, per seed | "
             "classes not learned (Dice < 0.05), per seed |", "|---|---|---|---|---|"]
    for stem in stems:
        d, delta = dice[stem], dice[stem] - dice["baseline"]
        gap = "-" if stem == "baseline" else " / ".join(f"{v:+.3f}" for v in delta)
        missed = " / ".join(_missed_classes(m) for m in summaries[stem])
        lines.append(f"| {VARIANTS[stem][0]} | {' / '.join(f'{v:.3f}' for v in d)} | "
                     f"{d.mean():.3f} +- {d.std(ddof=1):.3f} | {gap} | {missed} |")
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/method_variants"))
