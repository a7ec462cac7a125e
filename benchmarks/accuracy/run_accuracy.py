"""Accuracy of J-RAS vs the same backbone without retrieval, on ACDC, BUSI and COVID CT.

Usage (from the repository root)::

    python benchmarks/accuracy/run_accuracy.py --budget cpu --out benchmarks/results/accuracy_cpu
    python benchmarks/accuracy/run_accuracy.py --budget gpu --out benchmarks/results/accuracy_gpu
    python benchmarks/accuracy/run_accuracy.py --budget cpu --only acdc:unet --ablations

Every run is a real ``napari-jras train`` followed by ``napari-jras evaluate`` (the exact
command lines are recorded in the report), J-RAS and baseline with identical settings and
seeds. Splits: ACDC train / val as shipped (patient-level); BUSI and COVID CT are split by
image (seeded, 80/20, BUSI stratified by benign / malignant) into symlink folders under
``benchmarks/_work/splits``. Run folders go to ``benchmarks/_work/runs/<budget>-<steps>-<seed>``
(finished pairs are reused, so an interrupted benchmark continues where it stopped). Writes ``accuracy.json``,
``accuracy.md`` and plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import wilcoxon

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
WORK = REPO / "benchmarks" / "_work"
PUBLISHED = {"dataset": "acdc", "backbone": "segformer", "baseline": 0.8708, "jras": 0.9115}

DATASETS = {  # name: class names (background first)
    "acdc": "background,RV,myocardium,LV",
    "busi": "background,lesion",
    "covid": "background,ground-glass,consolidation",
}
BUDGETS = {
    # small sizes and few steps: the whole CPU budget runs in under an hour on 2 cores
    "cpu": {"size": 96, "steps": 500, "batch_size": 8, "backbones": {
        "unet": {"base_channels": 8},
        "transunet": {"base_channels": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 2,
                      "img_size": 96},
        "segformer": {"variant": "b0"},
        "sam": {"variant": "tiny", "image_size": 96},
    }, "retriever": {"width": 8, "input_size": 64}, "embed_dim": 64},
    # paper-like: 256 px, a full schedule; for a GPU machine
    "gpu": {"size": 256, "steps": 8000, "batch_size": 16, "backbones": {
        "unet": {"base_channels": 32},
        "transunet": {"base_channels": 32, "hidden_size": 384, "num_layers": 8, "num_heads": 6,
                      "img_size": 256},
        "segformer": {"variant": "b2"},
        "sam": {"variant": "vit_b", "image_size": 1024},  # SAM's own input size
    }, "retriever": {"width": 32, "input_size": 128}, "embed_dim": 128},
}
ABLATIONS = {  # name: extra train flags (ACDC, U-Net, J-RAS)
    "K=1": ["--k", "1"], "K=4": ["--k", "4"], "K=8": ["--k", "8"],
    "tau=0.03": ["--tau", "0.03"], "tau=0.5": ["--tau", "0.5"],
    "no contrastive step": ["--contrastive-every", "0"],
    "frozen retriever": ["--freeze-retriever"],
    "no guide dropout": ["--guide-dropout", "0"],
    "no centring": ["--retriever-options", '{"width": 8, "input_size": 64, "center": false}'],
    "neighbour guides 0.3, dropout 0.3": ["--guide-dropout", "0.3", "--neighbour-guides", "0.3"],
    "before this version (no dropout, no centring)": [
        "--guide-dropout", "0", "--retriever-options",
        '{"width": 8, "input_size": 64, "center": false}'],
}


def split_by_image(name: str, seed: int = 0, val_fraction: float = 0.2) -> tuple[Path, Path]:
    """Symlink train/val folders for a dataset split by image (BUSI stratified by class)."""
    source = {"busi": DATA / "busi", "covid": DATA / "covid_ct" / "train"}[name]
    root = WORK / "splits" / name
    if (root / "val").is_dir():
        return root / "train", root / "val"
    groups = sorted(p for p in source.iterdir() if p.is_dir()) or [source]
    for group in groups:
        stems = sorted(p.name[:-len("_image.png")] for p in group.glob("*_image.png"))
        random.Random(seed).shuffle(stems)
        n_val = max(1, round(len(stems) * val_fraction))
        for part, chosen in (("val", stems[:n_val]), ("train", stems[n_val:])):
            (root / part).mkdir(parents=True, exist_ok=True)
            for stem in chosen:
                for kind in ("image", "label"):
                    link = root / part / f"{stem}_{kind}.png"
                    if not link.exists():
                        link.symlink_to(group / f"{stem}_{kind}.png")
    return root / "train", root / "val"


def dataset_folders(name: str) -> tuple[Path, Path]:
    """(train, val) folders of a dataset."""
    if name == "acdc":
        return DATA / "acdc" / "train", DATA / "acdc" / "val"
    return split_by_image(name)


def run(cmd: list[str], log: Path) -> float:
    """Run a CLI command, appending its output to ``log``; returns the wall time."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def train_and_evaluate(dataset: str, backbone: str, mode: str, budget: dict, runs: Path,
                       extra: list[str], tag: str, seed: int) -> dict:
    """One train + evaluate pair; returns the evaluation report plus commands and timings."""
    train_dir, val_dir = dataset_folders(dataset)
    out = runs / f"{dataset}-{backbone}-{tag}"
    report = out / "val_report.json"
    cli = [sys.executable, "-m", "napari_jras.cli"]
    train_cmd = cli + [
        "train", "--data", str(train_dir), "--out", str(out), "--backbone", backbone,
        "--backbone-options", json.dumps(budget["backbones"][backbone]),
        "--size", str(budget["size"]), "--steps", str(budget["steps"]),
        "--batch-size", str(budget["batch_size"]), "--seed", str(seed),
        "--class-names", DATASETS[dataset], "--embed-dim", str(budget["embed_dim"]),
        "--retriever-options", json.dumps(budget["retriever"]), "--quiet",
    ] + (["--no-retrieval"] if mode == "baseline" else []) + extra
    eval_cmd = cli + ["evaluate", "--model", str(out), "--data", str(val_dir),
                      "--report", str(report), "--quiet"]
    log = runs / f"{out.name}.log"
    record_file = out / "benchmark.json"
    if record_file.is_file() and report.is_file():
        return json.loads(record_file.read_text())
    print(f"  {out.name} ...", flush=True)
    train_s = run(train_cmd, log)
    eval_s = run(eval_cmd, log)
    result = {"dataset": dataset, "backbone": backbone, "mode": mode, "tag": tag,
              "train_command": display(train_cmd), "evaluate_command": display(eval_cmd),
              "train_s": train_s, "evaluate_s": eval_s,
              "report": json.loads(report.read_text()),
              "log": [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]}
    record_file.write_text(json.dumps(result))
    return result


