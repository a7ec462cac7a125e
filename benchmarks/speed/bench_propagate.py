"""Speed of propagation: one accepted slice through a whole volume with the built-in model.

Usage (from the repository root)::

    python benchmarks/speed/bench_propagate.py --out benchmarks/results/propagation_cpu

The bundled sample (ACDC patient002, 10 slices of 256 x 232 px, not in the model's training
data) is opened in a fresh workspace of the built-in model; the expert mask of its middle slice
is accepted and propagated to the other 9 slices (no stop rule, so every slice is predicted),
``--repeats`` times after one warm-up run, with 1 and with all torch threads, next to one plain
pass over the whole volume under the same conditions (the machine may be shared: the ratio
says what propagation adds to a normal Segment). Also reports the
Dice of the propagated slices and of the same slices predicted without memory. Writes
``propagate_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

from napari_jras._sample_data import sample_paths
from napari_jras.core.io import read_volume
from napari_jras.core.propagate import propagate
from napari_jras.core.simulate import git_commit, slice_dice
from napari_jras.core.workspace import BUILTIN, Workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    image_path, label_path = sample_paths("ED")
    image, label = read_volume(image_path).data, read_volume(label_path).data.astype(np.uint8)
    m = image.shape[0] // 2
    rows = {}
    with tempfile.TemporaryDirectory() as home:
        ws = Workspace.open(BUILTIN, home=Path(home))
        ws.engine("cpu")
        case = "patient002_frame01"
        ws.accept(image, label, slices=[m], case_id=case)
        truth, records = ws.accepted_slices(case, image.shape[1:])
        for threads in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(threads)
            times = []
            for i in range(args.repeats + 1):
                t0 = time.perf_counter()
                result = propagate(ws, image, truth, m, min_confidence=0.0,
                                   stop_on_empty=False, case_id=case, records=records)
                if i:  # the first run warms up
                    times.append(time.perf_counter() - t0)
            volume = []  # reference: one plain pass over the whole volume, same conditions
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ws.predict(image)
                volume.append(time.perf_counter() - t0)
            rows[str(threads)] = {"median_s": median(times), "min_s": min(times),
                                  "runs": times, "slices": len(result.filled),
                                  "whole_volume_predict_median_s": median(volume),
                                  "ratio_to_whole_volume_predict": median(times) / median(volume)}
            print(f"{threads} thread(s): {median(times):.3f} s for {len(result.filled)} slices; "
                  f"a plain pass over the volume {median(volume):.3f} s")
        plain = ws.predict(image, slices=result.filled)
        nc = ws.num_classes
        dice = {"propagated": float(np.mean([slice_dice(result.labels[z], label[z], nc)
                                             for z in result.filled])),
                "without_memory": float(np.mean([slice_dice(plain.labels[z], label[z], nc)
                                                 for z in result.filled])),
                "copy_of_accepted": float(np.mean([slice_dice(label[m], label[z], nc)
                                                   for z in result.filled]))}
        fusion = ws.model_config.fusion
        ws.close()
    report = {
        "what": "propagate one accepted slice (the middle one) through the bundled 10-slice "
                "sample (256 x 232 px) with the built-in model, no stop rule",
        "volume_shape": list(image.shape), "model": "builtin", "fusion": fusion,
        "threads": rows, "dice_of_filled_slices": dice,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(),
                    "cores": torch.get_num_threads(), "load_average": os.getloadavg()},
        "commit": git_commit(),
        "command": "python benchmarks/speed/bench_propagate.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "propagate_speed.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(dice), f"-> {args.out / 'propagate_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
