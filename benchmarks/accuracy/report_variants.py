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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report_stats import MIN_SEEDS, holm, paired, unit_means, verdict  # noqa: E402

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
        if not (out / f"{stem}_val.json").exists():
            continue  # a variant not measured (method_variants.sh OUT VARIANT...)
        summary = json.loads((out / f"{stem}_val.json").read_text())["summary"]
        mean = summary["mean"]
        # class instances missing from prediction or truth (HD = image diagonal); '-' in
        # reports written before the missing-class penalty
        missing = summary.get("n_missing", "-")
        loop_file = out / f"{stem}_loop_slice.json"
        loop = json.loads(loop_file.read_text())["settings"][0] if loop_file.exists() else None
        rows.append((label, what, mean, loop, missing))
    base_loop = rows[0][2]["dice"]["mean"]  # the baseline has no bank: its loop is its Dice
    lines = ["# J-RAS training variants (ACDC val, U-Net, 96 px, 1000 steps, seed 0)", "",
             "Command: `bash benchmarks/accuracy/method_variants.sh`; this table: "
             "`python benchmarks/accuracy/report_variants.py benchmarks/results/method_variants`",
             "", "| variant | what differs | Dice | HD95 px | HD px | missing classes | "
             "slice-by-slice Dice | corrected pixels | slices retrieving their volume's "
             "corrections |", "|---|---|---|---|---|---|---|---|---|"]
    for label, what, mean, loop, missing in rows:
        d, h95, hd = mean["dice"], mean["hd95"], mean["hd"]
        looped = (f"{loop['dice']:.3f} | {loop['corrected_pixels']:,} | "
                  f"{loop['own_corrections_retrieved']:.0%}" if loop else
                  f"{base_loop:.3f} (no bank) | - | -")
        lines.append(f"| {label} | {what} | {d['mean']:.3f} +- {d['std']:.3f} | "
                     f"{h95['mean']:.2f} | {hd['mean']:.2f} | {missing} | {looped} |")
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


def _patient_dice(report: dict) -> dict[str, float]:
    """Mean foreground Dice per patient (ACDC: the mean of its two frames)."""
    cases = report["cases"]
    return unit_means({c["case_id"]: c["mean"]["dice"] for c in cases},
                      {c["case_id"]: c["patient_id"] for c in cases})


def seed_table(out: Path) -> list[str]:
    """Markdown lines: Dice per seed, mean +- sd over seeds, and the difference to the baseline.

    The difference is paired by patient (mean of its two frames, then of the seeds), with a
    bootstrap 95 % CI, a Wilcoxon test over patients Holm-adjusted across the table's variants,
    and a verdict only with >= 3 seeds (``benchmarks/report_stats.py``).
    """
    import numpy as np

    folders = [out, *sorted(out.glob("seed[0-9]*"), key=lambda f: int(f.name[4:]))]
    if len(folders) == 1:
        return []
    seeds = ["0", *(f.name[4:] for f in folders[1:])]
    stems = [s for s in VARIANTS if all((f / f"{s}_val.json").exists() for f in folders)]
    if "baseline" not in stems:
        return []
    reports = {s: [json.loads((f / f"{s}_val.json").read_text()) for f in folders] for s in stems}
    summaries = {s: [r["summary"] for r in reports[s]] for s in stems}
    dice = {s: np.array([m["mean"]["dice"]["mean"] for m in summaries[s]]) for s in stems}
    patients = {s: [_patient_dice(r) for r in reports[s]] for s in stems}  # per seed
    cmps = {s: paired(patients[s], patients["baseline"]) for s in stems if s != "baseline"}
    p_holm = dict(zip(cmps, holm([c["wilcoxon_p"] for c in cmps.values()]), strict=True))
    n_patients = len(patients["baseline"][0])
    lines = ["", f"## Spread over seeds {', '.join(seeds)} (no simulation)", "",
             f"Minus baseline, by patient: the mean of each patient's two frames, paired seed by "
             f"seed, averaged over the {len(seeds)} seeds and {n_patients} patients, with a "
             "two-level bootstrap 95 % CI (seeds and patients resampled); Wilcoxon p over the "
             "seed-averaged patient differences, Holm-adjusted across the variants of this "
             f"table; a verdict needs >= {MIN_SEEDS} seeds, Holm p < 0.05 and a CI clear of 0 "
             "(`benchmarks/report_stats.py`).", "",
             "| variant | Dice per seed | Dice mean +- sd | minus baseline, per seed | "
             "minus baseline, by patient [95 % CI] | Wilcoxon p | Holm p | verdict | "
             "classes not learned (Dice < 0.05), per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stem in stems:
        d, delta = dice[stem], dice[stem] - dice["baseline"]
        gap = "-" if stem == "baseline" else " / ".join(f"{v:+.3f}" for v in delta)
        missed = " / ".join(_missed_classes(m) for m in summaries[stem])
        if stem == "baseline":
            stats = "- | - | - | -"
        else:
            c, p = cmps[stem], p_holm[stem]
            stats = (f"{c['mean_diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                     f"{_fmt_p(c['wilcoxon_p'])} | {_fmt_p(p)} | {verdict(c, len(seeds), p)}")
        lines.append(f"| {VARIANTS[stem][0]} | {' / '.join(f'{v:.3f}' for v in d)} | "
                     f"{d.mean():.3f} +- {d.std(ddof=1):.3f} | {gap} | {stats} | {missed} |")
    return lines



def _fmt_p(value: float | None) -> str:
    """A p-value for a table cell ("-" when there is none)."""
    return "-" if value is None else f"{value:.3g}"

if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/method_variants"))
