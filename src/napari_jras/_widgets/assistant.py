"""J-RAS assistant dock: segment, see why (exemplars), correct, accept, fine-tune, roll back.

All compute runs in :class:`~napari_jras.core.workspace.Workspace` methods on worker threads;
this module only moves arrays between napari layers and the workspace.
"""

from __future__ import annotations

import getpass
import hashlib
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Shapes
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .._writer import write_labels
from ..core import bank_tools
from ..core.backbones.litemedsam_net import availability as litemedsam_availability
from ..core.engine import Prediction
from ..core.errors import DataError, JRASError
from ..core.progress import Progress
from ..core.propagate import MIN_CONFIDENCE, Propagation, propagate
from ..core.workspace import BUILTIN, ModelVersion, Workspace, builtin_model_dir
from ..core.zero_shot import boxes_from_labels, boxes_on_slice, segment_with_boxes
from ._common import (
    DEVICES,
    Task,
    class_colormap,
    class_features,
    current_index,
    error_message,
    format_eta,
    go_to_index,
    legend_html,
    show_error,
    show_info,
    show_warning,
    unwrap,
)
from .gallery import ExemplarGallery
from .plot import LossPlot

if TYPE_CHECKING:
    import napari

ASSISTANT_NAME = "J-RAS assistant"
CHOOSE = "choose"
SCOPES = ("current slice", "whole volume", "all open images")
SHORTCUTS = {"Shift-S": "segment", "Shift-D": "accept", "Shift-N": "next_slice",
             "Shift-P": "propagate"}
"""Viewer key bindings: segment, accept the corrected slices, go to (and segment) the next slice,
propagate the accepted (or painted) slice to the rest of the volume."""
MEMORY_SLOTS = 2
"""Default number of the volume's own accepted slices that guide each prediction."""
AUTOSAVE_MS = 2000
LABELS_SUFFIX = " J-RAS"
BOXES_SUFFIX = " J-RAS boxes"
BOX_CLASSES = ("background",) + tuple(f"structure {i}" for i in range(1, 9))
"""Class names of a labels layer made before any model is loaded (box start): the k-th box of a
slice paints class k, so at most 8 boxes per slice."""

_ASSISTANTS: weakref.WeakValueDictionary[int, AssistantWidget] = weakref.WeakValueDictionary()


# --------------------------------------------------------------------------- background jobs
@dataclass
class Segmented:
    """One image's result of :func:`segment_job`."""

    name: str
    prediction: Prediction
    draft: tuple[np.ndarray, dict] | None
    device: str
    seconds: float


def segment_job(workspace: Workspace | None, source: str, jobs: list[dict[str, Any]], device: str,
                progress: Callable[[Any], None], cancel: Callable[[], bool]
                ) -> tuple[Workspace, list[Segmented]]:
    """Open the workspace if needed and predict every job (``name, image, modality, slices``)."""
    ws = workspace or Workspace.open(source)
    engine = ws.engine(device)
    results = []
    for i, job in enumerate(jobs):
        started = time.perf_counter()
        memory = ws.volume_memory(job["case_id"], np.shape(job["image"]), job["memory_slots"])
        pred = ws.predict(job["image"], modality=job["modality"], slices=job["slices"],
                          progress=lambda p, i=i: progress((i, len(jobs), p.done, p.total)),
                          cancel=cancel, memory=memory)
        draft = ws.load_draft(job["draft_key"]) if job["want_draft"] else None
        results.append(Segmented(job["name"], pred, draft, str(engine.device),
                                 time.perf_counter() - started))
    return ws, results


def propagate_job(ws: Workspace, image: np.ndarray, modality: str | None, case_id: str,
                  start: int, painted: dict[int, np.ndarray], protected: list[int], slots: int,
                  min_confidence: float, stop_on_empty: bool,
                  progress: Callable[[Any], None], cancel: Callable[[], bool]) -> Propagation:
    """Propagate from slice ``start`` with the case's accepted corrections (and the ``painted``,
    not yet accepted slices) as memory; ``protected`` slices are never predicted."""
    accepted, records = ws.accepted_slices(case_id, np.shape(image)[1:])
    for z in painted:
        records[z] = {"case_id": case_id, "not_accepted": True}
    return propagate(ws, image, {**accepted, **painted}, start, protected=protected, slots=slots,
                     modality=modality, case_id=case_id, records=records,
                     min_confidence=min_confidence, stop_on_empty=stop_on_empty,
                     progress=lambda p: progress((p.done, p.total)), cancel=cancel)


def box_job(image2d: np.ndarray, boxes: list[list[float]], labels: list[int]) -> np.ndarray:
    """LiteMedSAM's label map of one slice from box prompts (box i paints ``labels[i]``)."""
    return segment_with_boxes(image2d, boxes, labels=labels)


def case_id_of(layer: Image) -> str:
    """The case id under which an image's corrections are stored (metadata, else layer name)."""
    return str(layer.metadata.get("case_id") or layer.name)


def accept_job(ws: Workspace, **kwargs: Any) -> dict[str, Any]:
    """Store corrected slices; returns the new ids and the bank counts."""
    ids = ws.accept(**kwargs)
    return {"ids": ids, "bank": len(ws.bank) if ws.bank is not None else None,
            "corrections": len(ws.corrections()), "pending": ws.corrections_since_finetune}


