"""Accuracy of J-RAS vs the same backbone without retrieval, on ACDC, BUSI and COVID CT.

Usage (from the repository root)::

    python benchmarks/accuracy/run_accuracy.py --budget cpu --out benchmarks/results/accuracy_cpu
    python benchmarks/accuracy/run_accuracy.py --budget gpu --out benchmarks/results/accuracy_gpu
    python benchmarks/accuracy/run_accuracy.py --budget cpu --only acdc:unet --ablations

Every run is a real ``napari-jras train`` followed by ``napari-jras evaluate`` (the exact
command lines are recorded in the report), J-RAS and baseline with identical settings and
seeds. Splits: ACDC train / val as shipped (patient-level); BUSI and COVID CT have no patient
ids, so their images are first grouped into pseudo-patients of near-duplicates
(``napari_jras.core.duplicates``: 64 px thumbnails correlating >= 0.95) and split by group
(split seed 0, 80/20 of the images, BUSI stratified by benign / malignant) into symlink folders
under ``<work>/splits`` with a ``split.json`` manifest; their training runs use
``--group-duplicates`` and ``evaluate`` excludes near-duplicates (its default for such data).

``--seeds 0,1,2`` trains every run once per seed. Comparisons are paired by patient (ACDC: the
mean of the two frames; BUSI / COVID CT: the duplicate group), averaged over seeds, with a
Wilcoxon test, Holm's correction across each table and a bootstrap 95 % CI of the difference
(``benchmarks/report_stats.py``); better / worse is claimed only with >= 3 seeds.

``--budget cpu-litemedsam`` compares LiteMedSAM (``--backbone litemedsam``, encoder frozen)
with and without retrieval: 256 px, no augmentation, so each slice is encoded once into
``<work>/embedding_cache`` (``$NAPARI_JRAS_EMBEDDING_CACHE``), ACDC on 4 of its patients.

Run folders go to ``<work>/runs/<budget>-<steps>steps-seed<N>``. A finished run is reused only
when its recorded train and evaluate commands are the current ones and its report carries
provenance; any other run in the folder is replaced (``train --overwrite``), and an interrupted
one resumes only with identical settings (``train`` checks them). Writes ``accuracy.json`` (with
provenance and every per-case result), ``accuracy.md`` and plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from fusion_study import subset  # noqa: E402
from report_stats import MIN_SEEDS, holm, mean_sd, paired, unit_means, verdict  # noqa: E402

from napari_jras.core.backbones.embedding_cache import FOLDER_ENV  # noqa: E402
from napari_jras.core.duplicates import THRESHOLD, duplicate_groups  # noqa: E402
from napari_jras.core.io import find_cases, read_volume  # noqa: E402
from napari_jras.core.provenance import provenance  # noqa: E402

DATA = REPO.parent / "shared" / "data"
WORK = REPO / "benchmarks" / "_work"
GROUPED = ("busi", "covid")  # 2-D datasets without patient ids: near-duplicates grouped
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
    # LiteMedSAM (pretrained, image encoder frozen) fine-tuned as MedSAM is: its own 256 px input,
    # no augmentation (each slice's embedding is computed once, benchmarks/_work/embedding_cache),
    # AdamW at 1e-4; ACDC on 4 training patients (the label-efficient case; a CPU budget)
    "cpu-litemedsam": {"size": 256, "steps": 200, "batch_size": 2, "backbones": {
        "litemedsam": {},
    }, "retriever": {"width": 8, "input_size": 64}, "embed_dim": 64,
        "train_flags": ["--no-augment", "--lr", "1e-4"], "acdc_patients": 4},
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


def split_by_group(name: str, data: Path, work: Path, seed: int = 0,
                   val_fraction: float = 0.2) -> tuple[Path, Path, dict[str, str]]:
    """Train / val symlink folders of a 2-D dataset split by near-duplicate group.

    Groups (pseudo-patients) are shuffled with ``seed`` and taken into val until it holds
    ``val_fraction`` of the images of their class folder (BUSI: benign / malignant, by the
    folder of the group's first image), so no group spans both sides. Returns the folders and
    the group of every case. The folders are rebuilt whenever ``split.json`` differs.
    """
    source = {"busi": data / "busi", "covid": data / "covid_ct" / "train"}[name]
    folders = sorted(p for p in source.iterdir() if p.is_dir()) or [source]
    cases = {c.case_id: (folder, c) for folder in folders for c in find_cases(folder)}
    names = sorted(cases)
    groups = duplicate_groups(names, [read_volume(cases[n][1].image_path).data for n in names])
    members: dict[str, list[str]] = {}
    for case in names:
        members.setdefault(groups[case], []).append(case)
    split: dict[str, list[str]] = {"train": [], "val": []}
    for folder in folders:
        roots = sorted(g for g in members if cases[g][0] == folder)
        random.Random(seed).shuffle(roots)
        target = max(1, round(sum(len(members[g]) for g in roots) * val_fraction))
        taken = 0
        for g in roots:
            part = "val" if taken < target else "train"
            taken += len(members[g]) if part == "val" else 0
            split[part] += members[g]
    manifest = {"dataset": name, "seed": seed, "val_fraction": val_fraction,
                "duplicate_threshold": THRESHOLD, "groups": groups,
                "train": sorted(split["train"]), "val": sorted(split["val"])}
    root = work / "splits" / f"{name}-grouped-seed{seed}"
    if not (root / "split.json").is_file() or json.loads((root / "split.json").read_text()) != manifest:
        shutil.rmtree(root, ignore_errors=True)
        for part in ("train", "val"):
            (root / part).mkdir(parents=True)
            for case in manifest[part]:
                c = cases[case][1]
                for path in (c.image_path, c.label_path):
                    (root / part / path.name).symlink_to(path.resolve())
        (root / "split.json").write_text(json.dumps(manifest, indent=1))
    return root / "train", root / "val", groups


def dataset_folders(name: str, data: Path, work: Path,
                    acdc_patients: int | None = None) -> tuple[Path, Path, dict[str, str]]:
    """(train, val) folders of a dataset and the unit (patient / group) of each case id;
    ``acdc_patients``: train ACDC on that many of its patients (drawn with seed 0)."""
    if name == "acdc":
        train = data / "acdc" / "train"
        if acdc_patients:
            train = subset(train, acdc_patients, 0, work / "splits")
        return train, data / "acdc" / "val", {}
    return split_by_group(name, data, work)


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
                       extra: list[str], tag: str, seed: int, folders: tuple[Path, Path]) -> dict:
    """One train + evaluate pair; returns the evaluation report plus commands and timings."""
    train_dir, val_dir = folders
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
    ] + budget.get("train_flags", []) + (["--no-retrieval"] if mode == "baseline" else []) \
        + extra \
        + (["--group-duplicates"] if dataset in GROUPED else [])
    eval_cmd = cli + ["evaluate", "--model", str(out), "--data", str(val_dir),
                      "--report", str(report), "--quiet"]
    log = runs / f"{out.name}.log"
    record_file = out / "benchmark.json"
    if record_file.is_file() and report.is_file():
        record = json.loads(record_file.read_text())
        if (record.get("train_command") == display(train_cmd)
                and record.get("evaluate_command") == display(eval_cmd)
                and "provenance" in record.get("report", {})):
            return record
        train_cmd.append("--overwrite")  # another run under this name: never reused
    print(f"  {out.name} ...", flush=True)
    train_s = run(train_cmd, log)
    eval_s = run(eval_cmd, log)
    result = {"dataset": dataset, "backbone": backbone, "mode": mode, "tag": tag, "seed": seed,
              "train_command": display([c for c in train_cmd if c != "--overwrite"]),
              "evaluate_command": display(eval_cmd),
              "train_s": train_s, "evaluate_s": eval_s,
              "report": json.loads(report.read_text()),
              "log": [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]}
    record_file.write_text(json.dumps(result))
    return result


def display(cmd: list[str]) -> str:
    """A command as a user would type it (``napari-jras`` instead of the interpreter path)."""
    text = shlex.join(["napari-jras"] + cmd[3:])
    return text.replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")


def unit_dice(result: dict, units: dict[str, str]) -> dict[str, float]:
    """Mean foreground Dice per patient (or duplicate group) of one run."""
    cases = result["report"]["cases"]
    unit_of = {c["case_id"]: units.get(c["case_id"], c["patient_id"]) for c in cases}
    return unit_means({c["case_id"]: c["mean"]["dice"] for c in cases}, unit_of)


def compare(jras: list[dict], base: list[dict], units: dict[str, str]) -> dict:
    """Paired comparison by patient, seed by seed (Holm-adjusted later, across the table)."""
    cmp = paired([unit_dice(r, units) for r in jras], [unit_dice(r, units) for r in base])
    return {"n_units": cmp["n_units"], "n_seeds": cmp["n_seeds"], "mean_diff": cmp["mean_diff"],
            "ci95": cmp["ci95"], "wilcoxon_p": cmp["wilcoxon_p"],
            "jras_better_units": cmp["a_better_units"]}


def summary(results: list[dict]) -> dict:
    """Mean +- std over cases of Dice / HD95 / HD (first seed), overall and per class, the
    missing-class counts, and the mean Dice per seed with its mean +- sd over seeds."""
    s = results[0]["report"]["summary"]
    per_seed = [r["report"]["summary"]["mean"]["dice"]["mean"] for r in results]
    mean, sd = mean_sd(per_seed)
    return {"mean": s["mean"], "per_class": s["per_class"], "units": s["units"],
            "n_missing": s.get("n_missing"), "seeds": [r["seed"] for r in results],
            "dice_per_seed": per_seed, "dice_over_seeds": {"mean": mean, "sd": sd}}


def adjust(comparisons: list[dict], n_seeds: int) -> None:
    """Holm-adjust the p-values of one table in place and add each verdict."""
    for cmp, p in zip(comparisons, holm([c["wilcoxon_p"] for c in comparisons]), strict=True):
        cmp["p_holm"] = p
        cmp["verdict"] = verdict(cmp, n_seeds, p)


def fmt(stat: dict) -> str:
    """``mean +- std``; ``n/a`` where no case had the class in either mask (no distance)."""
    if stat["mean"] is None or stat["mean"] != stat["mean"]:
        return "n/a"
    return f"{stat['mean']:.4f} +- {stat['std']:.4f}"


def fmt_dice(summary: dict) -> str:
    """Mean Dice: +- sd over seeds with several seeds, else +- std over cases."""
    over = summary["dice_over_seeds"]
    if over["sd"] is None:
        return fmt(summary["mean"]["dice"])
    return f"{over['mean']:.4f} +- {over['sd']:.4f}"


def fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def fmt_cmp(cmp: dict) -> str:
    """Difference and its bootstrap 95 % CI."""
    lo, hi = cmp["ci95"]
    return f"{cmp['mean_diff']:+.4f} [{lo:+.3f}, {hi:+.3f}]"


def write_report(result: dict, out: Path) -> None:
    """accuracy.md, accuracy.png, ablations.png and training_curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["budget"]
    seeds = result["seeds"]
    spread = ("mean +- sd over seeds" if len(seeds) > 1 else "mean +- std over cases")
    lines = ["# Accuracy: J-RAS vs the same backbone without retrieval", "",
             f"Budget `{result['budget_name']}`: size {b['size']}, {b['steps']} steps, batch "
             f"{b['batch_size']}, seeds {', '.join(map(str, seeds))}. Machine: "
             f"`{json.dumps(result['machine'])}`. Train + evaluate time of all runs "
             f"{result['runs_s'] / 60:.1f} min (this call: {result['wall_s'] / 60:.1f} min; "
             "finished runs are reused).", "",
             f"Command: `{result['command']}`; code `{result['provenance']['git']}`.", "",
             f"Dice: {spread}. Differences: J-RAS - baseline per patient (ACDC: mean of the two "
             "frames; BUSI / COVID CT: near-duplicate group), paired seed by seed and averaged, "
             "with a bootstrap 95 % CI (two-level over seeds and patients with several seeds); "
             "Wilcoxon p over the seed-averaged patient differences, Holm-adjusted across the "
             f"table; a verdict needs >= {MIN_SEEDS} seeds, Holm p < 0.05 and a CI clear of 0. Missing: class instances present in exactly "
             "one of prediction and ground truth (their HD95 is the image diagonal).", "",
             "| dataset | backbone | baseline Dice | J-RAS Dice | J-RAS - baseline [95 % CI] "
             "| Wilcoxon p | Holm p | verdict | patients J-RAS better | baseline HD95 | J-RAS HD95 "
             "| missing (baseline / J-RAS) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for pair in result["pairs"]:
        base, jras, cmp = pair["baseline"], pair["jras"], pair["comparison"]
        lines.append(
            f"| {pair['dataset']} | {pair['backbone']} | {fmt_dice(base)} | {fmt_dice(jras)} | "
            f"{fmt_cmp(cmp)} | {fmt_p(cmp['wilcoxon_p'])} | {fmt_p(cmp['p_holm'])} | "
            f"{cmp['verdict']} | {cmp['jras_better_units']}/{cmp['n_units']} | "
            f"{fmt(base['mean']['hd95'])} | {fmt(jras['mean']['hd95'])} | "
            f"{base['n_missing']} / {jras['n_missing']} |")
    lines += ["", f"Published anchor (ACDC, SegFormer, paper budget): baseline "
              f"{PUBLISHED['baseline']} -> J-RAS {PUBLISHED['jras']} Dice.", "",
              "## Per class (Dice, HD95, HD; mean +- std over cases, first seed; "
              f"{result['pairs'][0]['jras']['units'] if result['pairs'] else 'pixels'})", "",
              "| dataset | backbone | mode | class | Dice | HD95 | HD | missing |",
              "|---|---|---|---|---|---|---|---|"]
    for pair in result["pairs"]:
        for mode in ("baseline", "jras"):
            for cls, stats in pair[mode]["per_class"].items():
                lines.append(f"| {pair['dataset']} | {pair['backbone']} | {mode} | {cls} | "
                             f"{fmt(stats['dice'])} | {fmt(stats['hd95'])} | {fmt(stats['hd'])} "
                             f"| {stats.get('n_missing', '-')} |")
    if result["ablations"]:
        lines += ["", "## Ablations (ACDC, U-Net, J-RAS; differences vs the baseline)", "",
                  "| variant | Dice | vs baseline [95 % CI] | Wilcoxon p | Holm p | verdict |",
                  "|---|---|---|---|---|---|"]
        for ab in result["ablations"]:
            cmp = ab["comparison"]
            lines.append(f"| {ab['variant']} | {fmt_dice(ab['summary'])} | {fmt_cmp(cmp)} | "
                         f"{fmt_p(cmp['wilcoxon_p'])} | {fmt_p(cmp['p_holm'])} | "
                         f"{cmp['verdict']} |")
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
        for ax, pair in zip(axes[0], pairs, strict=True):
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
    parser.add_argument("--size", type=int, help="override the budget's image size")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--work", type=Path, default=WORK, help="splits and run folders")
    args = parser.parse_args(argv)
    budget = json.loads(json.dumps(BUDGETS[args.budget]))
    if args.steps:
        budget["steps"] = args.steps
    if args.size:
        budget["size"] = args.size
        for options in budget["backbones"].values():
            for key in ("img_size", "image_size"):
                if key in options:
                    options[key] = args.size
    seeds = [int(v) for v in args.seeds.split(",")]
    pairs = ([tuple(p.split(":")) for p in args.only.split(",")] if args.only else
             [(d, b) for d in args.datasets.split(",") for b in args.backbones.split(",")])
    for dataset, backbone in pairs:
        if dataset not in DATASETS or backbone not in budget["backbones"]:
            parser.error(f"unknown dataset or backbone: {dataset}:{backbone}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    os.environ.setdefault(FOLDER_ENV, str(args.work / "embedding_cache"))  # LiteMedSAM runs
    folders = {d: dataset_folders(d, args.data, args.work, budget.get("acdc_patients"))
               for d in {d for d, _ in pairs} | ({"acdc"} if args.ablations else set())}
    splits = {d: {"train": str(f[0]), "val": str(f[1]),
                  "groups": len(set(f[2].values())) if f[2] else None} for d, f in folders.items()}
    result = {"budget_name": args.budget, "budget": budget, "seeds": seeds,
              "command": "python benchmarks/accuracy/run_accuracy.py " + " ".join(sys.argv[1:]),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": platform.machine(), "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else None},
              "provenance": provenance(data=args.data, splits=splits),
              "pairs": [], "ablations": []}

    def runs_of(dataset: str, backbone: str, mode: str, flags: list[str], tag: str) -> list[dict]:
        done = []
        for seed in seeds:
            runs = args.work / "runs" / f"{args.budget}-{budget['steps']}steps-seed{seed}"
            runs.mkdir(parents=True, exist_ok=True)
            done.append(train_and_evaluate(dataset, backbone, mode, budget, runs, flags, tag,
                                           seed, folders[dataset][:2]))
        return done

    timed_runs: list[dict] = []
    for dataset, backbone in pairs:
        done = {m: runs_of(dataset, backbone, m, [], m) for m in ("baseline", "jras")}
        timed_runs += done["baseline"] + done["jras"]
        result["pairs"].append({
            "dataset": dataset, "backbone": backbone,
            "baseline": summary(done["baseline"]), "jras": summary(done["jras"]),
            "comparison": compare(done["jras"], done["baseline"], folders[dataset][2]),
            "commands": {m: {"train": r[0]["train_command"], "evaluate": r[0]["evaluate_command"]}
                         for m, r in done.items()},
            "train_s": {m: [x["train_s"] for x in r] for m, r in done.items()},
            "log": {m: r[0]["log"] for m, r in done.items()},
            "reports": {m: [x["report"] for x in r] for m, r in done.items()},
        })
        print(f"{dataset} {backbone}: baseline {fmt_dice(result['pairs'][-1]['baseline'])}"
              f"  J-RAS {fmt_dice(result['pairs'][-1]['jras'])}", flush=True)
    adjust([p["comparison"] for p in result["pairs"]], len(seeds))
    if args.ablations:
        base = runs_of("acdc", "unet", "baseline", [], "baseline")
        for variant, flags in {"default (K=2, tau=0.1, joint, dropout 0.5, centred)": [],
                               **ABLATIONS}.items():
            tag = "jras" if not flags else "jras-" + re.sub(r"[^A-Za-z0-9.]+", "_", variant)
            ab = runs_of("acdc", "unet", "jras", flags, tag)
            timed_runs += ab
            result["ablations"].append({"variant": variant, "summary": summary(ab),
                                        "comparison": compare(ab, base, {}),
                                        "command": ab[0]["train_command"],
                                        "reports": [x["report"] for x in ab]})
            print(f"ablation {variant}: {fmt_dice(result['ablations'][-1]['summary'])}",
                  flush=True)
        adjust([a["comparison"] for a in result["ablations"]], len(seeds))
    result["wall_s"] = time.perf_counter() - t0
    used = {(r["train_command"], r["seed"]): r["train_s"] + r["evaluate_s"] for r in timed_runs}
    result["runs_s"] = sum(used.values())
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    print(f"wrote {args.out}/accuracy.json, accuracy.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
