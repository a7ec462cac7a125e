"""Boxes panel: start without a trained model from boxes around the structures (LiteMedSAM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Shapes
from qtpy.QtWidgets import QComboBox, QGroupBox, QPushButton

from ...core import modality_bank
from ...core.backbones.litemedsam_net import availability as litemedsam_availability
from ...core.errors import DataError
from ...core.zero_shot import boxes_from_labels, boxes_on_slice
from .._common import (
    button_row,
    current_index,
    form,
    go_to_index,
    show_error,
    show_info,
    show_warning,
    stack,
    wrapped_label,
)
from ..edits import kept_slices
from ..jobs import box_job
from .state import LABELS_SUFFIX, case_id_of, check_image_layer

if TYPE_CHECKING:
    from .dock import AssistantWidget

BOXES_SUFFIX = " J-RAS boxes"


class BoxesPanel(QGroupBox):
    """Box start, "Boxes -> next slice" and the bank for this modality, where Accept stores the
    slices while no model is loaded (all disabled, with the install hint, without weights)."""

    def __init__(self, dock: AssistantWidget) -> None:
        super().__init__("Start without a model: boxes")
        self.dock = dock
        self.box_button = QPushButton("Box start (LiteMedSAM)")
        self.box_button.clicked.connect(self.box_start)
        self.box_next_button = QPushButton("Boxes \u2192 next slice")
        self.box_next_button.clicked.connect(self.boxes_to_next_slice)
        self.bank_combo = QComboBox()
        self.bank_combo.setEditable(True)
        self.bank_combo.addItems(modality_bank.names())
        self.bank_combo.setCurrentText("")
        self.bank_combo.lineEdit().setPlaceholderText("the image's modality")
        lite = litemedsam_availability()
        self.available = bool(lite["available"])
        if self.available:
            self.box_button.setToolTip(
                "Segment the current slice from the boxes drawn in the image's 'J-RAS boxes' "
                "Shapes layer (box 1 paints class 1, box 2 class 2, ...); no trained model needed")
            self.box_next_button.setToolTip(
                "The current slice's painted classes, each as a box, prompt the next (empty) slice")
            self.bank_combo.setToolTip(
                "Without a trained model, Accept stores your corrected slices in this bank "
                f"({modality_bank.bank_dir(modality_bank.DEFAULT_NAME).parent}/<name>, "
                "LiteMedSAM embeddings); `napari-jras bank export` turns it into training data")
        else:
            for widget in (self.box_button, self.box_next_button, self.bank_combo):
                widget.setEnabled(False)
                widget.setToolTip(f"Needs LiteMedSAM's weights: {lite['how']}")
        stack(self, wrapped_label("Draw a box around each structure (outer ones first), or "
                                  "paint one slice; LiteMedSAM segments, you correct and accept."),
              button_row(self.box_button, self.box_next_button),
              form(("Bank for this modality", self.bank_combo)))

    def bank_name(self, layer: Image) -> str:
        """The modality bank's name: the one chosen, else the image's modality (then shown)."""
        name = self.bank_combo.currentText().strip()
        if not name:
            name = modality_bank.default_name(layer.metadata.get("modality"))
            self.bank_combo.setCurrentText(name)
        return name

    def remember(self, name: str) -> None:
        """Offer the bank ``name`` in the list (after the first accept into a new bank)."""
        if self.bank_combo.findText(name) < 0:
            self.bank_combo.addItem(name)
        self.bank_combo.setCurrentText(name)

    def box_start(self) -> None:
        """Segment the current slice with LiteMedSAM from the boxes of '<image> J-RAS boxes'.

        The first click adds that Shapes layer (rectangle tool). The k-th box of the slice (in
        drawing order) paints class k, later boxes over earlier ones; no trained model is needed.
        Slices you edited or accepted are never overwritten.
        """
        target = self._target()
        if target is None:
            return
        layer, z = target
        viewer = self.dock.viewer
        name = layer.name + BOXES_SUFFIX
        if name not in viewer.layers:
            shapes = viewer.add_shapes(
                ndim=layer.ndim, name=name, scale=layer.scale, translate=layer.translate,
                face_color="transparent", edge_color="yellow", edge_width=1)
            viewer.layers.selection.active = shapes
            shapes.mode = "add_rectangle"
            show_info(f"Draw a box around each structure on slice {z} of '{layer.name}' (outer "
                      "structures first: box 1 paints class 1, box 2 class 2, ...), then click "
                      "Box start again")
            return
        shapes = viewer.layers[name]
        if not isinstance(shapes, Shapes) or shapes.ndim != layer.ndim:
            show_error(f"'{name}' must be a {layer.ndim}-D Shapes layer over '{layer.name}': "
                       "delete it and click Box start to get a new one")
            return
        vertices = [np.array([layer.world_to_data(shapes.data_to_world(p)) for p in shape])
                    for shape in shapes.data]
        boxes = boxes_on_slice(vertices, z, np.shape(layer.data))
        if not boxes:
            show_error(f"No box on slice {z} of '{layer.name}': draw one in '{name}' (rectangle "
                       "tool), then click Box start")
            return
        self._segment(layer, z, boxes, list(range(1, len(boxes) + 1)), go=False)

    def boxes_to_next_slice(self) -> None:
        """Prompt the next slice with the current slice's labels, one box per class (LiteMedSAM).

        Only fills an empty next slice (never your edits or an accepted slice), then moves there,
        so repeated clicks walk through the volume. Without a labels layer yet, an empty one is
        added to paint on.
        """
        target = self._target()
        if target is None:
            return
        layer, z = target
        if layer.ndim != 3:
            show_error(f"'{layer.name}' is a 2-D image: it has no next slice (use Box start)")
            return
        states = self.dock.states
        state = states.shown(layer)
        if state is None:
            self.dock.viewer.layers.selection.active = states.new(layer).labels
            show_info(f"Paint the structures on slice {z} of '{layer.name}{LABELS_SUFFIX}', "
                      "then click Boxes \u2192 next slice")
            return
        data = np.asarray(state.labels.data)
        if z + 1 >= len(data):
            show_info(f"{layer.name}: this is the last slice")
            return
        if not data[z].any():
            show_error(f"Slice {z} of '{layer.name}{LABELS_SUFFIX}' has no labels: paint it (or "
                       "use Box start) first")
            return
        if data[z + 1].any():
            show_warning(f"Slice {z + 1} of '{layer.name}' already has labels: Boxes \u2192 next "
                         "slice only fills an empty slice")
            return
        boxes, labels = boxes_from_labels(data[z])
        self._segment(layer, z + 1, boxes, labels, go=True)

    def _target(self) -> tuple[Image, int] | None:
        """The chosen image and its current slice, or None (after an error notification)."""
        layer = self.dock.current_image()
        if layer is None:
            show_error("No image layer: open an image first")
            return None
        try:
            check_image_layer(layer)
        except DataError as exc:
            show_error(str(exc))
            return None
        return layer, current_index(self.dock.viewer, layer)

    def _kept(self, layer: Image) -> set[int]:
        """Slices a box start never writes: unaccepted edits and accepted corrections."""
        ws, bank = self.dock.workspace, self.dock.modality_bank
        accepted = ws.corrections() if ws is not None else (
            bank.records() if bank is not None else [])
        return kept_slices(self.dock.states.edited_slices(layer.name), accepted,
                           case_id_of(layer))

    def _segment(self, layer: Image, z: int, boxes: list[list[float]], labels: list[int],
                 go: bool) -> None:
        """Run LiteMedSAM on slice ``z`` in the background and write its labels there."""
        dock = self.dock
        if z in self._kept(layer):
            show_warning(f"Slice {z} of '{layer.name}' holds your edits or an accepted "
                         "correction: a box start never overwrites it")
            return
        state = dock.states.get(layer.name)
        names = (state.labels.metadata.get("class_names") if state is not None else None) or (
            dock.workspace.class_names if dock.workspace is not None else
            modality_bank.BOX_CLASS_NAMES)
        if max(labels) >= len(names):
            show_error(f"{len(boxes)} boxes, but '{layer.name}{LABELS_SUFFIX}' has "
                       f"{len(names) - 1} classes: draw at most {len(names) - 1} boxes per slice")
            return
        image = np.asarray(layer.data)
        name = layer.name

        def done(result: np.ndarray) -> None:
            if name not in dock.viewer.layers:
                return
            state = dock.states.for_writing(layer, image.shape)
            if z in self._kept(layer):  # edited while LiteMedSAM ran
                show_warning(f"Kept your edits on slice {z} of {name}")
                return
            with dock.states.writing(state) as data:
                state.edits.write_unedited(data, {z: result})
            found = sorted(set(np.unique(result)) - {0})
            dock.status.setText(f"LiteMedSAM: slice {z} of {name} from {len(boxes)} box(es): "
                                f"class(es) {', '.join(map(str, found)) or 'none'}; correct, "
                                "then accept")
            if go:
                go_to_index(dock.viewer, layer, z)

        dock.run(box_job, image[z] if image.ndim == 3 else image, boxes, labels,
                 label=f"LiteMedSAM on slice {z} of {name}", done=done)