def add_folder_job(ws: Workspace, folder: str, device: str) -> tuple[int, int]:
    """Add a folder of labelled cases to the workspace bank; returns (added, bank size)."""
    if ws.bank is None:
        raise JRASError("A baseline model has no exemplar bank: choose a J-RAS model")
    bank, ids = bank_tools.add_cases(ws.bank.path, ws.active.path, folder, origin="import",
                                     device=device)
    bank.close()
    return len(ids), len(ws.bank)


def workspace_summary(ws: Workspace) -> str:
    """HTML lines: model, active version, training data, bank contents."""
    cfg = ws.model_config
    kind = f"J-RAS, K={cfg.k}" if cfg.use_retrieval else "baseline (no retrieval)"
    source = "built-in cardiac MRI model" if ws.source == BUILTIN else ws.source
    active = ws.active
    lines = [(f"<b>Model</b> {source}<br>{cfg.backbone}, {kind}, {cfg.size} px, "
              f"{cfg.num_classes} classes"),
             f"<b>Version</b> {active.name} of {len(ws.versions())} ({active.created})"
             + (f": {active.note}" if active.note else "")]
    data = _training_data(ws)
    if data:
        lines.append(f"<b>Training data</b> {data.get('cases', '?')} cases, "
                     f"{data.get('patients', '?')} patients, {data.get('slices', '?')} slices")
    if ws.bank is not None:
        origins = bank_tools.summary(ws.bank)["origins"]
        lines.append(f"<b>Bank</b> {len(ws.bank)} exemplars: "
                     + ", ".join(f"{n} {o}" for o, n in sorted(origins.items())))
    lines.append(f"<b>Corrections</b> {len(ws.corrections())} accepted, "
                 f"{ws.corrections_since_finetune} not yet fine-tuned on")
    return "<br>".join(lines)


def _training_data(ws: Workspace) -> dict[str, Any]:
    import json

    for version in [ws.active, *ws.versions()]:
        file = Path(version.path) / "train_config.json"
        if file.is_file():
            try:
                return json.loads(file.read_text()).get("data") or {}
            except (OSError, ValueError):
                return {}
    return {}


