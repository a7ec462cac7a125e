"""napari contributions: manifest, reader, writer and sample data, in a real viewer (Xvfb)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_jras._reader import MAX_CASES, napari_get_reader
from napari_jras._sample_data import load_sample
from napari_jras._writer import write_labels
from napari_jras.core.errors import DataError
from napari_jras.core.io import read_volume

ACDC_NAMES = ["background", "right ventricle", "myocardium", "left ventricle"]
MANIFEST = Path(__file__).parents[1] / "src" / "napari_jras" / "napari.yaml"


# --------------------------------------------------------------------------- manifest (no Qt)
def test_manifest_validates():
    import npe2

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # every python_name resolves
    assert manifest.name == "napari-jras"
    assert manifest.display_name == "J-RAS"
    contrib = manifest.contributions
    assert {r.command for r in contrib.readers} == {"napari-jras.get_reader"}
    assert {w.command for w in contrib.writers} == {"napari-jras.write_labels"}
    assert {s.key for s in contrib.sample_data} >= {"cardiac_mri"}


def test_manifest_registered_as_entry_point():
    """The installed package exposes the manifest to napari (pip install -e . done)."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert pm.get_manifest("napari-jras").display_name == "J-RAS"


def test_npe2_validate_cli():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-jras"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


# --------------------------------------------------------------------------- reader (no Qt)
def test_reader_declines_other_paths(tmp_path, data_dir):
    plain = tmp_path / "photo.tif"
    plain.write_bytes(b"")
    assert napari_get_reader(str(plain)) is None  # left to napari's built-in reader
    assert napari_get_reader(str(data_dir / "acdc/patient045_frame01_label.tif")) is None
    assert napari_get_reader(str(tmp_path)) is None  # folder without cases
    assert napari_get_reader(str(tmp_path / "nope.nii.gz")) is None
    assert napari_get_reader("notes.txt") is None
    assert napari_get_reader([]) is None


def test_reader_nifti_layer_data(data_dir):
    path = str(data_dir / "nifti/patient045_frame02_image.nii.gz")
    reader = napari_get_reader(path)
    assert callable(reader)
    (image, img_kw, img_type), (label, lab_kw, lab_type) = reader(path)
    assert (img_type, lab_type) == ("image", "labels")
    assert img_kw["name"] == "patient045_frame02"
    assert lab_kw["name"] == "patient045_frame02 labels"
    assert img_kw["scale"] == pytest.approx((10.0, 1.5, 1.5)) == lab_kw["scale"]
    lo, hi = img_kw["contrast_limits"]
    assert image.min() <= lo < hi <= image.max()
    assert label.shape == image.shape and label.dtype == np.uint8
    assert lab_kw["metadata"]["class_names"] == ACDC_NAMES
    assert img_kw["metadata"]["patient_id"] == "patient045"


def test_reader_label_nifti_alone(data_dir):
    path = str(data_dir / "nifti/patient045_frame02_label.nii.gz")
    (layer,) = napari_get_reader(path)(path)
    assert layer[2] == "labels" and layer[1]["name"] == "patient045_frame02 labels"


def test_reader_png_pair_and_list(data_dir):
    paths = [str(data_dir / "busi/benign_100_image.png"), str(data_dir / "covid_ct/52_image.png")]
    layers = napari_get_reader(paths)(paths)
    assert [(kw["name"], t) for _, kw, t in layers] == [
        ("benign_100", "image"), ("benign_100 labels", "labels"),
        ("52", "image"), ("52 labels", "labels")]
    assert "scale" not in layers[0][1]  # no spacing known for PNG


