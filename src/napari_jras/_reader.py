"""napari reader: medical images opened together with their labels.

Handled paths (anything else gets ``None`` so napari tries its other readers):

* a NIfTI file (``.nii``, ``.nii.gz``): image layer with the voxel spacing as ``scale``, plus a
  labels layer when a ``<stem>_label`` sibling exists. A file named ``*_label.*`` or kept in a
  ``labels*`` folder (nnU-Net ``labelsTr``) opens as a labels layer;
* a ``<stem>_image.tif/tiff/png`` file whose ``<stem>_label`` sibling exists;
* a folder in the paired layout (``<stem>_image.<ext>`` + ``<stem>_label.<ext>``, searched
  recursively) or an nnU-Net folder (``imagesTr/`` + ``labelsTr/``): one image + labels pair per
  case, at most :data:`MAX_CASES` (only the first pair visible).

Layers are named after the case, have ``axis_labels`` ("z", "y", "x") and ``scale`` = spacing
when known; layers made from them (predictions) should copy ``scale`` and ``axis_labels``.
Layers carry, in ``layer.metadata``: ``case_id``, ``patient_id``, ``source`` (file path),
``spacing`` (Z, Y, X in mm, or None) and, on labels layers, ``class_names`` (list, index = class
value, or None when unknown). Labels layers with known class names also get a ``features``
table (``index``, ``class``) so napari's status bar shows the class under the cursor.

All reading goes through :mod:`napari_jras.core.io`; this module imports neither Qt nor torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import DataError
from .core.io import (
    IMAGE_EXTENSIONS,
    Case,
    check_label,
    find_cases,
    load_case,
    patient_of,
    read_volume,
    split_extension,
)

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]

MAX_CASES = 20
"""Most cases a folder opens as layers; the rest are skipped with a warning."""

ACDC_CLASS_NAMES = ("background", "right ventricle", "myocardium", "left ventricle")
_ACDC_CASE = re.compile(r"^patient\d{3}_frame\d{2}$")
_NIFTI = (".nii", ".nii.gz")
_PAIRED_2D = (".tif", ".tiff", ".png")
_SCAN_LIMIT = 5000  # directory entries looked at before deciding a folder is not a dataset
_SCAN_DEPTH = 3


# --------------------------------------------------------------------------- reader hook
def napari_get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_paths` when every path is one napari-jras handles, else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path or [])
    if not paths or not all(_handles(p) for p in paths):
        return None
    return read_paths


def read_paths(path: str | Sequence[str]) -> list[LayerData]:
    """Read one or several handled paths into napari layer data (image, then labels)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers.extend(read_path(p, first_visible=not layers))
    return layers


