"""Event-loop stalls while the assistant propagates with the built-in model (needs a display:
run under ``xvfb-run -a`` on a headless machine).

Usage (from the repository root)::

    xvfb-run -a python benchmarks/speed/bench_propagate_gui.py --out benchmarks/results/propagation_cpu

Opens napari with the bundled sample and the assistant (built-in model, fresh workspace in a
temporary home), segments the whole volume, corrects and accepts the middle slice, then presses
Propagate ``--repeats`` times while a QTimer ticks every 10 ms; the longest gap between two
ticks is the longest stall of the event loop (with when it happened, from the press of
Propagate, and the machine's load average). Writes ``propagate_gui.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp(prefix="napari-jras-gui-")
    os.environ["NAPARI_JRAS_HOME"] = home
    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_jras._sample_data import load_sample
    from napari_jras._widgets.assistant import AssistantWidget
    from napari_jras.core.simulate import git_commit

    app = QApplication.instance() or QApplication([])

    def wait(condition, timeout=300.0) -> None:
        end = time.perf_counter() + timeout
        while not condition():
            app.processEvents()
            time.sleep(0.002)
            if time.perf_counter() > end:
                raise TimeoutError("the assistant did not finish in time")

    def idle() -> bool:
        return widget.jobs.task is None or not widget.jobs.task.running

    viewer = napari.Viewer(show=False)
    widget = AssistantWidget(viewer)
    viewer.window.add_dock_widget(widget)
    viewer.open_sample("napari-jras", "cardiac_mri")
    name = widget.segment_panel.image_combo.currentText()
    _, label, _ = load_sample("ED")
    widget.segment_panel.scope_combo.setCurrentText("whole volume")
    widget.segment()
    wait(lambda: widget.workspace is not None and idle() and name in widget.states)
    labels = viewer.layers[f"{name} J-RAS"]
    m = labels.data.shape[0] // 2
    labels.data[m] = label[m]
    labels.refresh()
    step = list(viewer.dims.current_step)
    step[0] = m
    viewer.dims.current_step = tuple(step)
    widget.accept()
    wait(idle)
    runs = []
    for _ in range(args.repeats):
        ticks: list[float] = []
        timer = QTimer()
        timer.timeout.connect(lambda ticks=ticks: ticks.append(time.perf_counter()))
        timer.start(10)
        t0 = time.perf_counter()
        widget.propagate()
        wait(idle)
        seconds = time.perf_counter() - t0
        timer.stop()
        gaps = np.diff(ticks) * 1000
        worst = int(np.argmax(gaps))
        runs.append({"seconds": seconds, "ticks": len(ticks), "max_gap_ms": float(gaps.max()),
                     "p99_gap_ms": float(np.percentile(gaps, 99)),
                     "gaps_over_50_ms": int((gaps > 50).sum()),
                     "max_gap_at_s": ticks[worst] - t0, "status": widget.status.text(),
                     "load_average": os.getloadavg()})
        print(runs[-1])
    viewer.close()
    report = {"what": "longest gap between 10 ms QTimer ticks while the assistant propagates "
                      "from the accepted middle slice of the bundled sample (built-in model)",
              "runs": runs, "max_gap_ms": max(r["max_gap_ms"] for r in runs),
              "torch_threads": torch.get_num_threads(), "commit": git_commit(),
              "command": "xvfb-run -a python benchmarks/speed/bench_propagate_gui.py "
                         + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "propagate_gui.json").write_text(json.dumps(report, indent=1))
    print(f"longest stall {report['max_gap_ms']:.0f} ms -> {args.out / 'propagate_gui.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