def test_reader_folder_cap_and_broken_cases(tmp_path, data_dir, caplog):
    src = data_dir / "busi"
    for i in range(MAX_CASES + 2):
        for kind in ("image", "label"):
            shutil.copy(src / f"benign_100_{kind}.png", tmp_path / f"case{i:02d}_{kind}.png")
    (tmp_path / "case00_image.png").write_bytes(b"broken")
    reader = napari_get_reader(str(tmp_path))
    with caplog.at_level("WARNING"):
        layers = reader(str(tmp_path))
    assert len(layers) == 2 * (MAX_CASES - 1)  # capped at MAX_CASES, one of them unreadable
    assert "opening the first 20 only" in caplog.text
    assert "Skipped 1 unreadable case" in caplog.text
    visible = [kw["name"] for _, kw, _ in layers if kw["visible"]]
    assert visible == ["case01", "case01 labels"]


def test_reader_nnunet_folder_with_dataset_json(tmp_path, data_dir):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    shutil.copy(data_dir / "nifti/patient045_frame02_image.nii.gz", tmp_path / "imagesTr/heart_001_0000.nii.gz")
    shutil.copy(data_dir / "nifti/patient045_frame02_label.nii.gz", tmp_path / "labelsTr/heart_001.nii.gz")
    (tmp_path / "dataset.json").write_text(
        '{"labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3}}')
    layers = napari_get_reader(str(tmp_path))(str(tmp_path))
    assert [kw["name"] for _, kw, _ in layers] == ["heart_001", "heart_001 labels"]
    assert layers[1][1]["metadata"]["class_names"] == ["background", "RV", "MYO", "LV"]
    assert list(layers[1][1]["features"]["class"]) == ["background", "RV", "MYO", "LV"]


def test_reader_raises_clear_error_for_bad_pair(tmp_path, data_dir):
    shutil.copy(data_dir / "busi/benign_100_image.png", tmp_path / "a_image.png")
    shutil.copy(data_dir / "covid_ct/52_label.png", tmp_path / "a_label.png")
    reader = napari_get_reader(str(tmp_path / "a_image.png"))
    with pytest.raises(DataError, match="does not match the image shape"):
        reader(str(tmp_path / "a_image.png"))
    with pytest.raises(DataError, match="No case under .* could be read"):
        napari_get_reader(str(tmp_path))(str(tmp_path))


# --------------------------------------------------------------------------- writer (no Qt)
def test_writer_compacts_dtype_and_keeps_spacing(tmp_path):
    labels = np.zeros((3, 16, 12), dtype=np.int64)  # napari's default labels dtype
    labels[1, 4:8, 3:9] = 2
    for ext in (".tif", ".nii.gz"):
        (out,) = write_labels(str(tmp_path / f"l{ext}"), labels, {"scale": [4.0, 0.5, 0.5]})
        back = read_volume(out)
        assert back.data.dtype == np.uint8
        np.testing.assert_array_equal(back.data, labels)
        assert back.spacing == pytest.approx((4.0, 0.5, 0.5))


def test_writer_errors(tmp_path):
    with pytest.raises(DataError, match="negative values"):
        write_labels(str(tmp_path / "a.tif"), np.full((4, 4), -1), {})
    with pytest.raises(DataError, match="2-D or 3-D labels"):
        write_labels(str(tmp_path / "a.tif"), np.zeros((2, 2, 4, 4), np.uint8), {})
    with pytest.raises(DataError, match="Cannot save labels as '.png'"):
        write_labels(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8), {})
    (out,) = write_labels(str(tmp_path / "noext"), np.ones((4, 4), np.uint8), {"scale": [1, 1]})
    assert out.endswith("noext.tif")


# --------------------------------------------------------------------------- sample (no Qt)
@pytest.mark.parametrize("frame", ["ED", "ES"])
def test_load_sample_without_napari(frame):
    image, label, meta = load_sample(frame)
    assert image.shape == label.shape and image.ndim == 3 and image.shape[1:] == (256, 232)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert meta["class_names"] == ACDC_NAMES
    assert meta["patient_id"] == "patient002" and meta["frame"] == frame
    assert "Bernard" in meta["citation"]


