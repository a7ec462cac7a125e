"""Exemplar gallery: the retrieved exemplars behind the prediction of the slice on screen."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QColor, QIcon, QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QLabel, QToolButton, QVBoxLayout, QWidget

from ..core.prediction import RetrievedExemplar
from ..core.workspace import OWN_CORRECTION
from ._common import class_color, class_colormap, class_features, current_index

THUMB = 120
OWN_BORDER = "QToolButton { border: 2px solid #3cb44b; border-radius: 4px; }"
"""Tiles of the user's own corrections stand out from training exemplars."""


def overlay_rgb(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the grey image (values in [0, 1]) with the mask blended in class colours."""
    img = np.clip(np.asarray(image, np.float32), 0, 1)
    rgb = np.repeat((img * 255)[..., None], 3, axis=-1)
    mask = np.asarray(mask)
    for c in np.unique(mask):
        if c == 0:
            continue
        col = QColor(class_color(int(c)))
        sel = mask == c
        rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.array([col.red(), col.green(), col.blue()])
    return np.ascontiguousarray(rgb.astype(np.uint8))


def to_pixmap(rgb: np.ndarray, size: int = THUMB) -> QPixmap:
    """QPixmap of an (H, W, 3) uint8 array, scaled to fit ``size`` x ``size``."""
    h, w, _ = rgb.shape
    qimg = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(qimg).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                          Qt.TransformationMode.SmoothTransformation)


def is_own(ex: RetrievedExemplar) -> bool:
    """True for one of the user's own slices of the same volume (same-volume memory)."""
    return ex.id < 0 and ex.record.get("origin") == OWN_CORRECTION


def ago(created: str | None, now: datetime | None = None) -> str:
    """``just now``, ``2 min ago``, ``3 h ago`` or the date, from an ISO time stamp."""
    try:
        then = datetime.fromisoformat(str(created))
    except ValueError:
        return "earlier"
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    seconds = ((now or datetime.now(timezone.utc)) - then).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return then.date().isoformat()


def own_text(ex: RetrievedExemplar) -> str:
    """``your correction, slice 4, 2 min ago`` (or ``..., painted, not accepted``)."""
    r = ex.record
    when = "painted, not accepted" if r.get("not_accepted") else ago(r.get("created"))
    return f"{OWN_CORRECTION}, slice {r.get('slice_index', '?')}, {when}"


def provenance(record: dict[str, Any]) -> str:
    """``case p1, slice 3, training`` from a bank record."""
    parts = [str(record.get("case_id") or record.get("source") or "?")]
    if record.get("slice_index") is not None:
        parts.append(f"slice {record['slice_index']}")
    parts.append(str(record.get("origin", "?")))
    return ", ".join(parts)


def tile_text(ex: RetrievedExemplar, width: int = 20) -> str:
    """Three short lines under a thumbnail: id, similarity, weight / case / slice and origin.

    The user's own corrections read ``your correction, slice 4, 2 min ago`` instead.
    """
    r = ex.record
    if is_own(ex):
        first, _, rest = own_text(ex).partition(", ")
        return f"{first}  w {ex.weight:.2f}\n{rest}\nscore {ex.score:.2f}, {r.get('dz', 0):+d} slices"
    if ex.id < 0:  # a diagnostic memory (neighbour / oracle) or a first-pass prediction
        return (f"{r.get('origin', '?')}  w {ex.weight:.2f}\nslice {r.get('slice_index', '?')}\n"
                f"score {ex.score:.2f}")
    case = str(r.get("case_id") or r.get("source") or "?")
    case = case if len(case) <= width else case[:width - 1] + "\u2026"
    return (f"#{ex.id}  sim {ex.score:.3f}  w {ex.weight:.2f}\n{case}\n"
            f"slice {r.get('slice_index', '?')}, {r.get('origin', '?')}")


class ExemplarGallery(QWidget):
    """Thumbnails of the K exemplars retrieved for the current slice of the shown image.

    Follows the viewer's Z slider; clicking a thumbnail opens the exemplar as an image +
    labels layer pair. :meth:`set_exemplars` gives it a prediction's exemplars per image.
    """

    opened = Signal(object)  # the RetrievedExemplar opened as layers

    def __init__(self, viewer: Any, columns: int = 2, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.columns = columns
        self._exemplars: dict[str, dict[int, list[RetrievedExemplar]]] = {}
        self._class_names: dict[str, list[str]] = {}
        self._baseline: set[str] = set()  # images predicted by a model without retrieval
        self._image: str | None = None
        self._shown: tuple | None = None
        self.tiles: list[QToolButton] = []
        self.header = QLabel("Segment an image to see the exemplars J-RAS retrieved.")
        self.header.setWordWrap(True)
        self._grid = QGridLayout()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.header)
        layout.addLayout(self._grid)
        viewer.dims.events.current_step.connect(self._on_step)

    # -- data ------------------------------------------------------------------------------
    def set_exemplars(self, image_name: str, exemplars: dict[int, list[RetrievedExemplar]],
                      class_names: Sequence[str], retrieval: bool = True) -> None:
        """Store (merge) the exemplars of ``image_name``'s predicted slices and show that image.

        ``retrieval=False`` (a baseline model) says that there are no exemplars to show.
        """
        self._exemplars.setdefault(image_name, {}).update(exemplars)
        self._class_names[image_name] = list(class_names)
        if retrieval:
            self._baseline.discard(image_name)
        else:
            self._baseline.add(image_name)
        self.show_image(image_name)

    def forget(self, image_name: str) -> None:
        """Drop what is stored for ``image_name`` (its layer was removed)."""
        self._exemplars.pop(image_name, None)
        self._baseline.discard(image_name)
        if self._image == image_name:
            self._image = None
            self.refresh()

    def show_image(self, image_name: str | None) -> None:
        """Show the exemplars of ``image_name``'s current slice."""
        self._image = image_name
        self.refresh()

    def exemplars_for(self, image_name: str, z: int) -> list[RetrievedExemplar]:
        """Exemplars stored for slice ``z`` of ``image_name``."""
        return list(self._exemplars.get(image_name, {}).get(z, []))

    def current_slice(self) -> int | None:
        """Index of the shown image's slice under the Z slider (0 for 2-D images)."""
        if self._image is None or self._image not in self.viewer.layers:
            return None
        return current_index(self.viewer, self.viewer.layers[self._image])

    # -- display ---------------------------------------------------------------------------
    def _on_step(self, event: Any = None) -> None:
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        """Rebuild the thumbnails when the image or slice changed (or ``force``)."""
        z = self.current_slice()
        items = self.exemplars_for(self._image, z) if self._image is not None and z is not None else []
        key = (self._image, z, self._image in self._baseline,
               tuple((e.id, e.score, e.weight) for e in items))
        if key == self._shown and not force:
            return
        self._shown = key
        for tile in self.tiles:
            self._grid.removeWidget(tile)
            tile.setParent(None)
            tile.deleteLater()
        self.tiles = []
        if self._image is None:
            self.header.setText("Segment an image to see the exemplars J-RAS retrieved.")
            return
        if self._image in self._baseline:
            self.header.setText("This model is a baseline without retrieval: no exemplars.")
            return
        if not items:
            self.header.setText(f"Slice {z}: not predicted yet (press Segment).")
            return
        own = sum(1 for ex in items if is_own(ex))
        mine = f", {own} of them your own correction(s) (green)" if own else ""
        self.header.setText(f"Slice {z}: the {len(items)} exemplars fused into the "
                            f"prediction{mine} (click one to open it)")
        for i, ex in enumerate(items):
            tile = QToolButton()
            tile.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextUnderIcon)
            tile.setIcon(QIcon(to_pixmap(overlay_rgb(ex.image, ex.mask))))
            tile.setIconSize(QSize(THUMB, THUMB))
            tile.setText(tile_text(ex))
            tile.setToolTip(self._tooltip(ex))
            tile.setProperty("origin", ex.record.get("origin"))
            if is_own(ex):
                tile.setStyleSheet(OWN_BORDER)
            tile.clicked.connect(lambda _=False, ex=ex: self.open_exemplar(ex))
            self._grid.addWidget(tile, i // self.columns, i % self.columns)
            self.tiles.append(tile)

    @staticmethod
    def _tooltip(ex: RetrievedExemplar) -> str:
        r = ex.record
        if ex.id < 0:
            rows = [own_text(ex) if is_own(ex) else str(r.get("origin", "?")),
                    f"memory score {ex.score:.3f} ({r.get('dz', 0):+d} slices from this one)",
                    f"fusion weight {ex.weight:.3f}", f"case {r.get('case_id', '?')}"]
            return "\n".join(rows + [f"{k} {r[k]}" for k in ("author", "created") if r.get(k)])
        rows = [f"exemplar #{ex.id}", f"cosine similarity {ex.score:.3f}",
                f"fusion weight {ex.weight:.3f}", f"case {r.get('case_id', '?')}",
                f"patient {r.get('patient_id', '?')}", f"slice {r.get('slice_index', '?')}",
                f"origin {r.get('origin', '?')}", f"source {r.get('source', '')}"]
        rows += [f"{k} {r[k]}" for k in ("author", "created") if r.get(k)]
        return "\n".join(rows)

    def open_exemplar(self, ex: RetrievedExemplar) -> None:
        """Add the exemplar's image and mask to the viewer as a layer pair."""
        names = self._class_names.get(self._image or "", [])
        n = max(len(names), int(ex.mask.max()) + 1)
        title = (f"exemplar ({own_text(ex)})" if is_own(ex) else
                 f"exemplar #{ex.id} ({provenance(ex.record)})")
        self.viewer.add_image(ex.image, name=title, colormap="gray", contrast_limits=(0.0, 1.0),
                              metadata={"exemplar": dict(ex.record), "exemplar_id": ex.id})
        kwargs: dict[str, Any] = {"name": f"{title} mask", "colormap": class_colormap(n),
                                  "opacity": 0.5, "metadata": {"class_names": names or None}}
        if names:
            kwargs["features"] = class_features(names)
        self.viewer.add_labels(ex.mask, **kwargs)
        self.opened.emit(ex)
