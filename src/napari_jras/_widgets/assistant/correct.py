"""Correct panel: accept edited slices into the bank, propagate them through the volume, export."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QPushButton,
    QSpinBox,
)

from ..._writer import write_labels
from ...core.errors import DataError
from ...core.modality_bank import BOX_CLASS_NAMES
from ...core.propagate import MIN_CONFIDENCE, Propagation
from .._common import (
    button_row,
    current_index,
    error_message,
    form,
    show_error,
    show_info,
    stack,
    wrapped_label,
)
from ..edits import slice_list
from ..jobs import accept_job, modality_accept_job, propagate_job
from .state import LABELS_SUFFIX, ImageState, case_id_of, check_image_layer

if TYPE_CHECKING:
    from .dock import AssistantWidget

MEMORY_SLOTS = 2
"""Default number of the volume's own accepted slices that guide each prediction."""


class CorrectPanel(QGroupBox):
    """Accept, next slice, the memory and stop settings, propagate, export."""

    def __init__(self, dock: AssistantWidget) -> None:
        super().__init__("Correct")
        self.dock = dock
        self.accept_button = QPushButton("Accept correction  [Shift+D]")
        self.accept_button.setToolTip("Store the slices you edited (or the current slice) in the "
                                      "exemplar bank: the next prediction can use them at once")
        self.accept_button.clicked.connect(self.accept)
        self.next_button = QPushButton("Next slice  [Shift+N]")
        self.next_button.clicked.connect(dock.next_slice)
        self.propagate_button = QPushButton("Propagate  [Shift+P]")
        self.propagate_button.setToolTip(
            "Re-predict the slices you have not accepted or edited, outward from the current "
            "slice (accepted, or painted), each guided by your nearest accepted slices")
        self.propagate_button.clicked.connect(lambda: self.propagate())
        self.auto_propagate = QCheckBox("Propagate after every accept")
        self.stop_confidence = QDoubleSpinBox()
        self.stop_confidence.setRange(0.0, 1.0)
        self.stop_confidence.setSingleStep(0.05)
        self.stop_confidence.setValue(MIN_CONFIDENCE)
        self.stop_confidence.setToolTip("Propagation stops in a direction at a slice whose mean "
                                        "confidence over its predicted structures is lower "
                                        "(that slice is left as it was); 0: never")
        self.stop_empty = QCheckBox("Stop where the structures vanish")
        self.stop_empty.setChecked(True)
        self.stop_empty.setToolTip("Propagation stops in a direction after a slice predicted "
                                   "empty")
        self.memory_spin = QSpinBox()
        self.memory_spin.setRange(0, 8)
        self.memory_spin.setValue(MEMORY_SLOTS)
        self.memory_spin.setSpecialValueText("off")
        self.memory_spin.setToolTip("How many of your accepted slices of the same volume (the "
                                    "nearest ones) guide every prediction; off: retrieval only")
        self.export_button = QPushButton("Export labels...")
        self.export_button.clicked.connect(lambda: self.export_labels())
        stack(self, wrapped_label("Edit the J-RAS labels layer with napari's label tools, then "
                                  "accept. Edits are autosaved as drafts."),
              button_row(self.accept_button, self.next_button),
              form(("Your corrections as memory", self.memory_spin),
                   ("Stop below confidence", self.stop_confidence)),
              self.stop_empty, button_row(self.propagate_button, self.auto_propagate),
              self.export_button)

    # -- accept ----------------------------------------------------------------------------
    def accept(self) -> None:
        """Store the edited slices (or the current slice) of the chosen image in the bank: the
        model's, or without a model (box start) the bank for this modality."""
        dock = self.dock
        layer = dock.current_image()
        if layer is None:
            show_error("No image layer: open and segment an image first")
            return
        state = dock.states.get(layer.name)
        if state is None:
            show_error(f"Segment '{layer.name}' first, correct the J-RAS labels, then accept")
            return
        if dock.workspace is None and not dock.boxes_panel.available:
            show_error("Accept stores the slice in a J-RAS model's exemplar bank (the model "
                       "embeds it): pick a model under Model first; your labels stay as they are")
            return
        zs = dock.states.edited_slices(layer.name) or [current_index(dock.viewer, layer)]
        labels = np.array(state.labels.data, copy=True)
        meta = layer.metadata
        kwargs = {"image": np.asarray(layer.data), "labels": labels,
                  "slices": zs if layer.ndim == 3 else None,
                  "modality": meta.get("modality"), "source": str(meta.get("source") or layer.name),
                  "case_id": case_id_of(layer),
                  "patient_id": meta.get("patient_id"), "author": _user()}
        name = layer.name

        def accepted() -> None:
            if dock.states.get(name) is state:
                state.edits.accept(labels, zs)
                if dock.workspace is not None and not dock.states.edited_slices(name):
                    dock.workspace.discard_draft(state.edits.key)

        if dock.workspace is None:  # box start: the bank for this modality (LiteMedSAM)
            self._accept_to_modality_bank(name, zs, accepted, kwargs)
            return

        def done(result: dict[str, Any]) -> None:
            accepted()
            bank = (f"the bank now holds {result['bank']} exemplars ({result['corrections']} "
                    "corrections)" if result["bank"] is not None else
                    f"{result['corrections']} corrections kept for fine-tuning")
            show_info(f"Added {len(result['ids'])} exemplar(s) from slice(s) {slice_list(zs)} "
                      f"of {name}; {bank}")
            dock.status.setText(f"Accepted slice(s) {slice_list(zs)} of {name}")
            dock.refresh_info()
            if self.auto_propagate.isChecked() and layer.ndim == 3 and name in dock.states:
                start = current_index(dock.viewer, layer)
                dock.queue(lambda: self.propagate(start if start in zs else zs[0]))
            auto = dock.learn_panel.auto_spin.value()
            if auto and result["pending"] >= auto:
                dock.learn_panel.finetune(auto=True)

        dock.run(accept_job, dock.workspace, label=f"Accepting slice(s) {slice_list(zs)} of {name}",
                 done=done, **kwargs)

    def _accept_to_modality_bank(self, name: str, zs: list[int], accepted: Callable[[], None],
                                 kwargs: dict[str, Any]) -> None:
        """Accept without a model: store the slices in the bank for this modality."""
        dock = self.dock
        state = dock.states.get(name)
        bank_name = dock.boxes_panel.bank_name(dock.viewer.layers[name])
        class_names = list(state.labels.metadata.get("class_names") or BOX_CLASS_NAMES)

        def done(result: dict[str, Any]) -> None:
            if dock.modality_bank is not None and dock.modality_bank is not result["bank"]:
                dock.modality_bank.close()
            dock.modality_bank = result["bank"]
            dock.boxes_panel.remember(result["name"])
            accepted()
            show_info(f"Added {len(result['ids'])} exemplar(s) from slice(s) {slice_list(zs)} "
                      f"of {name} to the bank for this modality '{result['name']}'; the bank "
                      f"now holds {result['size']} exemplars")
            dock.status.setText(f"Accepted slice(s) {slice_list(zs)} of {name} into "
                                f"{result['bank'].path}")

        dock.run(modality_accept_job, dock.modality_bank, bank_name, class_names,
                 label=f"Accepting slice(s) {slice_list(zs)} of {name} into '{bank_name}'",
                 done=done, **kwargs)

    # -- propagate -------------------------------------------------------------------------
    def propagate(self, start: int | None = None) -> None:
        """Re-predict the volume outward from slice ``start`` (default: the current slice).

        ``start`` must be accepted, or painted (edited) and not yet accepted: the one-slice
        start. Accepted and edited slices are never overwritten. Without a J-RAS labels layer
        yet, an empty one is added to paint on.
        """
        dock = self.dock
        layer = dock.current_image()
        if layer is None:
            show_error("No image layer: open a volume first")
            return
        try:
            check_image_layer(layer)
        except DataError as exc:
            show_error(str(exc))
            return
        if layer.ndim != 3:
            show_error(f"'{layer.name}' is a 2-D image: propagation works through the slices "
                       "of a volume")
            return
        if dock.workspace is None:
            show_error("Load a model first: press Segment, or pick a model under Model")
            return
        state = dock.states.shown(layer)
        z = current_index(dock.viewer, layer) if start is None else int(start)
        if state is None:
            dock.viewer.layers.selection.active = dock.states.new(layer).labels
            show_info(f"Paint the structures on slice {z} of '{layer.name}{LABELS_SUFFIX}', "
                      "then press Propagate (or accept the slice first)")
            return
        painted, protected = state.edits.propagation_start(np.asarray(state.labels.data), z)
        name = layer.name

        def done(result: Propagation) -> None:
            applied = self._apply(name, state, result)
            stops = ", ".join(f"{d}: {why}" for d, why in sorted(result.stopped.items()))
            what = "Cancelled after" if result.cancelled else "Propagated to"
            dock.status.setText(f"{what} {len(applied)} slice(s) of {name} from slice {z} in "
                                f"{result.seconds:.2f} s ({stops})")

        dock.run(propagate_job, dock.workspace, np.asarray(layer.data),
                 layer.metadata.get("modality"), case_id_of(layer), z, painted, protected,
                 max(1, self.memory_spin.value()), self.stop_confidence.value(),
                 self.stop_empty.isChecked(), label=f"Propagating from slice {z} of {name}",
                 done=done, progress=True)

    def _apply(self, name: str, state: ImageState, result: Propagation) -> list[int]:
        """Write propagated slices into the labels layer, except slices edited meanwhile."""
        dock = self.dock
        if dock.states.get(name) is not state:
            return []
        with dock.states.writing(state) as data:
            applied = state.edits.write_unedited(data, {z: result.labels[z]
                                                        for z in result.filled})
        ws = dock.workspace
        dock.exemplars_panel.gallery.set_exemplars(name, {z: result.exemplars[z] for z in applied},
                                                   ws.class_names,
                                                   retrieval=ws.model_config.use_retrieval)
        return applied

    # -- export ----------------------------------------------------------------------------
    def export_labels(self, path: str | None = None) -> str | None:
        """Save the chosen image's J-RAS labels (TIFF or NIfTI, with the voxel spacing)."""
        layer = self.dock.current_image()
        labels = self.dock.states.labels_layer(layer.name) if layer is not None else None
        if labels is None:
            show_error("Nothing to export: segment an image first")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save labels", f"{layer.name}_label.nii.gz",
                "NIfTI (*.nii.gz *.nii);;TIFF (*.tif *.tiff)")
            if not path:
                return None
        try:  # our writer directly: napari's layer.save reports a failed write as success
            [written] = write_labels(path, labels.data, {"name": labels.name,
                                                         "scale": labels.scale})
        except Exception as exc:  # noqa: BLE001 (any writer failure becomes a notification)
            show_error(f"Could not save the labels: {error_message(exc)}")
            return None
        show_info(f"Saved {labels.name} to {written}")
        return written


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