def display(cmd: list[str]) -> str:
    """A command as a user would type it (``napari-jras`` instead of the interpreter path)."""
    text = shlex.join(["napari-jras"] + cmd[3:])
    return text.replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")


def case_dice(result: dict) -> dict[str, float]:
    """Mean foreground Dice per case id."""
    return {c["case_id"]: c["mean"]["dice"] for c in result["report"]["cases"]}


def compare(jras: dict, base: dict) -> dict:
    """Mean difference and a paired Wilcoxon signed-rank test over cases."""
    a, b = case_dice(jras), case_dice(base)
    ids = sorted(set(a) & set(b))
    diff = np.array([a[i] - b[i] for i in ids])
    p = float(wilcoxon(diff).pvalue) if len(ids) >= 6 and np.any(diff) else None
    return {"n_cases": len(ids), "mean_diff": float(diff.mean()), "wilcoxon_p": p,
            "jras_better_cases": int((diff > 0).sum())}


def summary(result: dict) -> dict:
    """Mean +- std of Dice / HD95 / HD, overall and per class."""
    s = result["report"]["summary"]
    return {"mean": s["mean"], "per_class": s["per_class"], "units": s["units"]}


def fmt(stat: dict) -> str:
    """``mean +- std``; ``n/a`` where no case had the class in both masks (no distance)."""
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.4f} +- {stat['std']:.4f}"


