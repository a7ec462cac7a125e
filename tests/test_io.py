"""Core data I/O (no Qt): reading, writing, finding cases, validation, normalisation, slicing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_jras.core.data import as_slices, load_slices, patient_split
from napari_jras.core.errors import DataError
from napari_jras.core.io import (
    Case,
    check_image,
    check_label,
    find_cases,
    load_case,
    patient_of,
    read_volume,
    split_extension,
    write_volume,
)
from napari_jras.core.normalize import CT_WINDOW, normalize

ACDC = "acdc/patient045_frame01"
NIFTI = "nifti/patient045_frame02"


def _volume(shape=(4, 12, 10), dtype=np.uint16, seed=0) -> np.ndarray:
    """A volume whose every axis is distinguishable (catches transposed axes)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=shape).astype(dtype)


# --------------------------------------------------------------------------- real files
def test_read_real_cases(data_dir):
    image = read_volume(data_dir / f"{ACDC}_image.tif")
    label = read_volume(data_dir / f"{ACDC}_label.tif")
    assert image.data.shape == label.data.shape == (8, 112, 112)
    assert image.data.dtype == np.uint16 and image.spacing is None
    assert set(np.unique(label.data)) == {0, 1, 2, 3}

    nii = read_volume(data_dir / f"{NIFTI}_image.nii.gz")
    assert nii.data.shape == (8, 112, 112)
    assert nii.spacing == pytest.approx((10.0, 1.5, 1.5))

    busi = read_volume(data_dir / "busi/benign_100_image.png")
    assert busi.data.ndim == 2 and busi.data.dtype == np.uint8
    covid = read_volume(data_dir / "covid_ct/52_label.png")
    assert set(np.unique(covid.data)) == {0, 1, 2}


def test_split_extension():
    assert split_extension("a/b/case_image.nii.gz") == ("case_image", ".nii.gz")
    assert split_extension("CASE_label.TIF") == ("CASE_label", ".tif")
    assert split_extension("x.png") == ("x", ".png")


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", [".tif", ".tiff", ".nii", ".nii.gz"])
def test_roundtrip_volume_without_spacing(tmp_path, ext):
    data = _volume((6, 12, 10))
    out = write_volume(tmp_path / f"v{ext}", data)
    back = read_volume(out)
    assert back.data.shape == data.shape  # Z first preserved
    np.testing.assert_array_equal(back.data, data)


@pytest.mark.parametrize("ext", [".tif", ".nii", ".nii.gz"])
def test_roundtrip_volume_with_spacing(tmp_path, ext):
    data = _volume(dtype=np.uint8)
    spacing = (10.0, 1.5, 1.5)
    back = read_volume(write_volume(tmp_path / f"v{ext}", data, spacing))
    np.testing.assert_array_equal(back.data, data)
    assert back.spacing == pytest.approx(spacing)


def test_roundtrip_nifti_anisotropic_and_2d(tmp_path):
    data = _volume((5, 7, 9), np.int16)
    back = read_volume(write_volume(tmp_path / "a.nii.gz", data, (3.0, 0.5, 0.25)))
    np.testing.assert_array_equal(back.data, data)
    assert back.spacing == pytest.approx((3.0, 0.5, 0.25))
    image = _volume((7, 9), np.float32)
    back = read_volume(write_volume(tmp_path / "b.nii", image, (0.5, 0.7)))
    np.testing.assert_array_equal(back.data, image)
    assert back.spacing == pytest.approx((0.5, 0.7))


def test_nifti_orientation_matches_tiff(tmp_path, data_dir):
    """The same volume written as TIFF and NIfTI reads back identically (Z, Y, X)."""
    data = read_volume(data_dir / f"{ACDC}_image.tif").data
    a = read_volume(write_volume(tmp_path / "a.tif", data)).data
    b = read_volume(write_volume(tmp_path / "b.nii.gz", data, (10, 1.5, 1.5))).data
    np.testing.assert_array_equal(a, b)
    import nibabel as nib

    on_disk = nib.load(str(tmp_path / "b.nii.gz"))
    assert on_disk.shape == data.shape[::-1]  # stored (X, Y, Z) as NIfTI tools expect


