"""A tiny line plot drawn with QPainter (no matplotlib): live loss curves."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

SERIES_COLORS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373")


class LossPlot(QWidget):
    """Line plot of one or more named series of (step, value) points, auto-scaled."""

    def __init__(self, title: str = "loss", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self._series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self) -> None:
        """Remove every point."""
        self._series.clear()
        self.update()

    def add_point(self, step: float, value: float, series: str = "loss") -> None:
        """Append a point to ``series`` (non-finite values are skipped) and repaint."""
        if value is None or not math.isfinite(float(value)):
            return
        self._series.setdefault(series, []).append((float(step), float(value)))
        self.update()

    def points(self, series: str = "loss") -> list[tuple[float, float]]:
        """The points of ``series`` (a copy)."""
        return list(self._series.get(series, []))

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), QColor("#262930"))
        fm = painter.fontMetrics()
        left, top, right, bottom = fm.horizontalAdvance("0.000") + 8, fm.height() + 4, 8, fm.height() + 4
        area = QRectF(left, top, max(1, self.width() - left - right),
                      max(1, self.height() - top - bottom))
        painter.setPen(QPen(QColor("#5a5f6a"), 1))
        painter.drawRect(area)
        points = [p for pts in self._series.values() for p in pts]
        painter.setPen(QColor("#d0d4da"))
        if not points:
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, f"{self.title}: no data yet")
            painter.end()
            return
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1 = x1 if x1 > x0 else x0 + 1
        pad = (y1 - y0) * 0.05 or max(abs(y1) * 0.05, 1e-3)
        y0, y1 = y0 - pad, y1 + pad

        def to_px(x: float, y: float) -> QPointF:
            return QPointF(area.left() + (x - x0) / (x1 - x0) * area.width(),
                           area.bottom() - (y - y0) / (y1 - y0) * area.height())

        painter.drawText(QPointF(2, area.top() + fm.ascent()), f"{y1:.3g}")
        painter.drawText(QPointF(2, area.bottom()), f"{y0:.3g}")
        painter.drawText(QPointF(area.left(), self.height() - 3), f"{x0:g}")
        last = f"{x1:g}"
        painter.drawText(QPointF(area.right() - fm.horizontalAdvance(last), self.height() - 3), last)
        legend = []
        for i, (name, pts) in enumerate(self._series.items()):
            color = QColor(SERIES_COLORS[i % len(SERIES_COLORS)])
            painter.setPen(QPen(color, 1.6))
            if len(pts) == 1:
                painter.drawEllipse(to_px(*pts[0]), 2.5, 2.5)
            else:
                painter.drawPolyline(QPolygonF([to_px(x, y) for x, y in pts]))
            legend.append((color, f"{name} {pts[-1][1]:.4g}"))
        x = area.left()
        for color, text in [(QColor("#d0d4da"), self.title), *legend]:
            painter.setPen(color)
            painter.drawText(QPointF(x, fm.ascent() + 1), text)
            x += fm.horizontalAdvance(text) + 10
        painter.end()