def write_report(result: dict, out: Path) -> None:
    """accuracy.md, accuracy.png, ablations.png and training_curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["budget"]
    lines = ["# Accuracy: J-RAS vs the same backbone without retrieval", "",
             f"Budget `{result['budget_name']}`: size {b['size']}, {b['steps']} steps, batch "
             f"{b['batch_size']}, seed {result['seed']}. Machine: `{json.dumps(result['machine'])}`."
             f" Train + evaluate time of all runs {result['runs_s'] / 60:.1f} min (this call: "
             f"{result['wall_s'] / 60:.1f} min; finished runs are reused).", "",
             f"Command: `{result['command']}`", "",
             "| dataset | backbone | baseline Dice | J-RAS Dice | J-RAS - baseline | Wilcoxon p "
             "| cases J-RAS better | baseline HD95 | J-RAS HD95 |", "|---|---|---|---|---|---|---|---|---|"]
    for pair in result["pairs"]:
        base, jras, cmp = pair["baseline"], pair["jras"], pair["comparison"]
        p = "-" if cmp["wilcoxon_p"] is None else f"{cmp['wilcoxon_p']:.3g}"
        lines.append(
            f"| {pair['dataset']} | {pair['backbone']} | {fmt(base['mean']['dice'])} | "
            f"{fmt(jras['mean']['dice'])} | {cmp['mean_diff']:+.4f} | {p} | "
            f"{cmp['jras_better_cases']}/{cmp['n_cases']} | {fmt(base['mean']['hd95'])} | "
            f"{fmt(jras['mean']['hd95'])} |")
    lines += ["", f"Published anchor (ACDC, SegFormer, paper budget): baseline "
              f"{PUBLISHED['baseline']} -> J-RAS {PUBLISHED['jras']} Dice.", "",
              "## Per class (Dice, HD95, HD; mean +- std over cases; "
              f"{result['pairs'][0]['jras']['units'] if result['pairs'] else 'pixels'})", "",
              "| dataset | backbone | mode | class | Dice | HD95 | HD |", "|---|---|---|---|---|---|---|"]
    for pair in result["pairs"]:
        for mode in ("baseline", "jras"):
            for cls, stats in pair[mode]["per_class"].items():
                lines.append(f"| {pair['dataset']} | {pair['backbone']} | {mode} | {cls} | "
                             f"{fmt(stats['dice'])} | {fmt(stats['hd95'])} | {fmt(stats['hd'])} |")
    if result["ablations"]:
        lines += ["", "## Ablations (ACDC, U-Net, J-RAS; differences vs the baseline)", "",
                  "| variant | Dice | vs baseline | Wilcoxon p |", "|---|---|---|---|"]
        for ab in result["ablations"]:
            p = "-" if ab["comparison"]["wilcoxon_p"] is None else f"{ab['comparison']['wilcoxon_p']:.3g}"
            lines.append(f"| {ab['variant']} | {fmt(ab['summary']['mean']['dice'])} | "
                         f"{ab['comparison']['mean_diff']:+.4f} | {p} |")
    lines += ["", "## Commands", ""]
    for pair in result["pairs"]:
        for mode in ("baseline", "jras"):
            lines += [f"- `{pair['commands'][mode]['train']}`",
                      f"  then `{pair['commands'][mode]['evaluate']}`"]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")

    pairs = result["pairs"]
    if pairs:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(pairs)), 3.8))
        x = np.arange(len(pairs))
        for offset, mode, colour in ((-0.2, "baseline", "#999999"), (0.2, "jras", "#d95f02")):
            ax.bar(x + offset, [p[mode]["mean"]["dice"]["mean"] for p in pairs], 0.4,
                   yerr=[p[mode]["mean"]["dice"]["std"] for p in pairs], capsize=3,
                   color=colour, label="J-RAS" if mode == "jras" else "baseline")
        ax.set_xticks(x, [f"{p['dataset']}\n{p['backbone']}" for p in pairs])
        ax.set(ylabel="mean Dice (val)", ylim=(0, 1), title=f"{result['budget_name']} budget")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)
        plt.close(fig)
        fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3), squeeze=False)
        for ax, pair in zip(axes[0], pairs):
            for mode in ("baseline", "jras"):
                steps = [r["step"] for r in pair["log"][mode] if r.get("phase") == "train"]
                loss = [r["loss"] for r in pair["log"][mode] if r.get("phase") == "train"]
                ax.plot(steps, loss, label=mode)
            ax.set(title=f"{pair['dataset']} {pair['backbone']}", xlabel="step")
        axes[0][0].set_ylabel("training loss (Dice + CE)")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110)
        plt.close(fig)
    if result["ablations"]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [a["variant"] for a in result["ablations"]]
        ax.barh(names, [a["summary"]["mean"]["dice"]["mean"] for a in result["ablations"]],
                color="#7570b3")
        ax.set(xlabel="mean Dice (ACDC val)", title="Ablations (U-Net)")
        fig.tight_layout()
        fig.savefig(out / "ablations.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", default="acdc,busi,covid")
    parser.add_argument("--backbones", default="unet,transunet,segformer,sam")
    parser.add_argument("--only", help="comma-separated dataset:backbone pairs")
    parser.add_argument("--ablations", action="store_true", help="also the ACDC U-Net ablations")
    parser.add_argument("--steps", type=int, help="override the budget's steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    budget = dict(BUDGETS[args.budget])
    if args.steps:
        budget["steps"] = args.steps
    pairs = ([tuple(p.split(":")) for p in args.only.split(",")] if args.only else
             [(d, b) for d in args.datasets.split(",") for b in args.backbones.split(",")])
    for dataset, backbone in pairs:
        if dataset not in DATASETS or backbone not in budget["backbones"]:
            parser.error(f"unknown dataset or backbone: {dataset}:{backbone}")
    runs = WORK / "runs" / f"{args.budget}-{budget['steps']}steps-seed{args.seed}"
    runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"budget_name": args.budget, "budget": budget, "seed": args.seed,
              "command": "python benchmarks/accuracy/run_accuracy.py " + " ".join(sys.argv[1:]),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": platform.machine(), "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None},
              "pairs": [], "ablations": []}
    base_acdc_unet = None
    timed_runs: list[dict] = []
    for dataset, backbone in pairs:
        done = {m: train_and_evaluate(dataset, backbone, m, budget, runs,
                                      [], m, args.seed) for m in ("baseline", "jras")}
        timed_runs += done.values()
        if (dataset, backbone) == ("acdc", "unet"):
            base_acdc_unet = done["baseline"]
        result["pairs"].append({
            "dataset": dataset, "backbone": backbone,
            "baseline": summary(done["baseline"]), "jras": summary(done["jras"]),
            "comparison": compare(done["jras"], done["baseline"]),
            "commands": {m: {"train": r["train_command"], "evaluate": r["evaluate_command"]}
                         for m, r in done.items()},
            "train_s": {m: r["train_s"] for m, r in done.items()},
            "log": {m: r["log"] for m, r in done.items()},
        })
        print(f"{dataset} {backbone}: baseline {done['baseline']['report']['summary']['mean']['dice']['mean']:.4f}"
              f"  J-RAS {done['jras']['report']['summary']['mean']['dice']['mean']:.4f}", flush=True)
    if args.ablations:
        if base_acdc_unet is None:
            base_acdc_unet = train_and_evaluate("acdc", "unet", "baseline", budget, runs, [],
                                                "baseline", args.seed)
        for variant, flags in {"default (K=2, tau=0.1, joint, dropout 0.5, centred)": [],
                               **ABLATIONS}.items():
            tag = "jras" if not flags else "jras-" + re.sub(r"[^A-Za-z0-9.]+", "_", variant)
            ab = train_and_evaluate("acdc", "unet", "jras", budget, runs, flags, tag, args.seed)
            timed_runs.append(ab)
            result["ablations"].append({"variant": variant, "summary": summary(ab),
                                        "comparison": compare(ab, base_acdc_unet),
                                        "command": ab["train_command"]})
            print(f"ablation {variant}: {ab['report']['summary']['mean']['dice']['mean']:.4f}",
                  flush=True)
    result["wall_s"] = time.perf_counter() - t0
    used = {r["train_command"]: r["train_s"] + r["evaluate_s"] for r in timed_runs}
    result["runs_s"] = sum(used.values())
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    print(f"wrote {args.out}/accuracy.json, accuracy.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
