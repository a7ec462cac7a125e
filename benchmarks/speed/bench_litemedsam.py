"""Cost of J-RAS on LiteMedSAM on this machine: seconds per training step and per predicted slice.

Usage (from the repository root)::

    python benchmarks/speed/bench_litemedsam.py --data ../shared/data/acdc/train \
        --volume ../shared/data/acdc/val/patient101_frame01_image.nii.gz \
        --out benchmarks/results/speed_cpu/litemedsam.json

For each mode (``jras``: retrieval + exemplar prompts; ``baseline``: ``--no-retrieval``, the
whole-image box) a real ``napari-jras train --backbone sam --pretrained litemedsam`` runs in its
own process on ``--data`` (``--steps`` steps, batch ``--batch-size``, ``--threads`` torch
threads, image encoder frozen: the default). Seconds per step = (time of the last step - time of
the first step) / (steps - 1), from the run's ``log.jsonl`` (logged every step), so loading, the
bank build and the first step's warm-up are left out. Then the trained run predicts every slice
of ``--volume`` with :class:`~napari_jras.core.engine.InferenceEngine` (one warm-up slice first);
seconds per slice = the whole volume's time / its slices; the volume is then predicted again
(``seconds_per_slice_again``: every slice's image embedding comes from the in-memory
frozen-encoder cache, as when the assistant re-predicts after a correction).

``--cached-training`` trains each mode twice with ``--no-augment`` and
``$NAPARI_JRAS_EMBEDDING_CACHE`` set to a fresh folder and times the second run (every slice's
embedding already cached); ``--train-flags`` adds flags to both trainings. The machine's load
average is recorded before and after: on a shared machine the figures are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from napari_jras.core.backbones.embedding_cache import FOLDER_ENV
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.io import find_cases, read_volume
from napari_jras.core.provenance import git_state, provenance, script_command, write_report

MODES = {"jras": [], "baseline": ["--no-retrieval"]}


def train_seconds_per_step(args: argparse.Namespace, mode: str, run: Path) -> float:
    """Train one mode in a child process; seconds per step between its first and last step."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    if args.cached_training:
        env[FOLDER_ENV] = str(run.parent / "embedding_cache")
    extra = shlex.split(args.train_flags) + (["--no-augment", "--overwrite"]
                                             if args.cached_training else [])
    cmd = [sys.executable, "-m", "napari_jras.cli", "train", "--data", str(args.data),
           "--out", str(run), "--backbone", "sam", "--pretrained", "litemedsam",
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--size", str(args.size), "--log-every", "1", "--checkpoint-every", str(args.steps),
           "--seed", "0", "--quiet", *MODES[mode], *extra]
    for _ in range(2 if args.cached_training else 1):  # the first run fills the cache
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"train ({mode}) failed:\n{proc.stdout[-2000:]}"
                             f"{proc.stderr[-2000:]}")
    times = {r["step"]: r["time_s"] for r in map(json.loads, (run / "log.jsonl").open())
             if r.get("phase") == "train"}
    first, last = min(times), max(times)
    return (times[last] - times[first]) / (last - first)


def predict_seconds_per_slice(run: Path, volume: Path,
                              threads: int) -> tuple[float, float, int]:
    """Seconds per slice of a whole-volume prediction (after one warm-up slice) and of a second
    one (embeddings cached), and the slice count."""
    torch.set_num_threads(threads)
    image = read_volume(volume).data
    engine = InferenceEngine.from_run(run, device="cpu", faiss_gpu=False)
    engine.predict(image, slices=[0])  # warm-up
    n = image.shape[0] if image.ndim == 3 else 1
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        engine.predict(image)
        seconds.append((time.perf_counter() - start) / n)
    return seconds[0], seconds[1], n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a labelled training folder")
    parser.add_argument("--volume", type=Path, required=True, help="an image to predict")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="training image size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="jras,baseline")
    parser.add_argument("--train-flags", default="", help="more train flags, one string")
    parser.add_argument("--cached-training", action="store_true",
                        help="time a second --no-augment training on a filled embedding cache")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is left out)")
    git = git_state()  # the code that runs: read at start
    load_before = os.getloadavg()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="jras-litemedsam-speed-") as tmp:
        for mode in args.modes.split(","):
            run = Path(tmp) / mode
            step_s = train_seconds_per_step(args, mode, run)
            slice_s, again_s, n_slices = predict_seconds_per_slice(run, args.volume,
                                                                   args.threads)
            rows[mode] = {"seconds_per_step": round(step_s, 3),
                          "seconds_per_slice": round(slice_s, 3),
                          "seconds_per_slice_again": round(again_s, 3),
                          "predicted_slices": n_slices}
            print(f"{mode:9s} {step_s:.2f} s/step (batch {args.batch_size}), "
                  f"{slice_s:.2f} s/slice, {again_s:.2f} s/slice again", flush=True)
    report = {
        "what": "J-RAS on LiteMedSAM (image encoder frozen): seconds per training step and per "
                "predicted slice on this machine",
        "modes": rows,
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "size": args.size,
                     "threads": args.threads, "volume": str(args.volume),
                     "train_flags": args.train_flags, "cached_training": args.cached_training},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "provenance": provenance(data=args.data, cases=find_cases(args.data), device="cpu",
                                 git_at_start=git, cpus=os.cpu_count(),
                                 command=script_command(__file__, argv)),
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
