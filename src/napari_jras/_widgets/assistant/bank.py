"""Bank panel: what the model and its exemplar bank hold; add a labelled folder to the bank."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QFileDialog, QGroupBox, QPushButton

from ...core.errors import JRASError
from ...core.workspace import BUILTIN, Workspace, builtin_model_dir
from .._common import show_error, show_info, stack, wrapped_label
from ..jobs import add_folder_job, workspace_summary

if TYPE_CHECKING:
    from .dock import AssistantWidget


def idle_info(source: str) -> str:
    """What the panel says before the model ``source`` is loaded."""
    if source != BUILTIN:
        return f"Model: {source} (loads on first Segment)"
    try:
        builtin_model_dir()
    except JRASError:
        return "The built-in model is not installed: choose a run folder under Model."
    return "Model: built-in cardiac MRI (loads on first Segment)"


class BankPanel(QGroupBox):
    """The model/bank summary, "Add labelled folder to bank..." and the shortcut list."""

    def __init__(self, dock: AssistantWidget) -> None:
        super().__init__("Model and bank")
        self.dock = dock
        self.info = wrapped_label(idle_info(dock.source))
        self.add_folder_button = QPushButton("Add labelled folder to bank...")
        self.add_folder_button.clicked.connect(lambda: self.add_folder())
        stack(self, self.info, self.add_folder_button,
              wrapped_label("Shortcuts: Shift+S segment, Shift+D accept, Shift+N next slice, "
                            "Shift+P propagate"))

    def refresh(self, ws: Workspace | None, source: str) -> None:
        """Show the summary of ``ws`` (before it is loaded: what ``source`` will be)."""
        self.info.setText(workspace_summary(ws) if ws is not None else idle_info(source))

    def add_folder(self, folder: str | None = None) -> None:
        """Add a folder of labelled ``<name>_image`` / ``<name>_label`` pairs to the bank."""
        dock = self.dock
        if dock.workspace is None:
            show_error("Load a model first (Segment an image, or pick a model)")
            return
        folder = folder or QFileDialog.getExistingDirectory(self, "Folder of labelled cases")
        if not folder:
            return

        def done(result: tuple[int, int]) -> None:
            show_info(f"Added {result[0]} exemplars from {folder}; the bank now holds {result[1]}")
            dock.status.setText(f"Added {result[0]} exemplars")
            dock.refresh_info()

        dock.run(add_folder_job, dock.workspace, folder,
                 dock.segment_panel.device_combo.currentText(),
                 label=f"Adding {Path(folder).name} to the bank", done=done)
