"""Exemplars panel: why the model predicted what it did (the retrieved exemplars of the slice)."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QGroupBox

from .._common import stack
from ..gallery import ExemplarGallery


class ExemplarsPanel(QGroupBox):
    """The exemplar gallery of the slice under the Z slider (see :class:`ExemplarGallery`)."""

    def __init__(self, viewer: Any) -> None:
        super().__init__("Why: the retrieved exemplars")
        self.gallery = ExemplarGallery(viewer)
        stack(self, self.gallery)
