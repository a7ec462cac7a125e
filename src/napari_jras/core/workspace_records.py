"""What a workspace records and hands out: its weight versions and snapshots of its exemplars.

Shared by :mod:`.workspace` (which keeps them) and :mod:`.finetune` (which reads a snapshot and
adds a version), so that neither imports the other's internals.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VERSIONS_DIR = "versions"
VERSION_NAME = re.compile(r"^v\d{1,9}$")  # names of folders under versions/
CORRECTION = "correction"
"""Origin of an exemplar that is an accepted correction (fine-tuning oversamples them)."""


@dataclass
class ModelVersion:
    """One set of weights; ``seen_until`` is the last exemplar id it was trained on."""

    name: str
    path: Path
    created: str
    parent: str | None = None
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    seen_until: int = 0

    def to_json(self) -> dict[str, Any]:
        """Entry of ``workspace.json`` (the path is implied by the name)."""
        data = asdict(self)
        del data["path"]
        return data


@dataclass
class ExemplarSnapshot:
    """Every stored exemplar of a workspace and its active version, read at one instant.

    ``records`` are the exemplars' ids and provenance; ``ids`` (N,), ``images`` (N,H,W, float32
    in [0, 1]) and ``masks`` (N,H,W, uint8) their pixels at the bank's size; both by id.
    """

    active: ModelVersion
    records: list[dict[str, Any]]
    ids: np.ndarray
    images: np.ndarray
    masks: np.ndarray
