"""Shared test setup: Qt binding, offline model hub, the small real cases in tests/data."""

import os
from pathlib import Path

os.environ.setdefault("QT_API", "pyqt6")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# tiny models: one thread avoids oversubscribing small CI machines (and is faster for tiny ops)
torch.set_num_threads(1)

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of small real cases (see tests/data/README.md): acdc/, nifti/, busi/, covid_ct/."""
    return DATA_DIR


TINY_MODEL = {
    "backbone": "unet", "backbone_options": {"base_channels": 4, "depth": 2}, "size": 32, "k": 2,
    "retriever": {"encoder": "cnn", "embed_dim": 16, "width": 4, "input_size": 32, "center": True},
    "class_names": ["background", "RV", "myocardium", "LV"],
}


@pytest.fixture(scope="session")
def acdc_slices_dir(tmp_path_factory) -> Path:
    """The real ACDC test volume cut into 2-D cases of four pseudo-patients (2 slices each).

    Retrieval needs exemplars of *other* patients, and tests/data holds one patient only.
    """
    from napari_jras.core.io import read_volume, write_volume

    out = tmp_path_factory.mktemp("acdc_slices")
    image = read_volume(DATA_DIR / "acdc" / "patient045_frame01_image.tif").data
    label = read_volume(DATA_DIR / "acdc" / "patient045_frame01_label.tif").data
    for z in range(8):
        stem = f"p{z // 2}_slice{z % 2}"
        write_volume(out / f"{stem}_image.tif", image[z])
        write_volume(out / f"{stem}_label.tif", label[z].astype("uint8"))
    return out


def _tiny_run(data: Path, out: Path, use_retrieval: bool) -> Path:
    from napari_jras.core.pipeline import train_run
    from napari_jras.core.train import TrainConfig

    config = dict(TINY_MODEL, use_retrieval=use_retrieval, modality="mri")
    return train_run(data, out, config, TrainConfig(steps=3, batch_size=4, log_every=1,
                                                    checkpoint_every=100, seed=0),
                     patient_regex=r"^(p\d+)_")


@pytest.fixture(scope="session")
def tiny_run(acdc_slices_dir, tmp_path_factory) -> Path:
    """A J-RAS run folder (U-Net, 32 px, 3 steps) with its bank of 8 real exemplars.

    Session-scoped and shared: copy it (``shutil.copytree``) before changing it.
    """
    return _tiny_run(acdc_slices_dir, tmp_path_factory.mktemp("runs") / "jras", True)


@pytest.fixture(scope="session")
def tiny_baseline_run(acdc_slices_dir, tmp_path_factory) -> Path:
    """The same model without retrieval (baseline mode), 3 steps."""
    return _tiny_run(acdc_slices_dir, tmp_path_factory.mktemp("runs") / "base", False)


@pytest.fixture
def read_only_folder():
    """A context manager that makes a folder tree unwritable, as on a read-only mount.

    Root ignores permission bits, so when the tests run as root the immutable attribute
    (``chattr +i``, which binds root too) is set as well; where neither works the test is
    skipped. Everything is made writable again on exit.
    """
    import contextlib
    import shutil
    import subprocess

    @contextlib.contextmanager
    def make(folder: Path):
        paths = [folder, *folder.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        as_root = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("chattr")
        try:
            for p in paths:
                p.chmod(modes[p] & ~0o222)
            if as_root:
                subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True)
            if os.access(folder, os.W_OK):
                pytest.skip("cannot make a folder read-only here (root without chattr)")
            yield folder
        finally:
            if as_root:
                subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
            for p, mode in modes.items():
                p.chmod(mode)

    return make
