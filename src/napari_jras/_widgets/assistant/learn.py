"""Learn panel: fine-tune the active model on the bank in the background; roll back versions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QComboBox,
    QGroupBox,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
)

from ...core.progress import Progress
from ...core.workspace import ModelVersion, Workspace
from .._common import (
    JobSlot,
    button_row,
    form,
    format_eta,
    show_error,
    show_info,
    shrinkable,
    stack,
)
from ..plot import LossPlot

if TYPE_CHECKING:
    from .dock import AssistantWidget


class LearnPanel(QGroupBox):
    """Steps, automatic fine-tuning, progress with the live loss curve, versions and roll back."""

    def __init__(self, dock: AssistantWidget) -> None:
        super().__init__("Learn: fine-tune on the bank")
        self.dock = dock
        self.finetune_button = QPushButton("Fine-tune now")
        self.finetune_button.clicked.connect(lambda: self.finetune())
        self.cancel_button = QPushButton("Cancel")
        self.auto_spin = QSpinBox()
        self.auto_spin.setRange(0, 10_000)
        self.auto_spin.setToolTip("Fine-tune automatically after this many new corrections "
                                  "(0: off)")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(100)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.loss_plot = LossPlot("fine-tuning loss")
        self.version_combo = shrinkable(QComboBox())
        self.rollback_button = QPushButton("Roll back")
        self.rollback_button.setToolTip("Make the chosen version the active model again")
        self.rollback_button.clicked.connect(lambda: self.activate_version())
        self.jobs = JobSlot(self.cancel_button, self.progress, self.status,
                            buttons=[self.finetune_button], cancelling="Cancelling ...")
        stack(self, form(("Steps", self.steps_spin), ("Auto every N corrections", self.auto_spin)),
              button_row(self.finetune_button, self.cancel_button), self.progress, self.status,
              self.loss_plot, button_row(self.version_combo, self.rollback_button))

    def finetune(self, auto: bool = False) -> None:
        """Fine-tune the active model on the bank in the background (corrections oversampled)."""
        ws = self.dock.workspace
        if ws is None:
            show_error("Segment an image (or pick a model) first: there is nothing to fine-tune "
                       "yet")
            return
        if self.jobs.running:
            if not auto:
                show_info("Fine-tuning is already running")
            return
        steps = self.steps_spin.value()
        self.loss_plot.clear()
        self._started = time.perf_counter()
        self.jobs.start(ws.finetune, steps=steps,
                        device=self.dock.segment_panel.device_combo.currentText(),
                        label="Fine-tuning", total=steps,
                        status=("Automatic fine-tuning" if auto else "Fine-tuning")
                        + f": {steps} steps ...",
                        on_progress=self._on_progress, on_done=self._on_done,
                        cancelled_status="Cancelled: the active model is unchanged",
                        cancelled_info="Fine-tuning cancelled; the active model is unchanged")

    def cancel_finetune(self) -> None:
        """Stop the running fine-tune (the active model stays as it was)."""
        self.jobs.cancel()

    def _on_progress(self, event: Progress) -> None:
        step, total, phase = event.done, event.total, event.stage
        if total:
            self.progress.setRange(0, total)
            self.progress.setValue(step)
        loss = event.metrics.get("loss")
        if loss is not None and phase in ("train", "finetune", ""):
            self.loss_plot.add_point(step, loss)
        eta = format_eta(event.eta_s)
        shown = f"  loss {loss:.4f}" if loss is not None else ""
        self.status.setText(f"{phase or 'fine-tuning'} {step}/{total}{shown}  {eta}")

    def _on_done(self, version: ModelVersion) -> None:
        seconds = time.perf_counter() - self._started
        self.status.setText(f"Version {version.name} is active (fine-tuned in {seconds:.0f} s)")
        show_info(f"Fine-tuning finished: version {version.name} is now active "
                  "(use Roll back to return to an earlier one)")
        self.dock.refresh_info()

    def refresh_versions(self, ws: Workspace) -> None:
        """List the workspace's versions, newest first, the active one marked."""
        self.version_combo.clear()
        for version in reversed(ws.versions()):
            active = " (active)" if version.name == ws.active.name else ""
            self.version_combo.addItem(f"{version.name}{active} {version.note}".strip(),
                                       version.name)

    def activate_version(self, name: str | None = None) -> None:
        """Make version ``name`` (default: the one chosen in the list) the active model."""
        dock = self.dock
        name = name or self.version_combo.currentData()
        if dock.workspace is None or not name:
            return

        def done(_: Any) -> None:
            dock.status.setText(f"Version {name} is active")
            show_info(f"Version {name} is now the active model")
            dock.refresh_info()

        dock.run(dock.workspace.activate, name, label=f"Activating version {name}", done=done)
