"""Shared widget helpers: notifications, background jobs, class colours, small formatters."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from napari.utils import notifications
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLayout,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import JRASError
from ..core.progress import Progress

log = logging.getLogger(__name__)

CLASS_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4",
                "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000")
"""Colours of classes 1, 2, ... (background is transparent), shared by layers and thumbnails."""

DEVICES = ("auto", "cpu", "cuda")


def class_color(index: int) -> str:
    """Hex colour of class ``index`` (>= 1)."""
    return CLASS_COLORS[(index - 1) % len(CLASS_COLORS)]


def class_colormap(num_classes: int) -> DirectLabelColormap:
    """napari labels colour map: transparent background, :data:`CLASS_COLORS` for the classes."""
    colors: dict[int | None, Any] = {None: "transparent", 0: "transparent"}
    colors.update({c: class_color(c) for c in range(1, num_classes)})
    return DirectLabelColormap(color_dict=colors)


def class_features(class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Labels ``features`` table so napari's status bar names the class under the cursor."""
    return {"index": np.arange(len(class_names)), "class": np.asarray(list(class_names), dtype=object)}


def legend_html(class_names: Sequence[str]) -> str:
    """Rich-text legend of the foreground classes in their colours."""
    items = [f'<span style="color:{class_color(i)}">&#9632;</span>&nbsp;{i} {name}'
             for i, name in enumerate(class_names) if i > 0]
    return "&nbsp;&nbsp; ".join(items)


def error_message(exc: BaseException) -> str:
    """What a person should read for ``exc``: our own errors as is, others with their type."""
    if isinstance(exc, JRASError):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}): {exc}"


def show_error(message: str) -> None:
    """Error notification (napari's notification manager: pop-up + log)."""
    notifications.show_error(message)


def show_warning(message: str) -> None:
    """Warning notification."""
    notifications.show_warning(message)


def show_info(message: str) -> None:
    """Information notification."""
    notifications.show_info(message)


def format_eta(seconds: float | None) -> str:
    """``1 min 05 s`` style remaining time, empty when unknown."""
    if seconds is None or not np.isfinite(seconds):
        return ""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min left"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s left"
    return f"{seconds} s left"


class Relay(QObject):
    """Carries progress messages from a worker thread to the Qt main thread (queued signal)."""

    message = Signal(object)


