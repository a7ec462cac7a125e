"""Shared test setup: Qt binding, offline model hub, the small real cases in tests/data."""

import os
from pathlib import Path

os.environ.setdefault("QT_API", "pyqt6")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of small real cases (see tests/data/README.md): acdc/, nifti/, busi/, covid_ct/."""
    return DATA_DIR
