"""Human in the loop, simulated: does every accepted correction help the next prediction?

Usage (from the repository root)::

    python benchmarks/loop/simulate_annotator.py --jras builtin --baseline runs/base_u16 \
        --data ../shared/data/acdc/val --out benchmarks/results/loop_cpu

An annotator works through the validation volumes in order. For each case the current model
predicts, the annotator "corrects" the prediction by replacing it with the expert mask (the
number of pixels that had to change is recorded), accepts it, and moves on. Settings:

- ``jras-bank``: J-RAS, corrections only go into the exemplar bank (no training);
- ``jras-propagate``: the bank, plus same-volume memory and propagation after every accept
  (see ``napari-jras simulate``, whose logic this script shares: napari_jras.core.simulate);
- ``jras-bank+finetune``: the same, plus a short joint fine-tuning round every N corrections;
- ``baseline+finetune``: the same backbone without retrieval, fine-tuned every N corrections
  on the accepted corrections (it has no bank to learn from otherwise);
- ``jras-static`` / ``baseline-static``: no learning at all (reference lines).

With ``--unit slice`` the annotator works slice by slice inside each volume instead, from its
middle slice outward, as with the assistant's "accept, next slice" (Shift+D, Shift+N): slice z
is predicted with the corrections of the slices before it (same volume) already in the bank,
then corrected and accepted; the Dice of a case is that of its volume put together from these
predictions.
Fine-tuning settings are skipped in that mode (a round per slice is not how anyone works).

Each setting runs in a fresh workspace (temporary home folder), so the shipped model is never
changed. Writes ``loop.json``, ``loop.md`` and ``loop.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from napari_jras.core.io import find_cases
from napari_jras.core.progress import Progress
from napari_jras.core.provenance import provenance
from napari_jras.core.simulate import run_setting
from napari_jras.core.workspace import BUILTIN

SETTINGS = {  # name: (model, simulated setting of napari_jras.core.simulate, fine-tune)
    "jras-static": ("jras", "static", False),
    "jras-bank": ("jras", "bank", False),
    "jras-propagate": ("jras", "propagate", False),
    "jras-bank+finetune": ("jras", "bank", True),
    "baseline-static": ("baseline", "static", False),
    "baseline+finetune": ("baseline", "bank", True),
}


def write_report(result: dict, out: Path) -> None:
    """loop.md and loop.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = result.get("unit", "case")
    lines = ["# Human in the loop (simulated annotator)", "",
             f"Unit of work: {'slice by slice within each volume' if unit == 'slice' else 'case'}.",
             "",
             f"Machine: `{json.dumps(result['machine'])}`", "",
             f"Command: `{result['command']}`", "",
             f"{len(result['settings'][0]['cases'])} validation cases in order; "
             + (f"fine-tuning: {result['finetune_steps']} steps every {result['every']} accepted "
                "cases." if unit == "case" else "no fine-tuning."), "",
             "| setting | mean Dice of the next prediction | corrected pixels per case | "
             "total corrected pixels | fine-tuning time s | slices that retrieved a correction "
             "of their own volume | its fusion weight |", "|---|---|---|---|---|---|---|"]
    for s in result["settings"]:
        own = s.get("own_corrections_retrieved")
        own_text = "- | -" if own is None else f"{own:.0%} | {s['own_corrections_weight']:.2f}"
        lines.append(f"| {s['setting']} | {s['dice']:.4f} +- {s['std_dice']:.4f} | "
                     f"{s['mean_corrected_pixels']:.0f} | {s['corrected_pixels']:,} | "
                     f"{s['finetune_s']:.0f} | {own_text} |")
    lines += ["", "Per case (Dice):", "",
              "| # | case | " + " | ".join(s["setting"] for s in result["settings"]) + " |",
              "|---|---|" + "---|" * len(result["settings"])]
    for i, case in enumerate(result["settings"][0]["cases"]):
        lines.append(f"| {i} | {case['case']} | " + " | ".join(
            f"{s['cases'][i]['dice']:.3f}" for s in result["settings"]) + " |")
    (out / "loop.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in result["settings"]:
        dice = np.array([c["dice"] for c in s["cases"]])
        cum = np.cumsum(dice) / np.arange(1, len(dice) + 1)
        style = "--" if "static" in s["setting"] else "-"
        axes[0].plot(np.arange(len(dice)), cum, style, marker="o", ms=3, label=s["setting"])
        axes[1].plot(np.arange(len(dice)), [c["corrected_pixels"] for c in s["cases"]], style,
                     marker="o", ms=3, label=s["setting"])
    axes[0].set(xlabel="accepted corrections (cases) before this prediction",
                ylabel="running mean Dice", title="Dice of the next prediction")
    axes[1].set(xlabel="case", ylabel="pixels the annotator changed", title="Correction effort")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loop.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jras", default=BUILTIN, help="J-RAS run folder or 'builtin'")
    parser.add_argument("--baseline", help="baseline run folder (same backbone, no retrieval)")
    parser.add_argument("--data", type=Path, required=True, help="labelled cases, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--every", type=int, default=4, help="fine-tune every N accepted cases")
    parser.add_argument("--steps", type=int, default=40, help="steps per fine-tuning round")
    parser.add_argument("--limit", type=int, help="only the first N cases")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--unit", choices=["case", "slice"], default="case",
                        help="accept whole cases, or slice by slice within each volume")
    args = parser.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if args.unit == "slice":
        names = [s for s in names if not SETTINGS[s][2]]  # no fine-tuning per slice
    if args.baseline is None:
        names = [s for s in names if SETTINGS[s][0] != "baseline"]
    cases = find_cases(args.data)[:args.limit]
    args.out.mkdir(parents=True, exist_ok=True)
    settings = []

    def progress(p: Progress) -> None:
        print(f"  {p.stage:20s} {p.detail:22s} Dice {p.metrics['dice']:.3f}  "
              f"corrected {int(p.metrics['corrected']):6d} px", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            kind, setting, finetune = SETTINGS[name]
            source = args.jras if kind == "jras" else args.baseline
            settings.append(run_setting(source, setting, cases, args.unit, Path(tmp),
                                        finetune_every=args.every if finetune else 0,
                                        finetune_steps=args.steps, progress=progress, name=name))
    result = {
        "provenance": provenance(data=args.data, cases=cases, model_dir=args.jras,
                                 device="cpu", baseline=str(args.baseline)),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.machine(), "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "command": "python benchmarks/loop/simulate_annotator.py " + " ".join(sys.argv[1:]),
        "every": args.every, "finetune_steps": args.steps, "unit": args.unit,
        "settings": settings,
    }
    (args.out / "loop.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    print(f"wrote {args.out}/loop.json, loop.md, loop.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
