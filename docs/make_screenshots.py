"""Make the documentation screenshots in ``docs/images`` from a real napari window.

Run from the repository root, under a virtual X server on a headless machine::

    xvfb-run -a -s "-screen 0 1400x900x24" python docs/make_screenshots.py            # all
    xvfb-run -a -s "-screen 0 1400x900x24" python docs/make_screenshots.py sample     # one
    xvfb-run -a -s "-screen 0 1400x900x24" python docs/make_screenshots.py --model RUN_DIR

Each screenshot is one function ``shot_<name>(viewer)`` that sets the viewer up; it is
registered in :data:`SHOTS` and saved as ``docs/images/<name>.png``. A fresh viewer is made for
every shot so they do not influence each other. A shot may return a function that is called
after the screenshot (e.g. to cancel a background job). To add one, write a function and add it
to ``SHOTS``.

The widget shots use the built-in model, or the run folder given by ``--model`` (or the
``NAPARI_JRAS_MODEL`` environment variable). They work in a throw-away napari-jras home, so
the user's own workspaces and banks are never touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_API", "pyqt6")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGES = Path(__file__).resolve().parent / "images"
REPO = Path(__file__).resolve().parents[1]
WINDOW_SIZE = (1280, 800)  # width, height of the napari window
MODEL = os.environ.get("NAPARI_JRAS_MODEL", "builtin")  # set by --model
ACDC = REPO.parent / "shared" / "data" / "acdc"  # train/ and val/ paired folders; set by --acdc
CORRECTED_SLICE = 5  # the mid-ventricle slice the "accept" shots correct


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


def wait_for(condition: Callable[[], bool], timeout: float = 600.0) -> None:
    """Process Qt events until ``condition()`` holds (background jobs report through events)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("a background job did not finish in time")
        QApplication.processEvents()
        time.sleep(0.02)


def dock_assistant(viewer, image):
    """Dock the J-RAS assistant with :data:`MODEL` loaded and ``image`` chosen."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-jras", "J-RAS assistant")
    widget.set_model_source(MODEL)
    wait_for(lambda: widget.workspace is not None and not widget.jobs.task.running)
    widget.segment_panel.image_combo.setCurrentText(image.name)
    return widget


def chosen_labels(widget):
    """The J-RAS labels layer of the image chosen in the assistant."""
    return widget.states.labels_layer(widget.segment_panel.image_combo.currentText())


def segment_sample(viewer):
    """Open the sample, hide its expert labels, segment the whole volume; (widget, expert labels)."""
    image, expert = open_sample(viewer)
    expert.visible = False
    widget = dock_assistant(viewer, image)
    widget.segment_panel.scope_combo.setCurrentText("whole volume")
    widget.segment()
    wait_for(lambda: not widget.jobs.task.running)
    show_slice(viewer, CORRECTED_SLICE)
    return widget, expert


def accept_correction(viewer, widget, expert) -> None:
    """Correct slice :data:`CORRECTED_SLICE` (with the expert mask, as an annotator would) and accept."""
    labels = chosen_labels(widget)
    labels.data[CORRECTED_SLICE] = expert.data[CORRECTED_SLICE]
    labels.refresh()
    widget.accept()
    wait_for(lambda: not widget.jobs.task.running)


# --------------------------------------------------------------------------- shots
def shot_sample(viewer) -> None:
    """Bundled cardiac MRI with its expert labels (RV, myocardium, LV) over a mid slice."""
    _, labels = open_sample(viewer)
    labels.opacity = 0.55
    labels.contour = 0
    viewer.layers.selection.active = labels
    show_slice(viewer, best_slice(labels))


def shot_assistant(viewer) -> None:
    """Prediction of the sample with the exemplars retrieved for the slice on screen."""
    widget, _ = segment_sample(viewer)
    viewer.layers.selection.active = chosen_labels(widget)


def shot_correct(viewer) -> None:
    """Slice 5 being corrected with napari's paint tool before it is accepted."""
    widget, expert = segment_sample(viewer)
    labels = chosen_labels(widget)
    data = labels.data.copy()
    data[CORRECTED_SLICE] = expert.data[CORRECTED_SLICE]
    labels.data = data  # as the paint brush leaves it: the layer's data event fires
    viewer.layers.selection.active = labels
    labels.mode = "paint"
    labels.selected_label = 2
    labels.brush_size = 6
    settle(viewer)
    widget.scroll.ensureWidgetVisible(widget.correct_panel.accept_button)


def shot_accept(viewer) -> None:
    """A corrected slice accepted into the bank: the next prediction retrieves it at once."""
    widget, expert = segment_sample(viewer)
    accept_correction(viewer, widget, expert)
    widget.segment_panel.scope_combo.setCurrentText("current slice")
    widget.segment()
    wait_for(lambda: not widget.jobs.task.running)
    widget.scroll.ensureWidgetVisible(widget.correct_panel.accept_button)