def draft_key(layer: Image) -> str:
    """Autosave key of an image layer: its name plus a hash of its source and shape."""
    source = str(layer.metadata.get("source") or getattr(layer.source, "path", "") or "")
    digest = hashlib.sha1(f"{source}|{layer.name}|{np.shape(layer.data)}".encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", layer.name).strip("._")[:60] or "image"
    return f"{name}-{digest}"


def check_image_layer(layer: Any) -> None:
    """Raise :class:`DataError` when J-RAS cannot segment ``layer``."""
    if not isinstance(layer, Image):
        raise DataError(f"'{layer.name}' is not an image layer")
    if layer.rgb:
        raise DataError(f"'{layer.name}' is an RGB image; J-RAS segments single-channel (grey) "
                        "images: convert it to greyscale or open one channel")
    if layer.multiscale:
        raise DataError(f"'{layer.name}' is a multiscale (pyramid) image; open its full-resolution "
                        "level as a plain image layer")
    if layer.ndim not in (2, 3):
        raise DataError(f"'{layer.name}' has {layer.ndim} dimensions; J-RAS segments 2-D images "
                        "and 3-D volumes (Z, Y, X): split channels / time points first")


def _as_volume(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 3 else array[None]


@dataclass
class ImageState:
    """What the assistant tracks for one segmented image layer."""

    labels: Labels
    baseline: np.ndarray  # the prediction (or last accepted mask) the edits are compared with
    key: str
    predicted: set[int] = field(default_factory=set)
    dirty: bool = False


# --------------------------------------------------------------------------- widget
class AssistantWidget(QWidget):
    """Dock widget: segment images with J-RAS, show the exemplars, learn from corrections."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = unwrap(viewer)
        self.workspace: Workspace | None = None
        self.states: dict[str, ImageState] = {}
        self.task: Task | None = None
        self.finetune_task: Task | None = None
        self._source = BUILTIN
        self._updating = False
        self._queued: Callable[[], None] | None = None
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_MS)
        self._autosave.timeout.connect(self.save_drafts)
        self._build()
        _ASSISTANTS[id(self.viewer)] = self
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layer_removed)
        layers.events.moved.connect(self._on_layers_changed)
        layers.selection.events.active.connect(self._on_active_layer)
        for layer in layers:
            layer.events.name.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._bind_keys()

    # -- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._on_image_chosen)
        self.model_combo = QComboBox()
        for combo in (self.image_combo, self.model_combo):
            _shrinkable(combo)
        self.model_combo.addItem("Built-in cardiac MRI model", BUILTIN)
        self.model_combo.addItem("Choose run folder...", CHOOSE)
        self.model_combo.activated.connect(self._on_model_activated)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.segment_button = QPushButton("Segment  [Shift+S]")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda: self.task is not None and self.task.cancel())
        self.progress = QProgressBar()
        self.progress.setMaximumHeight(12)
        self.progress.setTextVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Scope", self.scope_combo)
        form.addRow("Device", self.device_combo)
        seg_box = QGroupBox("Segment")
        seg = QVBoxLayout(seg_box)
        seg.addLayout(form)
        seg.addLayout(_row(self.segment_button, self.cancel_button))
        seg.addWidget(self.progress)
        seg.addWidget(self.status)
        seg.addWidget(self.legend)

        self.box_button = QPushButton("Box start (LiteMedSAM)")
        self.box_button.clicked.connect(self.box_start)
        self.box_next_button = QPushButton("Boxes \u2192 next slice")
        self.box_next_button.clicked.connect(self.boxes_to_next_slice)
        lite = litemedsam_availability()
        if lite["available"]:
            self.box_button.setToolTip(
                "Segment the current slice from the boxes drawn in the image's 'J-RAS boxes' "
                "Shapes layer (box 1 paints class 1, box 2 class 2, ...); no trained model needed")
            self.box_next_button.setToolTip(
                "The current slice's painted classes, each as a box, prompt the next (empty) slice")
        else:
            for button in (self.box_button, self.box_next_button):
                button.setEnabled(False)
                button.setToolTip(f"Needs LiteMedSAM's weights: {lite['how']}")
        box_group = QGroupBox("Start without a model: boxes")
        box_layout = QVBoxLayout(box_group)
        box_layout.addWidget(_wrapped("Draw a box around each structure (outer ones first), or "
                                      "paint one slice; LiteMedSAM segments, you correct."))
        box_layout.addLayout(_row(self.box_button, self.box_next_button))

        self.gallery = ExemplarGallery(self.viewer)
        gal_box = QGroupBox("Why: the retrieved exemplars")
        QVBoxLayout(gal_box).addWidget(self.gallery)

        self.accept_button = QPushButton("Accept correction  [Shift+D]")
        self.accept_button.setToolTip("Store the slices you edited (or the current slice) in the "
                                      "exemplar bank: the next prediction can use them at once")
        self.accept_button.clicked.connect(self.accept)
        self.next_button = QPushButton("Next slice  [Shift+N]")
        self.next_button.clicked.connect(self.next_slice)
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
        cor_box = QGroupBox("Correct")
        cor = QVBoxLayout(cor_box)
        cor.addWidget(_wrapped("Edit the J-RAS labels layer with napari's label tools, then "
                               "accept. Edits are autosaved as drafts."))
        cor.addLayout(_row(self.accept_button, self.next_button))
        memory_form = QFormLayout()
        memory_form.addRow("Your corrections as memory", self.memory_spin)
        memory_form.addRow("Stop below confidence", self.stop_confidence)
        cor.addLayout(memory_form)
        cor.addWidget(self.stop_empty)
        cor.addLayout(_row(self.propagate_button, self.auto_propagate))
        cor.addWidget(self.export_button)

        self.finetune_button = QPushButton("Fine-tune now")
        self.finetune_button.clicked.connect(lambda: self.finetune())
        self.finetune_cancel = QPushButton("Cancel")
        self.finetune_cancel.setEnabled(False)
        self.finetune_cancel.clicked.connect(self.cancel_finetune)
        self.auto_spin = QSpinBox()
        self.auto_spin.setRange(0, 10_000)
        self.auto_spin.setToolTip("Fine-tune automatically after this many new corrections (0: off)")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(100)
        self.finetune_progress = QProgressBar()
        self.finetune_status = QLabel("")
        self.finetune_status.setWordWrap(True)
        self.loss_plot = LossPlot("fine-tuning loss")
        self.version_combo = _shrinkable(QComboBox())
        self.rollback_button = QPushButton("Roll back")
        self.rollback_button.setToolTip("Make the chosen version the active model again")
        self.rollback_button.clicked.connect(lambda: self.activate_version())
        ft_form = QFormLayout()
        ft_form.addRow("Steps", self.steps_spin)
        ft_form.addRow("Auto every N corrections", self.auto_spin)
        ft_box = QGroupBox("Learn: fine-tune on the bank")
        ft = QVBoxLayout(ft_box)
        ft.addLayout(ft_form)
        ft.addLayout(_row(self.finetune_button, self.finetune_cancel))
        ft.addWidget(self.finetune_progress)
        ft.addWidget(self.finetune_status)
        ft.addWidget(self.loss_plot)
        ft.addLayout(_row(self.version_combo, self.rollback_button))

        self.info = QLabel(self._idle_info())
        self.info.setWordWrap(True)
        self.add_folder_button = QPushButton("Add labelled folder to bank...")
        self.add_folder_button.clicked.connect(lambda: self.add_folder())
        info_box = QGroupBox("Model and bank")
        info = QVBoxLayout(info_box)
        info.addWidget(self.info)
        info.addWidget(self.add_folder_button)
        info.addWidget(_wrapped("Shortcuts: Shift+S segment, Shift+D accept, Shift+N next slice, "
                                "Shift+P propagate"))

        content = QWidget()
        layout = QVBoxLayout(content)
        for box in (seg_box, box_group, gal_box, cor_box, ft_box, info_box):
            layout.addWidget(box)
        layout.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        self.setMinimumWidth(360)

    def _idle_info(self) -> str:
        if self._source != BUILTIN:
            return f"Model: {self._source} (loads on first Segment)"
        try:
            builtin_model_dir()
        except JRASError:
            return "The built-in model is not installed: choose a run folder under Model."
        return "Model: built-in cardiac MRI (loads on first Segment)"

    def _bind_keys(self) -> None:
        from napari.utils.key_bindings import coerce_keybinding

        ref = weakref.ref(self)
        for key, method in SHORTCUTS.items():
            existing = self.viewer.keymap.get(coerce_keybinding(key))
            if existing is not None and not getattr(existing, "_jras", False):
                show_warning(f"{key} is already bound in this viewer; the J-RAS {method} "
                             "shortcut is off (use the button)")
                continue

            def handler(viewer: Any, method: str = method) -> None:
                widget = ref()
                if widget is not None:
                    getattr(widget, method)()

            handler._jras = True
            self.viewer.bind_key(key, handler, overwrite=True)

    # -- layers ----------------------------------------------------------------------------
    def image_layers(self) -> list[Image]:
        """Image layers of the viewer (J-RAS exemplar layers excluded)."""
        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and "exemplar_id" not in layer.metadata]

    def current_image(self) -> Image | None:
        """The image layer chosen in the combo box."""
        try:
            return self.viewer.layers[self.image_combo.currentText()]
        except KeyError:
            return None

    def labels_layer(self, image_name: str) -> Labels | None:
        """The J-RAS labels layer of ``image_name`` (None before its first Segment)."""
        state = self.states.get(image_name)
        return state.labels if state is not None else None

    def _on_layers_changed(self, event: Any = None) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.image_layers()]
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        self._on_image_chosen(self.image_combo.currentText())

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        for name, state in list(self.states.items()):
            if layer is state.labels or layer.name == name:
                self.states.pop(name)
                self.gallery.forget(name)
        self._on_layers_changed()

    def _on_active_layer(self, event: Any) -> None:
        layer = event.value
        if isinstance(layer, Image) and layer.name in [self.image_combo.itemText(i)
                                                       for i in range(self.image_combo.count())]:
            self.image_combo.setCurrentText(layer.name)
        elif isinstance(layer, Labels):
            for name, state in self.states.items():
                if state.labels is layer:
                    self.image_combo.setCurrentText(name)

    def _on_image_chosen(self, name: str) -> None:
        self.gallery.show_image(name or None)

    # -- model -----------------------------------------------------------------------------
    def _on_model_activated(self, index: int) -> None:
        data = self.model_combo.itemData(index)
        if data == CHOOSE:
            folder = QFileDialog.getExistingDirectory(self, "Choose a J-RAS run folder")
            if not folder:
                self._select_source(self._source)
                return
            data = folder
        self.set_model_source(data)

    def _select_source(self, source: str) -> None:
        index = self.model_combo.findData(source)
        if index < 0:
            index = self.model_combo.count() - 1
            self.model_combo.insertItem(index, Path(source).name or source, source)
            self.model_combo.setItemData(index, source, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(index)

    def set_model_source(self, source: str | Path) -> None:
        """Use the built-in model (:data:`BUILTIN`) or a run folder; loads it in the background."""
        source = str(source)
        busy = [what for what, task in (("fine-tuning", self.finetune_task), ("J-RAS", self.task))
                if task is not None and task.running]
        if busy:
            show_warning(f"Wait for {busy[0]} to finish (or cancel it) before changing the model")
            self._select_source(self._source)
            return
        self._select_source(source)
        if source == self._source and self.workspace is not None:
            return
        if self.workspace is not None:
            self.workspace.close()
        self.workspace, self._source = None, source
        self.info.setText(self._idle_info())
        self.version_combo.clear()
        self._run(Workspace.open, source, label="Loading the model",
                  done=lambda ws: self.status.setText(f"Model ready: version {ws.active.name}"))

    def _run(self, func: Callable[..., Any], *args: Any, label: str,
             done: Callable[[Any], None], progress: Callable[[Any], None] | None = None,
             **kwargs: Any) -> bool:
        """Run a workspace job in the background (one at a time; the model cannot change
        meanwhile); False when busy."""
        if self.task is not None and self.task.running:
            show_info(f"J-RAS is busy ({self.status.text() or 'working'}); try again in a moment")
            return False
        self.status.setText(f"{label} ...")
        self.progress.setRange(0, 0)
        self.cancel_button.setEnabled(True)

        def finished(result: Any) -> None:
            # jobs that open the workspace return it (alone or first in a tuple)
            ws = result[0] if isinstance(result, tuple) and isinstance(result[0], Workspace) else (
                result if isinstance(result, Workspace) else None)
            if ws is not None and self.workspace is None:
                self._adopt(ws)
            done(result)

        def failed(exc: BaseException) -> None:
            cancelled = self.task is not None and self.task.cancelled
            self.status.setText("Cancelled" if cancelled else f"{label} failed")
            if not cancelled:
                show_error(f"{label} failed: {error_message(exc)}")

        def cleanup() -> None:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)
            self.cancel_button.setEnabled(False)
            queued, self._queued = self._queued, None
            if queued is not None:
                queued()

        self.task = Task(func, *args, on_done=finished, on_error=failed, on_finally=cleanup,
                         on_progress=progress, pass_progress=progress is not None, **kwargs).start()
        return True

    def _adopt(self, ws: Workspace) -> None:
        self.workspace = ws
        self.legend.setText(legend_html(ws.class_names))
        self.add_folder_button.setEnabled(ws.bank is not None)
        self.refresh_info()

    def refresh_info(self) -> None:
        """Update the model/bank summary and the version list."""
        ws = self.workspace
        if ws is None:
            self.info.setText(self._idle_info())
            return
        self.info.setText(workspace_summary(ws))
        self.version_combo.clear()
        for version in reversed(ws.versions()):
            active = " (active)" if version.name == ws.active.name else ""
            self.version_combo.addItem(f"{version.name}{active} {version.note}".strip(), version.name)

    # -- segment ---------------------------------------------------------------------------
    def segment(self) -> None:
        """Segment the chosen scope in the background; results go to '<image> J-RAS' layers."""
        scope = self.scope_combo.currentText()
        layers = self.image_layers() if scope == SCOPES[2] else [self.current_image()]
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
            slices = ([current_index(self.viewer, layer)]
                      if scope == SCOPES[0] and layer.ndim == 3 else None)
            jobs.append({"name": layer.name, "image": np.asarray(layer.data),
                         "modality": layer.metadata.get("modality"), "slices": slices,
                         "case_id": case_id_of(layer), "memory_slots": self.memory_spin.value(),
                         "draft_key": draft_key(layer), "want_draft": layer.name not in self.states})
        names = ", ".join(job["name"] for job in jobs)
        self._run(segment_job, self.workspace, self._source, jobs, self.device_combo.currentText(),
                  label=f"Segmenting {names}", done=self._on_segmented,
                  progress=self._on_segment_progress)

    def _on_segment_progress(self, message: tuple[int, int, int, int]) -> None:
        i, n, done, total = message
        self.progress.setRange(0, n * total)
        self.progress.setValue(i * total + done)

    def _on_segmented(self, result: tuple[Workspace, list[Segmented]]) -> None:
        _, results = result
        lines = []
        for item in results:
            if item.name not in self.viewer.layers:
                continue
            kept, restored = self._apply(item)
            t = item.prediction.timings
            retrieval = t.get("embed", 0) + t.get("search", 0) + t.get("fusion", 0)
            lines.append(f"{item.name}: {len(item.prediction.slices)} slice(s) in "
                         f"{item.seconds:.2f} s on {item.device} (network "
                         f"{t.get('network', 0):.2f} s, retrieval {retrieval:.2f} s)")
            if kept:
                show_warning(f"Kept your unaccepted edits on slice(s) {_zs(kept)} of {item.name} "
                             "(accept them, or clear them to take the new prediction)")
            if restored:
                show_info(f"Restored your autosaved corrections of {item.name} on slice(s) "
                          f"{_zs(restored)} (saved {restored_time(item.draft)})")
        self.status.setText("\n".join(lines))
        self.gallery.show_image(self.image_combo.currentText() or None)

    def _apply(self, item: Segmented) -> tuple[list[int], list[int]]:
        """Write a prediction into the image's labels layer; returns (kept, restored) slices."""
        image = self.viewer.layers[item.name]
        ws = self.workspace
        state = self.states.get(item.name)
        shape = np.shape(image.data)
        if state is None or state.labels not in self.viewer.layers or state.labels.data.shape != shape:
            state = self._new_state(image, ws)
        edited = set(self.edited_slices(item.name))
        data, base = _as_volume(state.labels.data), _as_volume(state.baseline)
        pred = _as_volume(item.prediction.labels)
        kept = []
        self._updating = True
        try:
            for z in item.prediction.slices:
                if z in edited:
                    kept.append(z)
                else:
                    data[z] = pred[z]
                base[z] = pred[z]
                state.predicted.add(z)
            restored = []
            if item.draft is not None:
                labels, meta = item.draft
                if labels.shape == shape:
                    restored = [z for z in meta.get("edited", []) if 0 <= z < len(data)]
                    for z in restored:
                        data[z] = _as_volume(labels)[z]
            state.labels.refresh()
        finally:
            self._updating = False
        self.gallery.set_exemplars(item.name, item.prediction.exemplars, ws.class_names,
                                   retrieval=ws.model_config.use_retrieval)
        return kept, restored

    def _new_state(self, image: Image, ws: Workspace | None) -> ImageState:
        """A fresh, empty J-RAS labels layer for ``image`` and its tracked state."""
        shape = np.shape(image.data)
        state = ImageState(self._add_labels_layer(image, ws), np.zeros(shape, np.uint8),
                           draft_key(image))
        self.states[image.name] = state
        return state

    def _add_labels_layer(self, image: Image, ws: Workspace | None) -> Labels:
        """The image's empty J-RAS labels layer (the model's classes; :data:`BOX_CLASSES`
        before any model is loaded)."""
        names = list(ws.class_names) if ws is not None else list(BOX_CLASSES)
        meta = {key: image.metadata.get(key) for key in ("case_id", "patient_id", "spacing", "source")
                if key in image.metadata}
        meta.update(class_names=names, jras_image=image.name,
                    model=ws.source if ws is not None else None,
                    version=ws.active.name if ws is not None else None)
        layer = self.viewer.add_labels(
            np.zeros(np.shape(image.data), np.uint8), name=f"{image.name}{LABELS_SUFFIX}",
            scale=image.scale, translate=image.translate, axis_labels=image.axis_labels,
            colormap=class_colormap(len(names)), features=class_features(names), opacity=0.6,
            metadata=meta)
        layer.events.paint.connect(self._on_edit)
        layer.events.data.connect(self._on_edit)
        return layer

    def edited_slices(self, image_name: str) -> list[int]:
        """Slices of ``image_name`` whose labels differ from the prediction (or last accept)."""
        state = self.states.get(image_name)
        if state is None:
            return []
        data, base = _as_volume(np.asarray(state.labels.data)), _as_volume(state.baseline)
        return [int(z) for z in np.flatnonzero((data != base).reshape(len(data), -1).any(1))]

    def next_slice(self) -> None:
        """Go to the next slice; with the "current slice" scope, segment it if not done yet."""
        layer = self.current_image()
        if layer is None or layer.ndim < 3:
            return
        z = current_index(self.viewer, layer) + 1
        if z >= layer.data.shape[0]:
            show_info(f"{layer.name}: this is the last slice")
            return
        go_to_index(self.viewer, layer, z)
        state = self.states.get(layer.name)
        if self.scope_combo.currentText() == SCOPES[0] and (state is None or z not in state.predicted):
            self.segment()

    # -- propagate -------------------------------------------------------------------------
    def propagate(self, start: int | None = None) -> None:
        """Re-predict the volume outward from slice ``start`` (default: the current slice).

        ``start`` must be accepted, or painted (edited) and not yet accepted: the one-slice
        start. Accepted and edited slices are never overwritten. Without a J-RAS labels layer
        yet, an empty one is added to paint on.
        """
        layer = self.current_image()
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
        if self.workspace is None:
            show_error("Load a model first: press Segment, or pick a model under Model")
            return
        state = self.states.get(layer.name)
        z = current_index(self.viewer, layer) if start is None else int(start)
        if state is None or state.labels not in self.viewer.layers:
            self._new_state(layer, self.workspace)
            self.viewer.layers.selection.active = self.states[layer.name].labels
            show_info(f"Paint the structures on slice {z} of '{layer.name}{LABELS_SUFFIX}', "
                      "then press Propagate (or accept the slice first)")
            return
        edited = set(self.edited_slices(layer.name))
        data = _as_volume(np.asarray(state.labels.data))
        painted = {z: data[z].copy()} if z in edited else {}
        name = layer.name

        def done(result: Propagation) -> None:
            applied = self._apply_propagation(name, state, result)
            stops = ", ".join(f"{d}: {why}" for d, why in sorted(result.stopped.items()))
            what = "Cancelled after" if result.cancelled else "Propagated to"
            self.status.setText(f"{what} {len(applied)} slice(s) of {name} from slice {z} in "
                                f"{result.seconds:.2f} s ({stops})")

        self._run(propagate_job, self.workspace, np.asarray(layer.data),
                  layer.metadata.get("modality"), case_id_of(layer), z, painted,
                  sorted(edited - {z}), max(1, self.memory_spin.value()),
                  self.stop_confidence.value(), self.stop_empty.isChecked(),
                  label=f"Propagating from slice {z} of {name}", done=done,
                  progress=self._on_propagate_progress)

    def _on_propagate_progress(self, message: tuple[int, int]) -> None:
        done, total = message
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(done)

    def _apply_propagation(self, name: str, state: ImageState, result: Propagation) -> list[int]:
        """Write propagated slices into the labels layer, except slices edited meanwhile."""
        if name not in self.states or self.states[name] is not state:
            return []
        edited = set(self.edited_slices(name))
        data, base = _as_volume(state.labels.data), _as_volume(state.baseline)
        applied = [z for z in result.filled if z not in edited]
        self._updating = True
        try:
            for z in applied:
                data[z] = result.labels[z]
                base[z] = result.labels[z]
                state.predicted.add(z)
            state.labels.refresh()
        finally:
            self._updating = False
        ws = self.workspace
        self.gallery.set_exemplars(name, {z: result.exemplars[z] for z in applied},
                                   ws.class_names, retrieval=ws.model_config.use_retrieval)
        return applied

    # -- zero-training start: boxes (LiteMedSAM) -------------------------------------------
    def box_start(self) -> None:
        """Segment the current slice with LiteMedSAM from the boxes of '<image> J-RAS boxes'.

        The first click adds that Shapes layer (rectangle tool). The k-th box of the slice (in
        drawing order) paints class k, later boxes over earlier ones; no trained model is needed.
        Slices you edited or accepted are never overwritten.
        """
        target = self._box_target()
        if target is None:
            return
        layer, z = target
        name = layer.name + BOXES_SUFFIX
        if name not in self.viewer.layers:
            shapes = self.viewer.add_shapes(
                ndim=layer.ndim, name=name, scale=layer.scale, translate=layer.translate,
                face_color="transparent", edge_color="yellow", edge_width=1)
            self.viewer.layers.selection.active = shapes
            shapes.mode = "add_rectangle"
            show_info(f"Draw a box around each structure on slice {z} of '{layer.name}' (outer "
                      "structures first: box 1 paints class 1, box 2 class 2, ...), then click "
                      "Box start again")
            return
        shapes = self.viewer.layers[name]
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
        self._box_segment(layer, z, boxes, list(range(1, len(boxes) + 1)), go=False)

    def boxes_to_next_slice(self) -> None:
        """Prompt the next slice with the current slice's labels, one box per class (LiteMedSAM).

        Only fills an empty next slice (never your edits or an accepted slice), then moves there,
        so repeated clicks walk through the volume. Without a labels layer yet, an empty one is
        added to paint on.
        """
        target = self._box_target()
        if target is None:
            return
        layer, z = target
        if layer.ndim != 3:
            show_error(f"'{layer.name}' is a 2-D image: it has no next slice (use Box start)")
            return
        state = self.states.get(layer.name)
        if state is None or state.labels not in self.viewer.layers:
            self.viewer.layers.selection.active = self._new_state(layer, self.workspace).labels
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
        self._box_segment(layer, z + 1, boxes, labels, go=True)

    def _box_target(self) -> tuple[Image, int] | None:
        """The chosen image and its current slice, or None (after an error notification)."""
        layer = self.current_image()
        if layer is None:
            show_error("No image layer: open an image first")
            return None
        try:
            check_image_layer(layer)
        except DataError as exc:
            show_error(str(exc))
            return None
        return layer, current_index(self.viewer, layer)

    def _kept_slices(self, layer: Image) -> set[int]:
        """Slices a box start never writes: unaccepted edits and accepted corrections."""
        kept = set(self.edited_slices(layer.name))
        if self.workspace is not None:
            case = case_id_of(layer)
            kept |= {int(r.get("slice_index") or 0) for r in self.workspace.corrections()
                     if r["case_id"] == case}
        return kept

    def _box_segment(self, layer: Image, z: int, boxes: list[list[float]], labels: list[int],
                     go: bool) -> None:
        """Run LiteMedSAM on slice ``z`` in the background and write its labels there."""
        if z in self._kept_slices(layer):
            show_warning(f"Slice {z} of '{layer.name}' holds your edits or an accepted "
                         "correction: a box start never overwrites it")
            return
        state = self.states.get(layer.name)
        names = (state.labels.metadata.get("class_names") if state is not None else None) or (
            self.workspace.class_names if self.workspace is not None else BOX_CLASSES)
        if max(labels) >= len(names):
            show_error(f"{len(boxes)} boxes, but '{layer.name}{LABELS_SUFFIX}' has "
                       f"{len(names) - 1} classes: draw at most {len(names) - 1} boxes per slice")
            return
        image = np.asarray(layer.data)
        name = layer.name

        def done(result: np.ndarray) -> None:
            if name not in self.viewer.layers:
                return
            state = self.states.get(name)
            if (state is None or state.labels not in self.viewer.layers
                    or state.labels.data.shape != image.shape):
                state = self._new_state(layer, self.workspace)
            if z in self._kept_slices(layer):  # edited while LiteMedSAM ran
                show_warning(f"Kept your edits on slice {z} of {name}")
                return
            data, base = _as_volume(state.labels.data), _as_volume(state.baseline)
            self._updating = True
            try:
                data[z] = result
                base[z] = result
                state.predicted.add(z)
                state.labels.refresh()
            finally:
                self._updating = False
            found = sorted(set(np.unique(result)) - {0})
            self.status.setText(f"LiteMedSAM: slice {z} of {name} from {len(boxes)} box(es): "
                                f"class(es) {', '.join(map(str, found)) or 'none'}; correct, "
                                "then accept")
            if go:
                go_to_index(self.viewer, layer, z)

        self._run(box_job, image[z] if image.ndim == 3 else image, boxes, labels,
                  label=f"LiteMedSAM on slice {z} of {name}", done=done)

    # -- accept and drafts -----------------------------------------------------------------
    def accept(self) -> None:
        """Store the edited slices (or the current slice) of the chosen image in the bank."""
        layer = self.current_image()
        if layer is None:
            show_error("No image layer: open and segment an image first")
            return
        state = self.states.get(layer.name)
        if state is None:
            show_error(f"Segment '{layer.name}' first, correct the J-RAS labels, then accept")
            return
        if self.workspace is None:
            show_error("Accept stores the slice in a J-RAS model's exemplar bank (the model "
                       "embeds it): pick a model under Model first; your labels stay as they are")
            return
        zs = self.edited_slices(layer.name) or [current_index(self.viewer, layer)]
        labels = np.array(state.labels.data, copy=True)
        meta = layer.metadata
        kwargs = {"image": np.asarray(layer.data), "labels": labels,
                  "slices": zs if layer.ndim == 3 else None,
                  "modality": meta.get("modality"), "source": str(meta.get("source") or layer.name),
                  "case_id": case_id_of(layer),
                  "patient_id": meta.get("patient_id"), "author": _user()}
        name = layer.name

        def done(result: dict[str, Any]) -> None:
            if name in self.states and self.states[name] is state:
                base, new = _as_volume(state.baseline), _as_volume(labels)
                for z in zs:
                    base[z] = new[z]
                if not self.edited_slices(name):
                    self.workspace.discard_draft(state.key)
            bank = (f"the bank now holds {result['bank']} exemplars ({result['corrections']} "
                    "corrections)" if result["bank"] is not None else
                    f"{result['corrections']} corrections kept for fine-tuning")
            show_info(f"Added {len(result['ids'])} exemplar(s) from slice(s) {_zs(zs)} of {name}; "
                      f"{bank}")
            self.status.setText(f"Accepted slice(s) {_zs(zs)} of {name}")
            self.refresh_info()
            if self.auto_propagate.isChecked() and layer.ndim == 3 and name in self.states:
                start = current_index(self.viewer, layer)
                self._queued = lambda: self.propagate(start if start in zs else zs[0])
            auto = self.auto_spin.value()
            if auto and result["pending"] >= auto:
                self.finetune(auto=True)

        self._run(accept_job, self.workspace, label=f"Accepting slice(s) {_zs(zs)} of {name}",
                  done=done, **kwargs)

    def _on_edit(self, event: Any = None) -> None:
        if self._updating:
            return
        for state in self.states.values():
            if event is None or event.source is state.labels:
                state.dirty = True
        self._autosave.start()

    def save_drafts(self) -> None:
        """Autosave (in the background) every edited labels layer as a workspace draft."""
        ws = self.workspace
        if ws is None:
            return
        for name, state in self.states.items():
            if not state.dirty:
                continue
            state.dirty = False
            edited = self.edited_slices(name)
            if edited:
                meta = {"image": name, "edited": edited, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
                Task(ws.save_draft, state.key, np.array(state.labels.data, copy=True), meta,
                     pass_progress=False,
                     on_error=lambda exc: show_error(f"Autosave failed: {error_message(exc)}")).start()
            else:
                Task(ws.discard_draft, state.key, pass_progress=False).start()

    # -- fine-tuning -----------------------------------------------------------------------
    def finetune(self, auto: bool = False) -> None:
        """Fine-tune the active model on the bank in the background (corrections oversampled)."""
        ws = self.workspace
        if ws is None:
            show_error("Segment an image (or pick a model) first: there is nothing to fine-tune yet")
            return
        if self.finetune_task is not None and self.finetune_task.running:
            if not auto:
                show_info("Fine-tuning is already running")
            return
        steps = self.steps_spin.value()
        self.loss_plot.clear()
        self.finetune_progress.setRange(0, steps)
        self.finetune_progress.setValue(0)
        self.finetune_status.setText(("Automatic fine-tuning" if auto else "Fine-tuning")
                                     + f": {steps} steps ...")
        self.finetune_button.setEnabled(False)
        self.finetune_cancel.setEnabled(True)
        self._finetune_started = time.perf_counter()
        self.finetune_task = Task(
            ws.finetune, steps=steps, device=self.device_combo.currentText(),
            on_progress=self._on_finetune_progress, on_done=self._on_finetuned,
            on_error=self._on_finetune_error, on_finally=self._on_finetune_end).start()

    def cancel_finetune(self) -> None:
        """Stop the running fine-tune (the active model stays as it was)."""
        if self.finetune_task is not None and self.finetune_task.running:
            self.finetune_task.cancel()
            self.finetune_status.setText("Cancelling ...")

    def _on_finetune_progress(self, event: Progress) -> None:
        step, total, phase = event.done, event.total, event.stage
        if total:
            self.finetune_progress.setRange(0, total)
            self.finetune_progress.setValue(step)
        loss = event.metrics.get("loss")
        if loss is not None and phase in ("train", "finetune", ""):
            self.loss_plot.add_point(step, loss)
        eta = format_eta(event.eta_s)
        shown = f"  loss {loss:.4f}" if loss is not None else ""
        self.finetune_status.setText(f"{phase or 'fine-tuning'} {step}/{total}{shown}  {eta}")

    def _on_finetuned(self, version: ModelVersion) -> None:
        seconds = time.perf_counter() - self._finetune_started
        self.finetune_status.setText(f"Version {version.name} is active (fine-tuned in "
                                     f"{seconds:.0f} s)")
        show_info(f"Fine-tuning finished: version {version.name} is now active "
                  "(use Roll back to return to an earlier one)")
        self.refresh_info()

    def _on_finetune_error(self, exc: BaseException) -> None:
        if self.finetune_task is not None and self.finetune_task.cancelled:
            self.finetune_status.setText("Cancelled: the active model is unchanged")
            show_info("Fine-tuning cancelled; the active model is unchanged")
            return
        self.finetune_status.setText("Fine-tuning failed")
        show_error(f"Fine-tuning failed: {error_message(exc)}")

    def _on_finetune_end(self) -> None:
        self.finetune_button.setEnabled(True)
        self.finetune_cancel.setEnabled(False)

    def activate_version(self, name: str | None = None) -> None:
        """Make version ``name`` (default: the one chosen in the list) the active model."""
        name = name or self.version_combo.currentData()
        if self.workspace is None or not name:
            return

        def done(_: Any) -> None:
            self.status.setText(f"Version {name} is active")
            show_info(f"Version {name} is now the active model")
            self.refresh_info()

        self._run(self.workspace.activate, name, label=f"Activating version {name}", done=done)

    # -- bank and export -------------------------------------------------------------------
    def add_folder(self, folder: str | None = None) -> None:
        """Add a folder of labelled ``<name>_image`` / ``<name>_label`` pairs to the bank."""
        if self.workspace is None:
            show_error("Load a model first (Segment an image, or pick a model)")
            return
        folder = folder or QFileDialog.getExistingDirectory(self, "Folder of labelled cases")
        if not folder:
            return

        def done(result: tuple[int, int]) -> None:
            show_info(f"Added {result[0]} exemplars from {folder}; the bank now holds {result[1]}")
            self.status.setText(f"Added {result[0]} exemplars")
            self.refresh_info()

        self._run(add_folder_job, self.workspace, folder, self.device_combo.currentText(),
                  label=f"Adding {Path(folder).name} to the bank", done=done)

    def export_labels(self, path: str | None = None) -> str | None:
        """Save the chosen image's J-RAS labels (TIFF or NIfTI, with the voxel spacing)."""
        layer = self.current_image()
        labels = self.labels_layer(layer.name) if layer is not None else None
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


def restored_time(draft: tuple[np.ndarray, dict] | None) -> str:
    """When a draft was autosaved (from its metadata)."""
    return str(draft[1].get("saved", "earlier")) if draft is not None else ""


def assistant_for(viewer: Any) -> AssistantWidget:
    """The viewer's assistant, docking one when there is none."""
    viewer = unwrap(viewer)
    widget = _ASSISTANTS.get(id(viewer))
    try:
        if widget is not None and widget.viewer is viewer:
            widget.isVisible()  # raises RuntimeError when Qt already deleted it
            return widget
    except RuntimeError:
        pass
    _, widget = viewer.window.add_plugin_dock_widget("napari-jras", ASSISTANT_NAME)
    return widget


def _wrapped(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def _shrinkable(combo: QComboBox) -> QComboBox:
    """Let a combo box be narrower than its longest item (the dock stays narrow)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(8)
    return combo


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


def _zs(zs: list[int]) -> str:
    return ", ".join(str(z) for z in zs) if len(zs) <= 8 else f"{zs[0]}..{zs[-1]} ({len(zs)})"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