class Task:
    """A cancellable background job: ``func(*args, progress=..., cancel=..., **kwargs)``.

    Runs in a napari thread worker; ``on_progress`` receives the progress messages in the main
    thread, ``on_done`` the return value, errors become error notifications (and ``on_error``).
    ``on_finally`` always runs last in the main thread.
    """

    def __init__(self, func: Callable[..., Any], *args: Any,
                 on_done: Callable[[Any], None] | None = None,
                 on_progress: Callable[[Any], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_finally: Callable[[], None] | None = None,
                 pass_progress: bool = True, **kwargs: Any) -> None:
        from napari.qt.threading import create_worker

        self._cancel = threading.Event()
        self.relay = Relay()
        if on_progress is not None:
            self.relay.message.connect(on_progress)
        if pass_progress:
            kwargs.update(progress=self.relay.message.emit, cancel=self._cancel.is_set)
        self.error: BaseException | None = None
        self.running = True
        self.worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        if on_done is not None:
            self.worker.returned.connect(on_done)

        def errored(exc: BaseException) -> None:
            self.error = exc
            if not isinstance(exc, JRASError):
                log.error("napari-jras background task failed", exc_info=exc)
            if on_error is not None:
                on_error(exc)
            else:
                show_error(error_message(exc))

        def finished() -> None:
            self.running = False
            if on_finally is not None:
                on_finally()

        self.worker.errored.connect(errored)
        self.worker.finished.connect(finished)

    def start(self) -> Task:
        """Start the worker thread."""
        self.worker.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next check."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancel.is_set()


class JobSlot:
    """One background job at a time, shown by its own widgets.

    Starting a job disables the ``buttons`` that start jobs here, enables ``cancel``, resets the
    progress bar and writes a status line; an error becomes the status "<label> failed" and an
    error notification (a cancelled job's error: ``cancelled_status``); at the end the buttons
    come back and Cancel goes grey. Used by every job of the assistant and the training panel.

    Args:
        cancel: the Cancel button (clicking it cancels the running job).
        progress: the progress bar.
        status: the status label.
        buttons: disabled while a job runs.
        full_at_end: show a full bar when a job ends (else it stays where the job left it).
        cancelling: the status shown when Cancel is clicked (None: unchanged).
    """

    def __init__(self, cancel: QPushButton, progress: QProgressBar, status: QLabel,
                 buttons: Sequence[QPushButton] = (), full_at_end: bool = False,
                 cancelling: str | None = None) -> None:
        self.cancel_button, self.progress, self.status = cancel, progress, status
        self.buttons = tuple(buttons)
        self.full_at_end = full_at_end
        self.cancelling = cancelling
        self.task: Task | None = None
        cancel.setEnabled(False)
        cancel.clicked.connect(self.cancel)

    @property
    def running(self) -> bool:
        """True while a job runs."""
        return self.task is not None and self.task.running

    def cancel(self) -> None:
        """Ask the running job to stop at its next check."""
        if self.running:
            self.task.cancel()
            if self.cancelling is not None:
                self.status.setText(self.cancelling)

    def show_progress(self, event: Progress) -> None:
        """Show ``done`` of ``total`` on the progress bar."""
        self.progress.setRange(0, max(1, event.total))
        self.progress.setValue(event.done)

    def start(self, func: Callable[..., Any], *args: Any, label: str,
              on_done: Callable[[Any], None], status: str | None = None, total: int = 0,
              on_progress: Callable[[Progress], None] | None = None,
              on_finally: Callable[[], None] | None = None,
              cancelled_status: str | None = "Cancelled", cancelled_info: str | None = None,
              **kwargs: Any) -> Task:
        """Run ``func(*args, **kwargs)`` in the background.

        Args:
            func: the job; it also receives ``progress`` and ``cancel`` when ``on_progress``
                is given.
            *args: its positional arguments.
            label: what runs, for the status and error texts ("Segmenting x").
            on_done: receives the job's return value.
            status: the status while it runs (default ``"<label> ..."``).
            total: the progress bar's maximum at the start (0: a busy indicator).
            on_progress: receives the job's :class:`Progress` events in the main thread.
            on_finally: runs last, after success, error or cancel.
            cancelled_status: the status when a cancelled job raised (None: report it as
                a failure).
            cancelled_info: a notification for that case (None: none).
            **kwargs: the job's keyword arguments.

        Returns:
            The started :class:`Task`.
        """
        self.status.setText(status if status is not None else f"{label} ...")
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        for button in self.buttons:
            button.setEnabled(False)
        self.cancel_button.setEnabled(True)

        def failed(exc: BaseException) -> None:
            if self.task is not None and self.task.cancelled and cancelled_status is not None:
                self.status.setText(cancelled_status)
                if cancelled_info:
                    show_info(cancelled_info)
                return
            self.status.setText(f"{label} failed")
            show_error(f"{label} failed: {error_message(exc)}")

        def finished() -> None:
            if self.full_at_end:
                self.progress.setRange(0, 1)
                self.progress.setValue(1)
            for button in self.buttons:
                button.setEnabled(True)
            self.cancel_button.setEnabled(False)
            if on_finally is not None:
                on_finally()

        self.task = Task(func, *args, on_done=on_done, on_error=failed, on_finally=finished,
                         on_progress=on_progress, pass_progress=on_progress is not None,
                         **kwargs).start()
        return self.task


def current_index(viewer: Any, layer: Any) -> int:
    """Index of ``layer``'s Z slice under the viewer's slider (0 for 2-D layers)."""
    if layer.ndim < 3:
        return 0
    z = round(float(layer.world_to_data(viewer.dims.point)[0]))
    return int(np.clip(z, 0, layer.data.shape[0] - 1))


def go_to_index(viewer: Any, layer: Any, z: int) -> None:
    """Move the viewer's Z slider to ``layer``'s slice ``z``."""
    position = np.zeros(layer.ndim)
    position[0] = z
    world = layer.data_to_world(position)
    viewer.dims.set_point(viewer.dims.ndim - layer.ndim, float(world[0]))


def unwrap(viewer: Any) -> Any:
    """The real viewer behind napari's ``PublicOnlyProxy`` (widgets compare layers by identity)."""
    return getattr(viewer, "__wrapped__", viewer)


def wrapped_label(text: str) -> QLabel:
    """A word-wrapped label."""
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def shrinkable(combo: QComboBox) -> QComboBox:
    """Let a combo box be narrower than its longest item (the dock stays narrow)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(8)
    return combo


def button_row(*widgets: QWidget) -> QHBoxLayout:
    """The widgets side by side."""
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


def stack(parent: QWidget, *items: QWidget | QLayout) -> QVBoxLayout:
    """Lay ``items`` (widgets or layouts) out top to bottom in ``parent``."""
    layout = QVBoxLayout(parent)
    for item in items:
        if isinstance(item, QLayout):
            layout.addLayout(item)
        else:
            layout.addWidget(item)
    return layout


def form(*rows: tuple[str, QWidget]) -> QFormLayout:
    """A form of labelled rows."""
    layout = QFormLayout()
    for label, widget in rows:
        layout.addRow(label, widget)
    return layout
