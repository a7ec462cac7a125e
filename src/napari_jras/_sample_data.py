"""Bundled sample: a real cardiac cine MRI volume (ACDC patient002) with its expert labels.

Two frames of one patient ship in ``napari_jras/_sample`` (see ``CITATION.md`` there): end-diastole
(ED, ``patient002_frame01``) and end-systole (ES, ``patient002_frame02``), 10 slices of
256 x 232 px each, labels 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle.
Patient002 is an ACDC validation patient: the built-in model never saw it in training.

:func:`load_sample` is Qt-free (CLI, tests, notebooks); :func:`cardiac_mri` and
:func:`cardiac_mri_es` are the napari sample-data contributions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._reader import ACDC_CLASS_NAMES, LayerData, case_layer_data
from .core.errors import DataError
from .core.io import check_image, check_label, read_volume

SAMPLE_DIR = Path(__file__).resolve().parent / "_sample"
"""Folder of the bundled sample, a paired folder usable with ``find_cases`` / the CLI."""

FRAMES = {"ED": "patient002_frame01", "ES": "patient002_frame02"}
PATIENT_ID = "patient002"
CITATION = (
    'O. Bernard et al., "Deep Learning Techniques for Automatic MRI Cardiac Multi-structures '
    'Segmentation and Diagnosis: Is the Problem Solved?", IEEE TMI 37(11), 2018. '
    "ACDC data: research, non-commercial use only."
)


def sample_paths(frame: str = "ED") -> tuple[Path, Path]:
    """(image file, label file) of the bundled sample ``frame`` ("ED" or "ES")."""
    case_id = _case_id(frame)
    image = SAMPLE_DIR / f"{case_id}_image.tif"
    label = SAMPLE_DIR / f"{case_id}_label.tif"
    if not image.is_file() or not label.is_file():
        raise DataError(f"The bundled sample is missing from {SAMPLE_DIR}; reinstall napari-jras")
    return image, label


def load_sample(frame: str = "ED") -> tuple[np.ndarray, np.ndarray, dict]:
    """Load the bundled cardiac MRI sample without napari.

    Returns ``(image, label, metadata)``: ``image`` is (Z, Y, X) uint16, ``label`` (Z, Y, X)
    uint8 with values 0..3, ``metadata`` has ``case_id``, ``patient_id``, ``frame``,
    ``class_names``, ``modality`` ("mri"), ``spacing`` (None: unknown), ``dataset``,
    ``citation``, ``image_path`` and ``label_path``.
    """
    image_path, label_path = sample_paths(frame)
    image = read_volume(image_path)
    check_image(image.data, source=image_path.name)
    label = check_label(read_volume(label_path).data, image.data.shape, source=label_path.name)
    frame = _frame_name(frame)
    metadata = {
        "case_id": FRAMES[frame],
        "patient_id": PATIENT_ID,
        "frame": frame,
        "class_names": list(ACDC_CLASS_NAMES),
        "modality": "mri",
        "spacing": image.spacing,
        "dataset": "ACDC (Automated Cardiac Diagnosis Challenge), validation patient",
        "citation": CITATION,
        "image_path": str(image_path),
        "label_path": str(label_path),
    }
    return image.data, label, metadata


def sample_layer_data(frame: str = "ED") -> list[LayerData]:
    """napari layer data (image, labels) of the sample ``frame``."""
    image, label, meta = load_sample(frame)
    extra = {"frame": meta["frame"], "modality": "mri", "citation": CITATION}
    return case_layer_data(
        image, label, meta["case_id"], spacing=meta["spacing"],
        class_names=meta["class_names"], patient_id=meta["patient_id"],
        source=meta["image_path"], label_source=meta["label_path"], extra_metadata=extra)


def cardiac_mri() -> list[LayerData]:
    """Sample data: cardiac cine MRI, end-diastole, with expert RV / MYO / LV labels."""
    return sample_layer_data("ED")


def cardiac_mri_es() -> list[LayerData]:
    """Sample data: cardiac cine MRI, end-systole, with expert RV / MYO / LV labels."""
    return sample_layer_data("ES")


def _frame_name(frame: str) -> str:
    key = str(frame).strip()
    for name, case_id in FRAMES.items():
        if key.upper() == name or key.lower() in (case_id, case_id.split("_")[-1]):
            return name
    raise DataError(f"Unknown sample frame '{frame}': choose 'ED' or 'ES'")


def _case_id(frame: str) -> str:
    return FRAMES[_frame_name(frame)]
