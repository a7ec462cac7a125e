"""Training panel: train a J-RAS (or baseline) model on a labelled folder, then evaluate it."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import create_widget
from magicgui.widgets.bases import ValueWidget
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.backbones import backbone_class
from ..core.errors import DataError
from ..core.model import ModelConfig
from ..core.progress import Progress, ProgressFn
from ..core.train import TrainConfig
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
from .settings_form import form_values, settings_form

if TYPE_CHECKING:
    import napari


CHANNELS_OPTION = "base_channels"  # the backbone option the panel sets (CNN backbones' width)


def train_and_evaluate(data: str, out: str, model_config: dict[str, Any],
                       train_settings: dict[str, Any], val: str | None = None,
                       progress: ProgressFn | None = None,
                       cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train into ``out``, then (with ``val``) evaluate.

    Args:
        data: folder of labelled training cases.
        out: run folder.
        model_config: :class:`ModelConfig` fields (``num_classes`` may be left out).
        train_settings: :class:`TrainConfig` fields; ``log_every`` and ``checkpoint_every``,
            when left out, scale with the steps (about 200 log lines, 5 checkpoints).
        val: folder of validation cases to evaluate the trained model on.
        progress: called with each progress record.
        cancel: polled; True stops training after the current step.

    Returns:
        ``{"out", "report", "cancelled"}`` (``report``: the evaluation, None without ``val``).
    """
    from ..core.pipeline import evaluate_run, train_run

    config = TrainConfig(**train_settings)
    periods = {"log_every": max(1, config.steps // 200),
               "checkpoint_every": max(50, config.steps // 5)}
    config = replace(config, **{k: v for k, v in periods.items() if k not in train_settings})
    train_run(data, out, model_config, config, val=val, progress=progress, cancel=cancel)
    if cancel is not None and cancel():
        return {"out": out, "report": None, "cancelled": True}
    report = evaluate_run(out, val, device=config.device, progress=progress) if val else None
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
        # the settings: magicgui widgets made from ModelConfig's and TrainConfig's fields
        self.settings = settings_form((ModelConfig, TrainConfig), choices={"device": DEVICES})
        self.settings.insert(self.settings.index(self.settings.backbone) + 1, _channels_widget())
        self.settings.use_retrieval.changed.connect(self._on_retrieval_changed)
        self.settings.backbone.changed.connect(self._on_backbone_changed)
        self.settings.class_names.native.setPlaceholderText(
            "optional: background, RV, myocardium, LV")
        form = QFormLayout()
        for label, widget in [("Training data", self.data), ("Validation", self.val),
                              ("Output run folder", self.out)]:
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
        layout.addWidget(self.settings.native)
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
        config = form_values(self.settings, ModelConfig)
        config["backbone_options"] = self._backbone_options()
        if config.get("class_names"):
            config["num_classes"] = len(config["class_names"])
        return config

    def train_settings(self) -> dict[str, Any]:
        """Training settings (:class:`TrainConfig` fields) from the form."""
        return form_values(self.settings, TrainConfig)

    def _backbone_options(self) -> dict[str, Any]:
        """The width applies to the backbones that take one; SegFormer and SAM use their own."""
        if _takes_channels(self.settings.backbone.value):
            return {CHANNELS_OPTION: self.settings[CHANNELS_OPTION].value}
        return {}

    def _on_retrieval_changed(self, on: bool) -> None:
        self.settings.k.enabled = on

    def _on_backbone_changed(self, name: str) -> None:
        self.settings[CHANNELS_OPTION].enabled = _takes_channels(name)

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
        settings = self.train_settings()
        self._started = time.perf_counter()
        self.jobs.start(train_and_evaluate, data, out, self.model_config(), settings,
                        val=val or None, label="Training", status=f"Training into {out} ...",
                        total=settings["steps"], on_progress=self._on_progress,
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


def _takes_channels(backbone: str) -> bool:
    """Whether the registered backbone ``backbone`` has a width option (:data:`CHANNELS_OPTION`)."""
    return CHANNELS_OPTION in inspect.signature(backbone_class(backbone).__init__).parameters


def _channels_widget() -> ValueWidget:
    """Spin box of the CNN backbones' width, at the U-Net's default."""
    default = inspect.signature(backbone_class("unet").__init__).parameters[CHANNELS_OPTION].default
    widget = create_widget(value=default, annotation=int, name=CHANNELS_OPTION, label="Channels",
                           options={"min": 4, "max": 256})
    widget.tooltip = ("backbone width (channels of the first level): smaller is faster, e.g. "
                      "8-16 on a CPU")
    return widget
