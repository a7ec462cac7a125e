"""Make the documentation screenshots in ``docs/images`` from a real napari window.

Run from the repository root, under a virtual X server on a headless machine::

    xvfb-run -a -s "-screen 0 1400x900x24" python docs/make_screenshots.py            # all
    xvfb-run -a -s "-screen 0 1400x900x24" python docs/make_screenshots.py sample     # one

Each screenshot is one function ``shot_<name>(viewer) -> None`` that sets the viewer up; it is
registered in :data:`SHOTS` and saved as ``docs/images/<name>.png``. A fresh viewer is made for
every shot so they do not influence each other. To add one (e.g. a widget), write a function
and add it to ``SHOTS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_API", "pyqt6")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGES = Path(__file__).resolve().parent / "images"
WINDOW_SIZE = (1280, 800)  # width, height of the napari window


# --------------------------------------------------------------------------- helpers
def open_sample(viewer, key: str = "cardiac_mri"):
    """Open the bundled sample; return (image layer, labels layer)."""
    from napari.layers import Image, Labels

    layers = viewer.open_sample("napari-jras", key)
    image = next(layer for layer in layers if isinstance(layer, Image))
    labels = next(layer for layer in layers if isinstance(layer, Labels))
    return image, labels


def best_slice(labels) -> int:
    """Index of the middle slice among those with the most labelled classes (a mid-ventricle slice)."""
    import numpy as np

    data = np.asarray(labels.data)
    if data.ndim < 3:
        return 0
    n_classes = np.array([len(np.unique(s)) for s in data])
    candidates = np.flatnonzero(n_classes == n_classes.max())
    return int(candidates[len(candidates) // 2])


def show_slice(viewer, z: int) -> None:
    """Show slice ``z`` of the first (Z) axis in 2-D and fit the view."""
    viewer.dims.ndisplay = 2
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)
    viewer.reset_view()


def settle(viewer, rounds: int = 10) -> None:
    """Let Qt draw everything (layer list, canvas, dock widgets) before a screenshot."""
    from qtpy.QtWidgets import QApplication

    for _ in range(rounds):
        QApplication.processEvents()
    viewer.window._qt_window.repaint()
    QApplication.processEvents()


# --------------------------------------------------------------------------- shots
def shot_sample(viewer) -> None:
    """Bundled cardiac MRI with its expert labels (RV, myocardium, LV) over a mid slice."""
    _, labels = open_sample(viewer)
    labels.opacity = 0.55
    labels.contour = 0
    viewer.layers.selection.active = labels
    show_slice(viewer, best_slice(labels))


SHOTS: dict[str, Callable] = {
    "sample": shot_sample,
}


# --------------------------------------------------------------------------- driver
def take(name: str, out_dir: Path = IMAGES, canvas_only: bool = False) -> Path:
    """Make screenshot ``name`` in a fresh viewer and save it as ``<out_dir>/<name>.png``."""
    import napari

    viewer = napari.Viewer(show=True, title=f"napari-jras: {name}")
    try:
        viewer.window._qt_window.resize(*WINDOW_SIZE)
        SHOTS[name](viewer)
        settle(viewer)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
        return path
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make the documentation screenshots.")
    parser.add_argument("names", nargs="*",
                        help=f"screenshots to make (default: all of {', '.join(SHOTS)})")
    parser.add_argument("--out", type=Path, default=IMAGES, help="output folder")
    parser.add_argument("--canvas-only", action="store_true", help="only the image canvas")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SHOTS))
    if unknown:
        parser.error(f"unknown screenshot(s) {', '.join(unknown)}; choose from {', '.join(SHOTS)}")
    for name in args.names or list(SHOTS):
        print(take(name, args.out, args.canvas_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