def shot_propagate(viewer) -> None:
    """Slice 5 corrected and accepted, then propagated: slice 6 predicted with it as memory."""
    widget, expert = segment_sample(viewer)
    accept_correction(viewer, widget, expert)
    widget.propagate()
    wait_for(lambda: not widget.jobs.task.running)
    show_slice(viewer, CORRECTED_SLICE + 1)
    viewer.layers.selection.active = chosen_labels(widget)
    widget.scroll.ensureWidgetVisible(widget.exemplars_panel.gallery)


def shot_finetune(viewer):
    """Background fine-tuning after a correction: progress, ETA and the live loss curve."""
    widget, expert = segment_sample(viewer)
    accept_correction(viewer, widget, expert)
    widget.learn_panel.steps_spin.setValue(2000)
    widget.learn_panel.finetune()
    wait_for(lambda: len(widget.learn_panel.loss_plot.points()) >= 4, timeout=1800)
    widget.scroll.ensureWidgetVisible(widget.learn_panel.version_combo)

    def stop() -> None:
        widget.learn_panel.cancel_finetune()
        wait_for(lambda: not widget.learn_panel.jobs.task.running)

    return stop


def small_split(n_train: int = 4, n_val: int = 2) -> tuple[Path, Path]:
    """Copies of the first patients of ``ACDC/train`` and ``ACDC/val`` (a quick training run)."""
    import shutil

    out = Path(tempfile.mkdtemp(prefix="jras-shot-data-"))
    for part, n in (("train", n_train), ("val", n_val)):
        files = sorted((ACDC / part).glob("patient*_*"))
        patients = sorted({f.name.split("_")[0] for f in files})[:n]
        if not patients:
            raise SystemExit(f"No ACDC cases in {ACDC / part}: pass --acdc DIR (with train/, val/)")
        (out / part).mkdir()
        for f in files:
            if f.name.split("_")[0] in patients:
                shutil.copy(f, out / part / f.name)
    return out / "train", out / "val"


def shot_training(viewer) -> None:
    """Training panel after a short run on a few ACDC patients, evaluated on two others."""
    train, val = small_split()
    open_sample(viewer)
    _, panel = viewer.window.add_plugin_dock_widget("napari-jras", "J-RAS training")
    panel.data.setText(str(train))
    panel.val.setText(str(val))
    panel.out.setText(tempfile.mkdtemp(prefix="jras-shot-run-"))
    panel.settings.steps.value = 150
    panel.settings.size.value = 64
    panel.settings.base_channels.value = 8
    panel.settings.class_names.value = "background, RV, myocardium, LV"
    panel.train()
    wait_for(lambda: not panel.jobs.task.running, timeout=3600)
    show_slice(viewer, CORRECTED_SLICE)


SHOTS: dict[str, Callable] = {
    "sample": shot_sample,
    "assistant": shot_assistant,
    "correct": shot_correct,
    "accept": shot_accept,
    "propagate": shot_propagate,
    "finetune": shot_finetune,
    "training": shot_training,
}


# --------------------------------------------------------------------------- driver
def take(name: str, out_dir: Path = IMAGES, canvas_only: bool = False) -> Path:
    """Make screenshot ``name`` in a fresh viewer and save it as ``<out_dir>/<name>.png``."""
    import napari

    viewer = napari.Viewer(show=True, title=f"napari-jras: {name}")
    try:
        viewer.window._qt_window.resize(*WINDOW_SIZE)
        after = SHOTS[name](viewer)
        settle(viewer)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
        if callable(after):
            after()
        return path
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> int:
    global MODEL, ACDC
    parser = argparse.ArgumentParser(description="Make the documentation screenshots.")
    parser.add_argument("names", nargs="*",
                        help=f"screenshots to make (default: all of {', '.join(SHOTS)})")
    parser.add_argument("--out", type=Path, default=IMAGES, help="output folder")
    parser.add_argument("--canvas-only", action="store_true", help="only the image canvas")
    parser.add_argument("--model", default=MODEL,
                        help="run folder for the widget shots (default: the built-in model)")
    parser.add_argument("--acdc", type=Path, default=ACDC,
                        help="ACDC folder with train/ and val/ pairs (training shot)")
    args = parser.parse_args(argv)
    MODEL, ACDC = str(args.model), args.acdc
    os.environ["NAPARI_JRAS_HOME"] = tempfile.mkdtemp(prefix="jras-shot-home-")
    unknown = sorted(set(args.names) - set(SHOTS))
    if unknown:
        parser.error(f"unknown screenshot(s) {', '.join(unknown)}; choose from {', '.join(SHOTS)}")
    for name in args.names or list(SHOTS):
        print(take(name, args.out, args.canvas_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
