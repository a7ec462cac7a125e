"""How much of a mask survives the readout fusion's value resolution: no network, only resizing.

Usage (from the repository root)::

    python benchmarks/accuracy/readout_ceiling.py --out benchmarks/results/fusion_study/readout_ceiling.json

The readout propagates exemplar masks through an affinity computed on a key grid at 1/4 (or
1/8) of the model's working size. Even a perfect affinity (each query position reads exactly
its own position) can only give back what the values hold. For every ``acdc/val`` slice this
scores (mean foreground Dice against the slice's ground truth, per volume, then the mean) a
source mask, the slice's own (``oracle``) or its neighbour's (z - 1, z + 1 for z = 0:
``neighbour``), after resizing to the working size, average-pooling to the key grid and
upsampling back (``pooled`` values, as runs saved before ``readout_values`` existed), or kept at
full resolution (``fine`` values: 4 x 4 blocks per key position, exact at a perfect
affinity). The neighbour at ``fine`` is plain copying of the neighbour's mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]

from napari_jras.core.io import find_cases, read_volume  # noqa: E402
from napari_jras.core.metrics import mean_dice  # noqa: E402
from napari_jras.core.provenance import provenance, script_command, write_report  # noqa: E402


def through(mask: np.ndarray, size: int, stride: int, num_classes: int) -> np.ndarray:
    """Label maps (Z, H, W) resized to ``size``, pooled by ``stride`` (1: kept), upsampled to
    ``size`` and back to (H, W), bilinear on the one-hot channels, argmax."""
    onehot = F.one_hot(torch.as_tensor(mask).long(), num_classes).permute(0, 3, 1, 2).float()
    height, width = mask.shape[-2:]
    x = F.interpolate(onehot, size=(size, size), mode="bilinear", align_corners=False)
    if stride > 1:
        x = F.avg_pool2d(x, stride)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.argmax(1).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", type=Path, default=REPO.parent / "shared/data/acdc/val")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 256])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cases = find_cases(args.val)
    scores: dict[str, list[float]] = {}
    for case in cases:
        labels = np.asarray(read_volume(case.label_path).data).astype(np.int64)
        num_classes = max(4, int(labels.max()) + 1)
        sources = {"oracle": labels, "neighbour": np.concatenate([labels[1:2], labels[:-1]])}
        for source, mask in sources.items():
            for size in args.sizes:
                for values, stride in (("fine", 1), ("pooled 1/4", 4), ("pooled 1/8", 8)):
                    predicted = through(mask, size, stride, num_classes)
                    key = f"{source} | {size} px | {values}"
                    scores.setdefault(key, []).append(mean_dice(predicted, labels, num_classes))
    rows = [{"source": k.split(" | ")[0], "size": int(k.split(" | ")[1].split()[0]),
             "values": k.split(" | ")[2], "dice": round(float(np.mean(v)), 4), "volumes": len(v)}
            for k, v in scores.items()]
    for row in rows:
        print(f"{row['source']:9s} {row['size']:4d} px {row['values']:11s} {row['dice']:.3f}")
    report = {"what": "mean foreground Dice of a source mask after the readout's value "
                      "resolution, with a perfect affinity (no network)",
              "rows": rows,
              "provenance": provenance(data=args.val, cases=cases,
                                       command=script_command(__file__, argv))}
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
