"""The J-RAS assistant dock: a thin composition of small panels.

The panels (:mod:`.segment`, :mod:`.boxes`, :mod:`.exemplars`, :mod:`.correct`, :mod:`.learn`,
:mod:`.bank`) hold their widgets and actions; the dock owns what they share: the viewer, the open
:class:`~napari_jras.core.workspace.Workspace`, the segmented images (:class:`.ImageStates`), the
one-at-a-time job slot with its status line, progress bar and Cancel button, the layer events
and the keyboard shortcuts. All compute runs in Qt-free jobs (:mod:`napari_jras._widgets.jobs`)
on worker threads; the panels only move arrays between napari layers and those jobs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QProgressBar, QPushButton, QScrollArea, QVBoxLayout, QWidget

from ...core.bank import ExemplarBank
from ...core.workspace import BUILTIN, Workspace
from .._common import JobSlot, legend_html, show_info, show_warning, unwrap
from .bank import BankPanel
from .boxes import BoxesPanel
from .correct import CorrectPanel
from .exemplars import ExemplarsPanel
from .learn import LearnPanel
from .segment import SegmentPanel
from .state import ImageStates

if TYPE_CHECKING:
    import napari

ASSISTANT_NAME = "J-RAS assistant"
SHORTCUTS = {"Shift-S": "segment", "Shift-D": "accept", "Shift-N": "next_slice",
             "Shift-P": "propagate"}
"""Viewer key bindings: segment, accept the corrected slices, go to (and segment) the next slice,
propagate the accepted (or painted) slice to the rest of the volume (methods of the dock)."""

_ASSISTANTS: weakref.WeakValueDictionary[int, AssistantWidget] = weakref.WeakValueDictionary()


class AssistantWidget(QWidget):
    """Dock widget: segment images with J-RAS, show the exemplars, learn from corrections.

    Its panels are ``segment_panel``, ``boxes_panel``, ``exemplars_panel``, ``correct_panel``,
    ``learn_panel`` and ``bank_panel``; the shortcut actions (:data:`SHORTCUTS`) are also
    methods of the dock.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = unwrap(viewer)
        self.workspace: Workspace | None = None
        self.modality_bank: ExemplarBank | None = None  # where Accept stores without a model
        self.source = BUILTIN
        self.states = ImageStates(self.viewer, lambda: self.workspace, self)
        self._queued: Callable[[], None] | None = None
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setMaximumHeight(12)
        self.progress.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.jobs = JobSlot(self.cancel_button, self.progress, self.status, full_at_end=True)
        self.segment_panel = SegmentPanel(self)
        self.boxes_panel = BoxesPanel(self)
        self.exemplars_panel = ExemplarsPanel(self.viewer)
        self.correct_panel = CorrectPanel(self)
        self.learn_panel = LearnPanel(self)
        self.bank_panel = BankPanel(self)
        self._layout()
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

    def _layout(self) -> None:
        content = QWidget()
        layout = QVBoxLayout(content)
        for panel in (self.segment_panel, self.boxes_panel, self.exemplars_panel,
                      self.correct_panel, self.learn_panel, self.bank_panel):
            layout.addWidget(panel)
        layout.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        self.setMinimumWidth(360)

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

    # -- the shortcut actions ----------------------------------------------------------------
    def segment(self) -> None:
        """Segment the chosen scope (see :meth:`.SegmentPanel.segment`)."""
        self.segment_panel.segment()

    def next_slice(self) -> None:
        """Go to (and maybe segment) the next slice (see :meth:`.SegmentPanel.next_slice`)."""
        self.segment_panel.next_slice()

    def accept(self) -> None:
        """Accept the corrected slices (see :meth:`.CorrectPanel.accept`)."""
        self.correct_panel.accept()

    def propagate(self, start: int | None = None) -> None:
        """Propagate from slice ``start`` (see :meth:`.CorrectPanel.propagate`)."""
        self.correct_panel.propagate(start)

    # -- layers ----------------------------------------------------------------------------
    def image_layers(self) -> list[Image]:
        """Image layers of the viewer (J-RAS exemplar layers excluded)."""
        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and "exemplar_id" not in layer.metadata]

    def current_image(self) -> Image | None:
        """The image layer chosen in the Segment panel."""
        try:
            return self.viewer.layers[self.segment_panel.image_combo.currentText()]
        except KeyError:
            return None

    def _on_layers_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        self.segment_panel.set_images([layer.name for layer in self.image_layers()])

    def _on_layer_removed(self, event: Any) -> None:
        for name in self.states.forget(event.value):
            self.exemplars_panel.gallery.forget(name)
        self._on_layers_changed()

    def _on_active_layer(self, event: Any) -> None:
        layer = event.value
        if isinstance(layer, Image):
            self.segment_panel.choose_image(layer.name)
        elif isinstance(layer, Labels):
            name = self.states.name_of(layer)
            if name is not None:
                self.segment_panel.image_combo.setCurrentText(name)

    # -- model and jobs --------------------------------------------------------------------
    def set_model_source(self, source: str | Path) -> None:
        """Use the built-in model (:data:`BUILTIN`) or a run folder; loads it in the background."""
        source = str(source)
        slots = (("fine-tuning", self.learn_panel.jobs), ("J-RAS", self.jobs))
        busy = [what for what, slot in slots if slot.running]
        if busy:
            show_warning(f"Wait for {busy[0]} to finish (or cancel it) before changing the model")
            self.segment_panel.select_source(self.source)
            return
        self.segment_panel.select_source(source)
        if source == self.source and self.workspace is not None:
            return
        if self.workspace is not None:
            self.workspace.close()
        self.workspace, self.source = None, source
        self.refresh_info()
        self.learn_panel.version_combo.clear()
        self.run(Workspace.open, source, label="Loading the model",
                 done=lambda ws: self.status.setText(f"Model ready: version {ws.active.name}"))

    def run(self, func: Callable[..., Any], *args: Any, label: str,
            done: Callable[[Any], None], progress: bool = False, **kwargs: Any) -> bool:
        """Run a workspace job in the background, one at a time (the model cannot change
        meanwhile); False when busy.

        Args:
            func: the job (see :mod:`napari_jras._widgets.jobs`).
            *args: its arguments.
            label: what runs, for the status line and errors.
            done: receives the job's result in the main thread.
            progress: the job reports :class:`~napari_jras.core.progress.Progress` events
                (it receives ``progress`` and ``cancel``).
            **kwargs: its keyword arguments.

        Returns:
            True when the job started.
        """
        if self.jobs.running:
            show_info(f"J-RAS is busy ({self.status.text() or 'working'}); try again in a moment")
            return False

        def finished(result: Any) -> None:
            # jobs that open the workspace return it (alone or first in a tuple)
            ws = result[0] if isinstance(result, tuple) and isinstance(result[0], Workspace) else (
                result if isinstance(result, Workspace) else None)
            if ws is not None and self.workspace is None:
                self._adopt(ws)
            done(result)

        def then() -> None:
            queued, self._queued = self._queued, None
            if queued is not None:
                queued()

        self.jobs.start(func, *args, label=label, on_done=finished, on_finally=then,
                        on_progress=self.jobs.show_progress if progress else None, **kwargs)
        return True

    def queue(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the current job has ended."""
        self._queued = action

    def _adopt(self, ws: Workspace) -> None:
        self.workspace = ws
        self.segment_panel.legend.setText(legend_html(ws.class_names))
        self.bank_panel.add_folder_button.setEnabled(ws.bank is not None)
        self.refresh_info()

    def refresh_info(self) -> None:
        """Update the model/bank summary and the version list."""
        self.bank_panel.refresh(self.workspace, self.source)
        if self.workspace is not None:
            self.learn_panel.refresh_versions(self.workspace)


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