def test_sample_ships_small_with_citation():
    from napari_jras._sample_data import SAMPLE_DIR

    total = sum(p.stat().st_size for p in SAMPLE_DIR.iterdir() if p.is_file())
    assert total < 2 * 1024 * 1024
    assert "non-commercial" in (SAMPLE_DIR / "CITATION.md").read_text()


def test_sample_unknown_frame():
    with pytest.raises(DataError, match="choose 'ED' or 'ES'"):
        load_sample("mid")


def test_ed_has_larger_left_ventricle_than_es():
    """Sanity check that frame01 really is end-diastole (LV largest)."""
    ed = (load_sample("ED")[1] == 3).sum()
    es = (load_sample("ES")[1] == 3).sum()
    assert ed > es


# --------------------------------------------------------------------------- in a viewer (Qt)
def test_sample_in_viewer(make_napari_viewer_proxy):
    from napari.layers import Image, Labels

    viewer = make_napari_viewer_proxy()
    viewer.open_sample("napari-jras", "cardiac_mri")
    assert len(viewer.layers) == 2
    image, labels = viewer.layers["patient002_frame01"], viewer.layers["patient002_frame01 labels"]
    assert isinstance(image, Image) and isinstance(labels, Labels)
    assert image.data.shape == labels.data.shape == (10, 256, 232)
    assert labels.metadata["class_names"] == ACDC_NAMES
    assert list(labels.features["class"]) == ACDC_NAMES
    assert labels.data.max() == 3


def test_reader_in_viewer_nifti(make_napari_viewer_proxy, data_dir):
    from napari.layers import Image, Labels

    viewer = make_napari_viewer_proxy()
    viewer.open(str(data_dir / "nifti/patient045_frame02_image.nii.gz"), plugin="napari-jras")
    assert [layer.name for layer in viewer.layers] == [
        "patient045_frame02", "patient045_frame02 labels"]
    for layer in viewer.layers:
        np.testing.assert_allclose(layer.scale, (10.0, 1.5, 1.5))
    assert isinstance(viewer.layers[0], Image) and isinstance(viewer.layers[1], Labels)


def test_reader_in_viewer_paired_folder(make_napari_viewer_proxy, data_dir):
    viewer = make_napari_viewer_proxy()
    viewer.open(str(data_dir / "acdc"), plugin="napari-jras")
    assert [layer.name for layer in viewer.layers] == [
        "patient045_frame01", "patient045_frame01 labels"]
    np.testing.assert_allclose(viewer.layers[0].scale, (1.0, 1.0, 1.0))
    assert viewer.layers[1].data.shape == (8, 112, 112)


def test_reader_chosen_by_napari_for_nifti_and_folders(data_dir):
    """napari offers napari-jras for NIfTI and folders, but not for plain TIFF/PNG files."""
    from napari.plugins._npe2 import get_readers

    assert "napari-jras" in get_readers(str(data_dir / "nifti/patient045_frame02_image.nii.gz"))
    assert "napari-jras" in get_readers(str(data_dir / "acdc"))
    assert "napari-jras" in get_readers(str(data_dir / "acdc/patient045_frame01_image.tif"))
    assert "napari-jras" not in get_readers(str(data_dir / "acdc/patient045_frame01_label.tif"))


@pytest.mark.parametrize("ext", [".tif", ".nii.gz"])
def test_writer_in_viewer(make_napari_viewer_proxy, tmp_path, data_dir, ext):
    viewer = make_napari_viewer_proxy()
    viewer.open(str(data_dir / "nifti/patient045_frame02_image.nii.gz"), plugin="napari-jras")
    labels = viewer.layers["patient045_frame02 labels"]
    labels.data[0, :5, :5] = 3  # an edit, as a correction would make
    out = tmp_path / f"saved{ext}"
    written = labels.save(str(out), plugin="napari-jras")
    assert [Path(p) for p in written] == [out]
    back = read_volume(out)
    np.testing.assert_array_equal(back.data, labels.data)
    assert back.spacing == pytest.approx((10.0, 1.5, 1.5))