def read_path(path: str | os.PathLike, first_visible: bool = True) -> list[LayerData]:
    """Layer data for one NIfTI file, ``_image`` file or dataset folder.

    Raises :class:`DataError` when nothing could be read (a single file that is damaged, an
    image and label of different shapes, a folder whose cases all fail, ...).
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, first_visible)
    stem, ext = split_extension(path)
    if ext in _NIFTI and _is_label_file(path):
        volume = read_volume(path)
        label = check_label(volume.data, source=path.name)
        case_id = stem.removesuffix("_label")
        return [labels_layer_data(label, case_id, spacing=volume.spacing, source=str(path),
                                  class_names=_class_names(path.parent, case_id, label))]
    case = find_cases(path, require_labels=False)[0]
    return _case_layers(case, _class_names_source(path.parent), visible=first_visible)


# --------------------------------------------------------------------------- layer data
def case_layer_data(image: np.ndarray, label: np.ndarray | None, case_id: str, *,
                    spacing: Sequence[float] | None = None,
                    class_names: Sequence[str] | None = None,
                    patient_id: str | None = None, source: str = "",
                    label_source: str = "", visible: bool = True,
                    extra_metadata: dict | None = None) -> list[LayerData]:
    """Image (and labels) layer data for one case, named ``case_id`` and ``"<case_id> labels"``.

    Shared by the reader and the sample data so that both produce the same kind of layers.
    """
    patient_id = patient_id or patient_of(case_id)
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    scale = _scale(spacing, image.ndim)
    meta = {"case_id": case_id, "patient_id": patient_id, "source": source,
            "spacing": None if spacing is None else tuple(float(s) for s in spacing),
            **(extra_metadata or {})}
    kwargs: dict[str, Any] = {
        "name": case_id,
        "colormap": "gray",
        "contrast_limits": contrast_limits(image),
        "metadata": meta,
        "visible": visible,
        "axis_labels": axis_labels(image.ndim),
    }
    if scale is not None:
        kwargs["scale"] = scale
    layers: list[LayerData] = [(image, kwargs, "image")]
    if label is not None:
        layers.append(labels_layer_data(
            label, case_id, spacing=spacing, class_names=class_names, patient_id=patient_id,
            source=label_source, visible=visible, extra_metadata=extra_metadata))
    return layers


def labels_layer_data(label: np.ndarray, case_id: str, *,
                      spacing: Sequence[float] | None = None,
                      class_names: Sequence[str] | None = None,
                      patient_id: str | None = None, source: str = "",
                      visible: bool = True, extra_metadata: dict | None = None) -> LayerData:
    """Labels layer data named ``"<case_id> labels"`` with class names in metadata/features."""
    label = np.asarray(label)
    names = list(class_names) if class_names is not None else None
    meta = {"case_id": case_id, "patient_id": patient_id or patient_of(case_id),
            "source": source,
            "spacing": None if spacing is None else tuple(float(s) for s in spacing),
            "class_names": names, **(extra_metadata or {})}
    kwargs: dict[str, Any] = {"name": f"{case_id} labels", "metadata": meta, "visible": visible,
                              "axis_labels": axis_labels(label.ndim)}
    scale = _scale(spacing, label.ndim)
    if scale is not None:
        kwargs["scale"] = scale
    if names:
        kwargs["features"] = {"index": np.arange(len(names)), "class": np.asarray(names, dtype=object)}
    return (label, kwargs, "labels")


def contrast_limits(image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> list[float]:
    """Display range from robust percentiles (computed on at most ~1e6 voxels)."""
    data = np.asarray(image)
    if data.size == 0:
        return [0.0, 1.0]
    step = max(1, int(np.ceil(data.size / 1_000_000)))
    sub = data.ravel()[::step].astype(np.float64, copy=False)
    lo, hi = (float(v) for v in np.percentile(sub, percentiles))
    if hi <= lo:
        lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        hi = lo + 1.0
    return [lo, hi]


def axis_labels(ndim: int) -> tuple[str, ...]:
    """Axis names of a napari-jras array: ("z", "y", "x") for volumes, ("y", "x") for images."""
    return ("z", "y", "x")[-ndim:] if ndim <= 3 else tuple(f"axis{i}" for i in range(ndim))


# --------------------------------------------------------------------------- helpers
def _scale(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None or len(spacing) != ndim:
        return None
    scale = tuple(float(s) for s in spacing)
    if not all(np.isfinite(s) and s > 0 for s in scale):
        return None
    return scale


def _handles(path: str | os.PathLike) -> bool:
    try:
        p = Path(path)
        if p.is_dir():
            return _looks_like_dataset(p)
        stem, ext = split_extension(p)
        if ext in _NIFTI:
            return p.is_file()
        if ext in _PAIRED_2D and stem.endswith("_image"):
            return p.with_name(f"{stem[:-6]}_label{ext}").is_file()
    except (OSError, ValueError):
        pass
    return False


def _looks_like_dataset(folder: Path) -> bool:
    """Cheap check (bounded directory walk): the folder holds ``*_image.*`` files or imagesTr/."""
    if (folder / "imagesTr").is_dir():
        return True
    seen = 0
    todo = [(folder, 0)]
    while todo:
        current, depth = todo.pop(0)
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    seen += 1
                    if seen > _SCAN_LIMIT:
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        if depth + 1 <= _SCAN_DEPTH and not entry.name.startswith("."):
                            todo.append((Path(entry.path), depth + 1))
                        continue
                    stem, ext = split_extension(entry.name)
                    if ext in IMAGE_EXTENSIONS and stem.endswith("_image"):
                        return True
        except OSError:
            continue
    return False


def _is_label_file(path: Path) -> bool:
    stem, _ = split_extension(path)
    return stem.endswith("_label") or path.parent.name.lower().startswith("labels")


def _read_folder(folder: Path, first_visible: bool) -> list[LayerData]:
    cases = find_cases(folder, require_labels=False)
    if len(cases) > MAX_CASES:
        _warn(f"{folder} holds {len(cases)} cases: opening the first {MAX_CASES} only "
              "(open single files, or use the napari-jras command line for whole datasets)")
        cases = cases[:MAX_CASES]
    names_source = _class_names_source(folder)
    layers: list[LayerData] = []
    failed: list[str] = []
    for case in cases:
        try:
            layers.extend(_case_layers(case, names_source, visible=first_visible and not layers))
        except DataError as exc:
            failed.append(f"{case.case_id}: {exc}")
    if failed:
        if not layers:
            raise DataError(f"No case under {folder} could be read: " + "; ".join(failed[:3]))
        _warn(f"Skipped {len(failed)} unreadable case(s) under {folder}: {failed[0]}")
    return layers


def _case_layers(case: Case, names_source: dict | None, visible: bool) -> list[LayerData]:
    image, label = load_case(case)
    class_names = _class_names(None, case.case_id, label, names_source)
    return case_layer_data(
        image.data, label, case.case_id, spacing=image.spacing, class_names=class_names,
        patient_id=case.patient_id, source=str(case.image_path),
        label_source=str(case.label_path or ""), visible=visible)


def _class_names_source(folder: Path) -> dict | None:
    """Class names from an nnU-Net ``dataset.json`` in ``folder`` or its parent, if any."""
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        try:
            if candidate.is_file():
                labels = json.loads(candidate.read_text()).get("labels")
                if isinstance(labels, dict) and labels:
                    return labels
        except (OSError, ValueError, AttributeError):
            logger.debug("ignoring unreadable %s", candidate)
    return None


def _class_names(folder: Path | None, case_id: str, label: np.ndarray | None,
                 names_source: dict | None = None) -> list[str] | None:
    if names_source is None and folder is not None:
        names_source = _class_names_source(folder)
    if names_source:
        by_value: dict[int, str] = {}
        for key, value in names_source.items():
            try:  # nnU-Net v2: {"name": value}; v1: {"value": "name"}
                if isinstance(value, int):
                    by_value[value] = str(key)
                elif str(key).isdigit():
                    by_value[int(key)] = str(value)
            except (TypeError, ValueError):
                continue
        if by_value:
            return [by_value.get(i, f"class {i}") for i in range(max(by_value) + 1)]
    if _ACDC_CASE.match(case_id) and (label is None or int(label.max(initial=0)) <= 3):
        return list(ACDC_CLASS_NAMES)
    return None


def _warn(message: str) -> None:
    logger.warning(message)
    try:
        from napari.utils.notifications import show_warning

        show_warning(message)
    except (ImportError, RuntimeError) as exc:  # no napari / notification manager: log is enough
        logger.debug("no napari notification: %s", exc)
