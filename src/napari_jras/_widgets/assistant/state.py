"""The images the assistant segments: their J-RAS labels layers, edits and autosaved drafts."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QObject, QTimer

from ...core.errors import DataError
from ...core.modality_bank import BOX_CLASS_NAMES
from ...core.workspace import Workspace
from .._common import Task, class_colormap, class_features, error_message, show_error
from ..edits import SliceEdits, draft_key, draft_meta

AUTOSAVE_MS = 2000
LABELS_SUFFIX = " J-RAS"


@dataclass
class ImageState:
    """What the assistant tracks for one segmented image layer: its labels layer and edits."""

    labels: Labels
    edits: SliceEdits


def case_id_of(layer: Image) -> str:
    """The case id under which an image's corrections are stored (metadata, else layer name)."""
    return str(layer.metadata.get("case_id") or layer.name)


def layer_draft_key(layer: Image) -> str:
    """Autosave key of an image layer (see :func:`~napari_jras._widgets.edits.draft_key`)."""
    source = str(layer.metadata.get("source") or getattr(layer.source, "path", "") or "")
    return draft_key(layer.name, source, np.shape(layer.data))


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


class ImageStates(Mapping[str, ImageState]):
    """Image name -> :class:`ImageState` of every segmented image; autosaves edits as drafts.

    Args:
        viewer: the napari viewer.
        workspace: returns the open workspace (None before a model is loaded).
        parent: owns the autosave timer.
    """

    def __init__(self, viewer: Any, workspace: Callable[[], Workspace | None],
                 parent: QObject) -> None:
        self.viewer = viewer
        self._workspace = workspace
        self._states: dict[str, ImageState] = {}
        self._updating = False
        self.autosave = QTimer(parent)
        self.autosave.setSingleShot(True)
        self.autosave.setInterval(AUTOSAVE_MS)
        self.autosave.timeout.connect(self.save_drafts)

    def __getitem__(self, name: str) -> ImageState:
        return self._states[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def labels_layer(self, image_name: str) -> Labels | None:
        """The J-RAS labels layer of ``image_name`` (None before its first Segment)."""
        state = self._states.get(image_name)
        return state.labels if state is not None else None

    def edited_slices(self, image_name: str) -> list[int]:
        """Slices of ``image_name`` whose labels differ from the prediction (or last accept)."""
        state = self._states.get(image_name)
        return [] if state is None else state.edits.edited(np.asarray(state.labels.data))

    def shown(self, image: Image) -> ImageState | None:
        """The image's state while its labels layer is in the viewer, else None."""
        state = self._states.get(image.name)
        return state if state is not None and state.labels in self.viewer.layers else None

    def for_writing(self, image: Image, shape: tuple[int, ...] | None = None) -> ImageState:
        """The image's state, with a fresh labels layer when it has none of ``shape`` (default:
        the image's)."""
        state = self.shown(image)
        shape = np.shape(image.data) if shape is None else shape
        if state is None or state.labels.data.shape != shape:
            state = self.new(image)
        return state

    def new(self, image: Image) -> ImageState:
        """A fresh, empty J-RAS labels layer for ``image`` and its tracked state."""
        shape = np.shape(image.data)
        state = ImageState(self._add_labels_layer(image),
                           SliceEdits(np.zeros(shape, np.uint8), layer_draft_key(image)))
        self._states[image.name] = state
        return state

    def forget(self, layer: Any) -> list[str]:
        """Drop the states of a removed layer (an image or its labels); returns their names."""
        gone = [name for name, state in self._states.items()
                if layer is state.labels or layer.name == name]
        for name in gone:
            self._states.pop(name)
        return gone

    def name_of(self, labels: Labels) -> str | None:
        """The image whose J-RAS labels layer ``labels`` is (None for other layers)."""
        return next((name for name, s in self._states.items() if s.labels is labels), None)

    @contextmanager
    def writing(self, state: ImageState) -> Iterator[np.ndarray]:
        """Write into ``state``'s labels (yielded) without counting it as the person's edit."""
        self._updating = True
        try:
            yield state.labels.data
            state.labels.refresh()
        finally:
            self._updating = False

    def _add_labels_layer(self, image: Image) -> Labels:
        """The image's empty J-RAS labels layer: the model's classes, or before any model is
        loaded :data:`~napari_jras.core.modality_bank.BOX_CLASS_NAMES`."""
        ws = self._workspace()
        names = list(ws.class_names) if ws is not None else list(BOX_CLASS_NAMES)
        meta = {key: image.metadata.get(key)
                for key in ("case_id", "patient_id", "spacing", "source") if key in image.metadata}
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

    def _on_edit(self, event: Any = None) -> None:
        if self._updating:
            return
        for state in self._states.values():
            if event is None or event.source is state.labels:
                state.edits.dirty = True
        self.autosave.start()

    def save_drafts(self) -> None:
        """Autosave (in the background) every edited labels layer as a workspace draft."""
        ws = self._workspace()
        if ws is None:
            return
        for name, state in self._states.items():
            if not state.edits.dirty:
                continue
            state.edits.dirty = False
            edited = self.edited_slices(name)
            if edited:
                Task(ws.save_draft, state.edits.key, np.array(state.labels.data, copy=True),
                     draft_meta(name, edited), pass_progress=False,
                     on_error=lambda exc: show_error(f"Autosave failed: {error_message(exc)}")
                     ).start()
            else:
                Task(ws.discard_draft, state.edits.key, pass_progress=False).start()