def test_write_is_atomic_and_rejects_bad_requests(tmp_path):
    write_volume(tmp_path / "v.tif", _volume((6, 12, 10)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.tif"]  # no leftover temp file
    with pytest.raises(DataError, match="Cannot write '.png'"):
        write_volume(tmp_path / "v.png", _volume())
    with pytest.raises(DataError, match="2-D or 3-D"):
        write_volume(tmp_path / "v4.tif", np.zeros((2, 2, 3, 4), np.uint8))


def test_write_volume_creates_parent_folders(tmp_path):
    out = write_volume(tmp_path / "a" / "b" / "c.nii.gz", _volume())
    assert out.exists()


def test_write_volume_under_a_file_is_a_data_error(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(DataError, match="Cannot create the folder"):
        write_volume(tmp_path / "taken" / "sub" / "c.tif", _volume())
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


# Regressions: spacing, dtypes and small volumes must round-trip through TIFF and NIfTI.
def test_roundtrip_2d_tiff_spacing(tmp_path):
    back = read_volume(write_volume(tmp_path / "a.tif", _volume((7, 9)), (0.5, 0.5)))
    assert back.spacing == pytest.approx((0.5, 0.5))


def test_roundtrip_tiff_anisotropic_inplane_spacing(tmp_path):
    back = read_volume(write_volume(tmp_path / "a.tif", _volume(), (5.0, 0.5, 0.25)))
    assert back.spacing == pytest.approx((5.0, 0.5, 0.25))


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_write_tiff_with_spacing_any_dtype(tmp_path, dtype):
    data = _volume(dtype=dtype) * 1000
    back = read_volume(write_volume(tmp_path / "a.tif", data, (5.0, 1.0, 1.0)))
    np.testing.assert_allclose(back.data, data)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tif"]


def test_write_tiff_few_slices_is_not_rgb(tmp_path):
    import tifffile

    with tifffile.TiffFile(write_volume(tmp_path / "a.tif", _volume((3, 12, 10)))) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        assert tif.series[0].shape == (3, 12, 10)


def test_write_nifti_int64(tmp_path):
    data = _volume(dtype=np.int64)
    np.testing.assert_array_equal(read_volume(write_volume(tmp_path / "a.nii.gz", data)).data, data)


def test_write_tiff_with_spacing_keeps_negative_values(tmp_path):
    data = np.full((3, 4, 5), -7, np.int16)
    back = read_volume(write_volume(tmp_path / "a.tif", data, (2.0, 1.0, 1.0)))
    np.testing.assert_array_equal(back.data, data)


# --------------------------------------------------------------------------- finding cases
def test_find_cases_paired_folder(data_dir):
    cases = find_cases(data_dir)
    by_id = {c.case_id: c for c in cases}
    assert set(by_id) == {"patient045_frame01", "patient045_frame02", "benign_100", "52"}
    assert all(c.label_path is not None for c in cases)
    assert by_id["patient045_frame02"].image_path.name.endswith("_image.nii.gz")
    assert by_id["patient045_frame01"].patient_id == "patient045"
    assert by_id["patient045_frame02"].patient_id == "patient045"


def test_find_cases_single_file(data_dir):
    (case,) = find_cases(data_dir / f"{ACDC}_image.tif")
    assert case.case_id == "patient045_frame01"
    assert case.label_path == data_dir / f"{ACDC}_label.tif"


def test_find_cases_nnunet(tmp_path, data_dir):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ("heart_001", "heart_002"):
        shutil.copy(data_dir / f"{NIFTI}_image.nii.gz", tmp_path / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copy(data_dir / f"{NIFTI}_label.nii.gz", tmp_path / "labelsTr" / f"{name}.nii.gz")
    # a second modality channel of a case is not a case of its own
    shutil.copy(data_dir / f"{NIFTI}_image.nii.gz", tmp_path / "imagesTr" / "heart_001_0001.nii.gz")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["heart_001", "heart_002"]
    image, label = load_case(cases[0])
    assert label.shape == image.data.shape == (8, 112, 112)
    (tmp_path / "labelsTr" / "heart_002.nii.gz").unlink()
    with pytest.raises(DataError, match="heart_002 has no label"):
        find_cases(tmp_path)
    assert find_cases(tmp_path, require_labels=False)[1].label_path is None


def test_load_case_real(data_dir):
    for case in find_cases(data_dir):
        image, label = load_case(case)
        assert label.shape == image.data.shape
        assert label.dtype == np.uint8


@pytest.mark.parametrize(
    ("case_id", "patient"),
    [("patient002_frame01", "patient002"), ("patient045_frame12", "patient045"),
     ("case7_slice003", "case7"), ("benign_100", "benign_100"), ("52", "52")],
)
def test_patient_ids(case_id, patient):
    assert patient_of(case_id) == patient


def test_patient_id_custom_regex():
    assert patient_of("subj-04_scan2", r"^(subj-\d+)") == "subj-04"


def test_patient_split_keeps_patients_apart():
    cases = [Case(f"patient{p:03d}_frame{f:02d}", f"patient{p:03d}", Path(f"p{p}f{f}_image.tif"))
             for p in range(10) for f in (1, 2)]
    train, val = patient_split(cases, val_fraction=0.3, seed=1)
    assert len(train) + len(val) == len(cases)
    assert not {c.patient_id for c in train} & {c.patient_id for c in val}
    assert len({c.patient_id for c in val}) == 3
    assert patient_split(cases, 0.3, seed=1) == (train, val)  # reproducible


def test_patient_split_real_cases(data_dir):
    train, val = patient_split(find_cases(data_dir), val_fraction=0.5)
    assert not {c.patient_id for c in train} & {c.patient_id for c in val}
    frames = [c for c in train + val if c.patient_id == "patient045"]
    assert len(frames) == 2 and (frames[0] in train) == (frames[1] in train)


def test_patient_split_errors():
    one = [Case("p1_frame01", "p1", Path("a")), Case("p1_frame02", "p1", Path("b"))]
    with pytest.raises(DataError, match="at least two patients"):
        patient_split(one)
    with pytest.raises(DataError, match="between 0 and 1"):
        patient_split(one, val_fraction=1.5)


# --------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("modality", ["auto", "mri", "ct", "us"])
def test_normalize_range(data_dir, modality):
    for path in (f"{ACDC}_image.tif", "busi/benign_100_image.png", "covid_ct/52_image.png"):
        out = normalize(read_volume(data_dir / path).data, modality)
        assert out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out.max() > 0.5  # not collapsed


def test_normalize_constant_image_is_zeros():
    for modality in ("auto", "mri", "ct", "us"):
        out = normalize(np.full((5, 6), 42.0), modality)
        assert out.shape == (5, 6) and not out.any()


def test_normalize_ct_hounsfield_window():
    level, width = CT_WINDOW
    lo, hi = level - width / 2, level + width / 2
    hu = np.array([[-2000, lo], [level, hi], [3000, 0]], dtype=np.int16)
    out = normalize(hu, "ct")
    np.testing.assert_allclose(out, [[0, 0], [0.5, 1], [1, (0 - lo) / width]], atol=1e-6)


def test_normalize_8bit_and_mri_percentiles():
    np.testing.assert_allclose(normalize(np.array([[0, 255]], np.uint8), "auto"), [[0, 1]])
    data = np.arange(1000, dtype=np.float32)
    data[0] = -1e6  # an outlier does not squash the rest of the range
    out = normalize(data, "mri")
    assert out[500] == pytest.approx(0.5, abs=0.02)


def test_normalize_errors():
    with pytest.raises(DataError, match="Unknown modality 'xray'"):
        normalize(np.zeros((2, 2)), "xray")
    with pytest.raises(DataError, match="NaN or infinite"):
        normalize(np.array([[np.nan, 1.0]]))


# --------------------------------------------------------------------------- slices
def test_load_slices_shapes(data_dir):
    cases = find_cases(data_dir)
    calls = []
    samples = load_slices(cases, size=64, progress=lambda p: calls.append((p.done, p.total)))
    assert len(samples) == 8 + 8 + 1 + 1
    assert calls[-1] == (len(cases), len(cases))
    for s in samples:
        assert s.image.shape == s.label.shape == (64, 64)
        assert s.image.dtype == np.float32 and 0.0 <= s.image.min() <= s.image.max() <= 1.0
    acdc = [s for s in samples if s.case_id == "patient045_frame01"]
    assert [s.slice_index for s in acdc] == list(range(8))
    assert {s.patient_id for s in acdc} == {"patient045"}
    native = load_slices([c for c in cases if c.case_id == "benign_100"])
    assert native[0].image.shape == (236, 161)


def test_load_slices_skip_empty(data_dir):
    cases = [c for c in find_cases(data_dir) if c.case_id == "patient045_frame01"]
    kept = load_slices(cases, skip_empty=True)
    assert 0 < len(kept) <= 8 and all(s.label.any() for s in kept)


def test_as_slices():
    assert as_slices(np.zeros((3, 4))).shape == (1, 3, 4)
    assert as_slices(np.zeros((2, 3, 4))).shape == (2, 3, 4)
    with pytest.raises(DataError, match="2-D image or 3-D volume"):
        as_slices(np.zeros((1, 2, 3, 4)))


# --------------------------------------------------------------------------- bad inputs
def test_missing_label(tmp_path, data_dir):
    shutil.copy(data_dir / "busi/benign_100_image.png", tmp_path / "a_image.png")
    with pytest.raises(DataError, match="no matching '_label'"):
        find_cases(tmp_path)
    with pytest.raises(DataError, match="expected a_label.png"):
        find_cases(tmp_path / "a_image.png")
    assert find_cases(tmp_path, require_labels=False)[0].label_path is None


def test_shape_mismatch(tmp_path, data_dir):
    shutil.copy(data_dir / "busi/benign_100_image.png", tmp_path / "a_image.png")
    shutil.copy(data_dir / "covid_ct/52_label.png", tmp_path / "a_label.png")
    (case,) = find_cases(tmp_path)
    with pytest.raises(DataError, match=r"does not match the image shape \(236, 161\)"):
        load_case(case)


def test_unsupported_type(tmp_path):
    (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match="Unsupported file type '.jpg'"):
        read_volume(tmp_path / "scan.jpg")
    with pytest.raises(DataError, match="Unsupported file type"):
        find_cases(tmp_path / "scan.jpg")


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="File not found"):
        read_volume(tmp_path / "nope.tif")
    with pytest.raises(DataError, match="Expected a file but got a folder"):
        read_volume(tmp_path)
    with pytest.raises(DataError, match="Path not found"):
        find_cases(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="No '<name>_image.<ext>' files found"):
        find_cases(tmp_path)
    (tmp_path / "only_label.png").write_bytes(b"")
    with pytest.raises(DataError, match="found label files without images"):
        find_cases(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match="No images found in"):
        find_cases(tmp_path)


def test_non_integer_labels():
    with pytest.raises(DataError, match=r"non-integer values \(e.g. 0.5\)"):
        check_label(np.array([[0.0, 0.5], [1.0, 2.0]]))
    with pytest.raises(DataError, match="label contains NaN"):
        check_label(np.array([[0.0, np.nan]]))
    # integral floats are fine and come back as uint8
    assert check_label(np.array([[0.0, 2.0]])).dtype == np.uint8


def test_negative_labels():
    with pytest.raises(DataError, match=r"negative values \(min -1\)"):
        check_label(np.array([[0, -1], [1, 2]], dtype=np.int16))


def test_label_class_out_of_range_and_dtypes():
    with pytest.raises(DataError, match="class value 5 but the model knows only 4 classes"):
        check_label(np.array([[0, 5]], np.uint8), num_classes=4)
    with pytest.raises(DataError, match="unsupported data type"):
        check_label(np.array([["a"]]))
    with pytest.raises(DataError, match="is 4-D"):
        check_label(np.zeros((1, 2, 3, 4), np.uint8))
    assert check_label(np.full((2, 2), 300)).dtype == np.int64


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_image(bad):
    image = np.ones((4, 5), np.float32)
    image[1, 2] = bad
    with pytest.raises(DataError, match="1 NaN or infinite values"):
        check_image(image, source="scan.nii")


def test_4d_input(tmp_path):
    with pytest.raises(DataError, match="is 4-D .* select one time point or channel"):
        check_image(np.zeros((2, 3, 16, 16)))
    # a 4-D NIfTI (e.g. cine MRI) is read, then refused with the same message
    write_path = tmp_path / "cine_image.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 3, 2), np.int16), np.eye(4)), str(write_path))
    (case,) = find_cases(write_path, require_labels=False)
    with pytest.raises(DataError, match="is 4-D"):
        load_case(case)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_rgb_image(tmp_path, mode):
    from PIL import Image

    colour = np.random.default_rng(0).integers(0, 256, (32, 40, len(mode)), dtype=np.uint8)
    Image.fromarray(colour, mode).save(tmp_path / "photo_image.png")
    (case,) = find_cases(tmp_path / "photo_image.png", require_labels=False)
    with pytest.raises(DataError, match="looks like an RGB/RGBA image .* convert it to grey"):
        load_case(case)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P"])
def test_grey_png_with_alpha_or_colour_channels_reads_as_one_slice(tmp_path, mode):
    """A grey + alpha PNG was read as a 2-slice volume (and a (H, W, 2) label file written)."""
    from PIL import Image

    grey = np.random.default_rng(1).integers(0, 256, (24, 30), dtype=np.uint8)
    alpha = np.full_like(grey, 200)
    layers = {"L": [grey], "LA": [grey, alpha], "RGB": [grey] * 3, "RGBA": [grey] * 3 + [alpha]}
    if mode == "P":  # a palette of greys, as some tools save 8-bit images
        img = Image.fromarray(grey, "L").convert("P")
        img.putpalette([v for i in range(256) for v in (i, i, i)])
    else:
        img = Image.fromarray(np.stack(layers[mode], -1) if mode != "L" else grey, mode)
    img.save(tmp_path / "scan_image.png")
    img.save(tmp_path / "scan_label.png")
    assert Image.open(tmp_path / "scan_image.png").mode == mode
    data = read_volume(tmp_path / "scan_image.png").data
    assert data.shape == (24, 30) and np.array_equal(data, grey)
    image, label = load_case(find_cases(tmp_path)[0])
    assert image.data.shape == label.shape == (24, 30)


def test_same_case_in_two_formats_is_refused(tmp_path):
    """a_image.tif next to a_image.nii.gz: training silently dropped one, predict wrote one
    label file twice."""
    for ext in (".tif", ".nii.gz"):
        write_volume(tmp_path / "d" / f"a_image{ext}", _volume())
        write_volume(tmp_path / "d" / f"a_label{ext}", np.zeros((4, 12, 10), np.uint8))
    write_volume(tmp_path / "d" / "b_image.tif", _volume())
    write_volume(tmp_path / "d" / "b_label.tif", np.zeros((4, 12, 10), np.uint8))
    with pytest.raises(DataError, match=r"1 case name\(s\) .* more than one file: "
                                        r"a_image.nii.gz and a_image.tif; keep one"):
        find_cases(tmp_path / "d")
    (tmp_path / "d" / "a_image.nii.gz").unlink()
    with pytest.raises(DataError, match="a_label.nii.gz and a_label.tif"):
        find_cases(tmp_path / "d")
    (tmp_path / "d" / "a_label.nii.gz").unlink()
    assert [c.case_id for c in find_cases(tmp_path / "d")] == ["a", "b"]
    # the same name in two subfolders is two cases
    write_volume(tmp_path / "d" / "sub" / "a_image.tif", _volume())
    write_volume(tmp_path / "d" / "sub" / "a_label.tif", np.zeros((4, 12, 10), np.uint8))
    assert len(find_cases(tmp_path / "d")) == 3


def test_nnunet_case_in_two_formats_is_refused(tmp_path):
    for ext in (".nii", ".nii.gz"):
        write_volume(tmp_path / "imagesTr" / f"x_0000{ext}", _volume())
        write_volume(tmp_path / "labelsTr" / f"x{ext}", np.zeros((4, 12, 10), np.uint8))
    with pytest.raises(DataError, match="imagesTr/x_0000.nii and imagesTr/x_0000.nii.gz"):
        find_cases(tmp_path)
    (tmp_path / "imagesTr" / "x_0000.nii").unlink()
    assert [c.case_id for c in find_cases(tmp_path)] == ["x"]


def test_binary_0_255_masks_read_as_classes_0_and_1(tmp_path):
    from napari_jras.core.errors import DataWarning

    mask = np.zeros((4, 12, 10), np.uint8)
    mask[1:3, 2:6, 3:7] = 255
    write_volume(tmp_path / "a_image.tif", _volume())
    write_volume(tmp_path / "a_label.tif", mask)
    with pytest.warns(DataWarning, match="0/255 are read as classes 0 .* and 1"):
        _, label = load_case(find_cases(tmp_path)[0])
    assert np.array_equal(label, mask // 255) and label.dtype == np.uint8
    mask[0, 0, 0] = 2  # not a binary mask: left alone (training then refuses the values)
    write_volume(tmp_path / "a_label.tif", mask)
    _, label = load_case(find_cases(tmp_path)[0])
    assert sorted(np.unique(label)) == [0, 2, 255]


def test_other_bad_images():
    with pytest.raises(DataError, match="must be 2-D or 3-D"):
        check_image(np.zeros(5))
    with pytest.raises(DataError, match="is empty"):
        check_image(np.zeros((0, 4)))
    with pytest.raises(DataError, match="unsupported data type complex"):
        check_image(np.zeros((4, 4), complex))


@pytest.mark.parametrize("ext", [".tif", ".png", ".nii", ".nii.gz"])
def test_garbage_file(tmp_path, ext):
    path = tmp_path / f"broken_image{ext}"
    path.write_bytes(b"this is not an image " * 20)
    with pytest.raises(DataError, match=f"Cannot read .*broken_image{ext.replace('.', '[.]')}: "
                                        "the file is damaged"):
        read_volume(path)


@pytest.mark.parametrize("src", [f"{ACDC}_image.tif", "busi/benign_100_image.png",
                                 f"{NIFTI}_image.nii.gz"])
def test_truncated_file(tmp_path, data_dir, src):
    raw = (data_dir / src).read_bytes()
    _, ext = split_extension(src)
    path = tmp_path / f"cut{ext}"
    path.write_bytes(raw[: len(raw) - 2000])  # the last part of the pixel data is missing
    with pytest.raises(DataError, match="the file is damaged"):
        read_volume(path)


def test_truncated_uncompressed_nifti(tmp_path):
    path = write_volume(tmp_path / "full.nii", _volume())
    raw = path.read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:400])
    with pytest.raises(DataError, match="could the file be damaged"):
        read_volume(tmp_path / "cut.nii")


def test_truncated_tiff_page_chain(tmp_path, data_dir):
    raw = (data_dir / f"{ACDC}_image.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="damaged"):
        read_volume(tmp_path / "cut.tif")
