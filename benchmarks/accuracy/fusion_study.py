"""Does J-RAS use its exemplars? Baseline vs paper mode (concat) vs the readout fusion, by seed,
with few and many training patients, scored per guide source; plus copying the neighbour's mask.

For every (training patients, seed) it trains the requested variants through the CLI on a
patient subset of ``acdc/train`` (patients drawn by the seed), evaluates each on ``acdc/val``
(J-RAS runs with every guide source of ``--sources``), and writes one JSON report per
evaluation plus ``study.json`` (all mean Dice values and the copy-neighbour reference) with
provenance. Runs go to fresh folders named by every setting (never reused by name alone).

Usage (repository root)::

    python benchmarks/accuracy/fusion_study.py --out benchmarks/results/fusion_study \\
        --patients 4 70 --seeds 0 1 2 --variants baseline readout concat --steps 1000

``--workers 2`` trains two runs at a time (one thread each).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from report_fusion_study import copy_neighbour_cases  # noqa: E402
from tune_readout_trust import held_out  # noqa: E402

from napari_jras.core.io import find_cases  # noqa: E402
from napari_jras.core.provenance import git_state, provenance  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "acdc"
VARIANTS = {
    "baseline": ["--no-retrieval"],
    "readout": ["--fusion", "readout"],
    "concat": ["--fusion", "concat"],
}
SOURCES = ("retrieved", "none", "neighbour", "oracle", "random")


def subset(train: Path, n_patients: int, seed: int, work: Path) -> Path:
    """A folder of symlinks to the cases of ``n_patients`` patients drawn with ``seed``."""
    cases = find_cases(train)
    patients = sorted({c.patient_id for c in cases})
    if n_patients < len(patients):
        patients = sorted(random.Random(seed).sample(patients, n_patients))
    return link_cases([c for c in cases if c.patient_id in patients],
                      work / f"train_{n_patients}p_seed{seed}")


def link_cases(cases: list, folder: Path) -> Path:
    """A fresh ``folder`` of symlinks to the image and label files of ``cases``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for case in cases:
        for path in (case.image_path, case.label_path):
            (folder / path.name).symlink_to(path.resolve())
    return folder


def copy_neighbour_dice(val: Path) -> float:
    """Mean over val volumes of :func:`report_fusion_study.copy_neighbour_cases`."""
    values, _ = copy_neighbour_cases(val)
    return float(np.mean(list(values.values())))


def run(cmd: list[str], log: Path) -> None:
    """Run a CLI command with one thread; raise with the log's tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: see {log}")


def job(args: argparse.Namespace, variant: str, n_patients: int, seed: int, train: Path,
        out: Path, work: Path, tune: Path | None = None) -> dict:
    """Train one variant and evaluate it with its guide sources; returns mean Dice per source.

    ``tune``: held-out training patients a readout run chooses its ``readout_trust`` on
    (``train --val``).
    """
    settings = {"size": args.size, "steps": args.steps, "base": args.base_channels, "seed": seed,
                "patients": n_patients, "variant": variant, "extra": args.extra,
                "tune": args.tune_patients, "lr": args.lr}
    tuning = ["--val", str(tune)] if tune is not None and variant == "readout" else []
    lr = ["--lr", str(args.lr)] if args.lr is not None else []
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{variant}_{n_patients}p_seed{seed}"
    run_dir = work / f"{name}_{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = work / f"{name}.log"
    cli = [sys.executable, "-m", "napari_jras.cli"]
    started = time.time()
    run(cli + ["train", "--data", str(train), "--out", str(run_dir), "--backbone", "unet",
               "--backbone-options", json.dumps({"base_channels": args.base_channels}),
               "--size", str(args.size), "--steps", str(args.steps), "--batch-size", "8",
               "--seed", str(seed), "--class-names", "background,RV,myocardium,LV",
               "--k", "2", "--embed-dim", "64", "--retriever-options",
               json.dumps({"width": 8, "input_size": 64}), "--checkpoint-every",
               str(args.steps), "--quiet", *VARIANTS[variant], *lr, *tuning, *args.extra.split()],
        log)
    train_s = time.time() - started
    sources = ["retrieved"] if variant == "baseline" else args.sources
    dice = {}
    for source in sources:
        report = out / f"{name}_{source}.json"
        run(cli + ["evaluate", "--model", str(run_dir), "--data", str(args.data / "val"),
                   "--report", str(report), "--guide-source", source, "--quiet",
                   "--device", "cpu"], log)
        summary = json.loads(report.read_text())["summary"]
        dice[source] = {"mean": summary["mean"]["dice"]["mean"],
                        "per_class": {c: v["dice"]["mean"]
                                      for c, v in summary.get("per_class", {}).items()}}
    trust = (json.loads((run_dir / "config.json").read_text()).get("readout_trust")
             if variant == "readout" else None)
    return {"variant": variant, "patients": n_patients, "seed": seed, "train_s": train_s,
            "dice": dice, "run": run_dir.name, "readout_trust": trust}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/fusion_study")
    parser.add_argument("--patients", type=int, nargs="+", default=[4, 70])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sources", nargs="+", default=["retrieved", "none", "neighbour",
                                                         "oracle"], choices=SOURCES)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--lr", type=float, help="learning rate of every variant (default: "
                                                 "train's)")
    parser.add_argument("--extra", default="", help="more train flags for every J-RAS variant")
    parser.add_argument("--tune-patients", type=int, default=0,
                        help="readout runs choose readout_trust on this many acdc/train "
                             "patients outside their training subset (train --val); 0: never")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA, help="an ACDC folder with train/, val/")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks/_work/fusion_study",
                        help="patient subsets and run folders")
    args = parser.parse_args()
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    jobs = []
    for n in args.patients:
        for seed in args.seeds:
            train = subset(args.data / "train", n, seed, work)
            tune = None
            if args.tune_patients:
                tune = link_cases(held_out(args.data / "train", [train], args.tune_patients,
                                           seed), work / f"tune_{n}p_seed{seed}")
            jobs += [(v, n, seed, train, tune) for v in args.variants]
    results, git = [], git_state()  # the code that runs: read at start
    with cf.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(job, args, v, n, s, t, out, work, h): (v, n, s)
                   for v, n, s, t, h in jobs}
        for future in cf.as_completed(futures):
            result = future.result()
            results.append(result)
            print(json.dumps({k: result[k] for k in ("variant", "patients", "seed")}),
                  {s: round(d["mean"], 4) for s, d in result["dice"].items()}, flush=True)
            study = {"provenance": provenance(
                         data=f"{args.data}/train (patient subsets drawn by seed) -> {args.data}/val",
                         command=" ".join(sys.argv),
                         machine=f"{os.cpu_count()} CPUs, one thread per run", git_at_start=git),
                     "settings": {k: str(v) if isinstance(v, Path) else v
                                  for k, v in vars(args).items()},
                     "copy_neighbour_dice": copy_neighbour_dice(args.data / "val"),
                     "results": sorted(results, key=lambda r: (r["patients"], r["variant"],
                                                               r["seed"]))}
            (out / "study.json").write_text(json.dumps(study, indent=2))


if __name__ == "__main__":
    main()
