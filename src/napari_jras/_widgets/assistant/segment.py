"""Segment panel: which image, model, scope and device; the Segment action and the status line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGroupBox,
    QLabel,
    QPushButton,
)

from ...core.errors import DataError
from ...core.workspace import BUILTIN, Workspace
from .._common import (
    DEVICES,
    button_row,
    current_index,
    form,
    go_to_index,
    show_error,
    show_info,
    show_warning,
    shrinkable,
    stack,
)
from ..edits import restored_time, slice_list
from ..jobs import Segmented, segment_job
from .state import case_id_of, check_image_layer, layer_draft_key

if TYPE_CHECKING:
    from .dock import AssistantWidget

CHOOSE = "choose"
SCOPES = ("current slice", "whole volume", "all open images")


class SegmentPanel(QGroupBox):
    """Choose the image, model, scope and device; segment; the dock's job status below."""

    def __init__(self, dock: AssistantWidget) -> None:
        super().__init__("Segment")
        self.dock = dock
        self.image_combo = shrinkable(QComboBox())
        self.image_combo.currentTextChanged.connect(self._on_image_chosen)
        self.model_combo = shrinkable(QComboBox())
        self.model_combo.addItem("Built-in cardiac MRI model", BUILTIN)
        self.model_combo.addItem("Choose run folder...", CHOOSE)
        self.model_combo.activated.connect(self._on_model_activated)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.segment_button = QPushButton("Segment  [Shift+S]")
        self.segment_button.clicked.connect(self.segment)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        stack(self, form(("Image", self.image_combo), ("Model", self.model_combo),
                         ("Scope", self.scope_combo), ("Device", self.device_combo)),
              button_row(self.segment_button, dock.cancel_button), dock.progress, dock.status,
              self.legend)

    # -- image and model choice ------------------------------------------------------------
    def set_images(self, names: list[str]) -> None:
        """Offer the image layers ``names``, keeping the current choice when it is still there."""
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        self._on_image_chosen(self.image_combo.currentText())

    def choose_image(self, name: str) -> None:
        """Choose image ``name`` when it is offered."""
        if name in [self.image_combo.itemText(i) for i in range(self.image_combo.count())]:
            self.image_combo.setCurrentText(name)

    def _on_image_chosen(self, name: str) -> None:
        self.dock.exemplars_panel.gallery.show_image(name or None)

    def _on_model_activated(self, index: int) -> None:
        data = self.model_combo.itemData(index)
        if data == CHOOSE:
            folder = QFileDialog.getExistingDirectory(self, "Choose a J-RAS run folder")
            if not folder:
                self.select_source(self.dock.source)
                return
            data = folder
        self.dock.set_model_source(data)

    def select_source(self, source: str) -> None:
        """Show ``source`` (built-in or a run folder) as the chosen model."""
        index = self.model_combo.findData(source)
        if index < 0:
            index = self.model_combo.count() - 1
            self.model_combo.insertItem(index, Path(source).name or source, source)
            self.model_combo.setItemData(index, source, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(index)

    # -- segment ---------------------------------------------------------------------------
    def segment(self) -> None:
        """Segment the chosen scope in the background; results go to '<image> J-RAS' layers."""
        dock = self.dock
        scope = self.scope_combo.currentText()
        layers = dock.image_layers() if scope == SCOPES[2] else [dock.current_image()]
        layers = [layer for layer in layers if layer is not None]
        if not layers:
            show_error("No image layer to segment: open an image first (File > Open, or "
                       "File > Open Sample > J-RAS)")
            return
        try:
            for layer in layers:
                check_image_layer(layer)
        except DataError as exc:
            show_error(str(exc))
            return
        jobs = []
        for layer in layers:
            slices = ([current_index(dock.viewer, layer)]
                      if scope == SCOPES[0] and layer.ndim == 3 else None)
            jobs.append({"name": layer.name, "image": np.asarray(layer.data),
                         "modality": layer.metadata.get("modality"), "slices": slices,
                         "case_id": case_id_of(layer),
                         "memory_slots": dock.correct_panel.memory_spin.value(),
                         "draft_key": layer_draft_key(layer),
                         "want_draft": layer.name not in dock.states})
        names = ", ".join(job["name"] for job in jobs)
        dock.run(segment_job, dock.workspace, dock.source, jobs, self.device_combo.currentText(),
                 label=f"Segmenting {names}", done=self._on_segmented, progress=True)

    def _on_segmented(self, result: tuple[Workspace, list[Segmented]]) -> None:
        _, results = result
        lines = []
        for item in results:
            if item.name not in self.dock.viewer.layers:
                continue
            kept, restored = self._apply(item)
            t = item.prediction.timings
            retrieval = t.get("embed", 0) + t.get("search", 0) + t.get("fusion", 0)
            lines.append(f"{item.name}: {len(item.prediction.slices)} slice(s) in "
                         f"{item.seconds:.2f} s on {item.device} (network "
                         f"{t.get('network', 0):.2f} s, retrieval {retrieval:.2f} s)")
            if kept:
                show_warning(f"Kept your unaccepted edits on slice(s) {slice_list(kept)} of "
                             f"{item.name} (accept them, or clear them to take the new prediction)")
            if restored:
                show_info(f"Restored your autosaved corrections of {item.name} on slice(s) "
                          f"{slice_list(restored)} (saved {restored_time(item.draft)})")
        self.dock.status.setText("\n".join(lines))
        self.dock.exemplars_panel.gallery.show_image(self.image_combo.currentText() or None)

    def _apply(self, item: Segmented) -> tuple[list[int], list[int]]:
        """Write a prediction into the image's labels layer; returns (kept, restored) slices."""
        dock = self.dock
        state = dock.states.for_writing(dock.viewer.layers[item.name])
        with dock.states.writing(state) as data:
            kept = state.edits.merge_prediction(data, item.prediction.labels,
                                                item.prediction.slices)
            restored = state.edits.restore_draft(data, item.draft)
        ws = dock.workspace
        dock.exemplars_panel.gallery.set_exemplars(item.name, item.prediction.exemplars,
                                                   ws.class_names,
                                                   retrieval=ws.model_config.use_retrieval)
        return kept, restored

    def next_slice(self) -> None:
        """Go to the next slice; with the "current slice" scope, segment it if not done yet."""
        dock = self.dock
        layer = dock.current_image()
        if layer is None or layer.ndim < 3:
            return
        z = current_index(dock.viewer, layer) + 1
        if z >= layer.data.shape[0]:
            show_info(f"{layer.name}: this is the last slice")
            return
        go_to_index(dock.viewer, layer, z)
        state = dock.states.get(layer.name)
        if self.scope_combo.currentText() == SCOPES[0] and (
                state is None or z not in state.edits.predicted):
            self.segment()
