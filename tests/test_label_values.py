"""Label values on their way to a model: class sets, 0/255 masks, no foreground, large values."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from napari_jras.cli import main
from napari_jras.core.data import (
    MAX_INFERRED_CLASSES,
    SliceSample,
    load_slices,
    num_classes_of,
    resize_labels,
)
from napari_jras.core.errors import DataError, DataWarning
from napari_jras.core.io import find_cases, read_volume, write_volume

TINY = ["--backbone-options", '{"base_channels": 4, "depth": 2}',
        "--retriever-options", '{"width": 4, "input_size": 32}', "--embed-dim", "16",
        "--size", "32", "--steps", "1", "--batch-size", "4", "--quiet"]


def samples(*labels: np.ndarray) -> list[SliceSample]:
    return [SliceSample(np.zeros(lbl.shape, np.float32), lbl, f"c{i}", f"p{i}", 0)
            for i, lbl in enumerate(labels)]


def with_values(*values: int, shape=(8, 8)) -> np.ndarray:
    out = np.zeros(shape, np.int64)
    out.flat[:len(values)] = values
    return out


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_resize_keeps_label_values_above_255(dtype):
    """A uint8 cast turned class 300 into class 44."""
    labels = np.zeros((2, 10, 10), dtype)
    labels[0, 2:8, 2:8] = 300
    labels[1, :5] = 70000 if np.iinfo(dtype).max >= 70000 else 1000
    for size in ((20, 20), (5, 5), (7, 13)):
        out = resize_labels(labels, size)
        assert out.dtype == labels.dtype and out.shape == (2, *size)
        assert set(np.unique(out)) == set(np.unique(labels))
        small = resize_labels((labels > 0).astype(np.uint8), size)  # the uint8 path
        assert np.array_equal(out > 0, small.astype(bool))


def test_large_label_values_survive_loading(tmp_path):
    image = np.random.default_rng(0).integers(0, 1000, (2, 16, 16)).astype(np.uint16)
    label = np.zeros((2, 16, 16), np.uint16)
    label[:, 4:12, 4:12] = 300
    write_volume(tmp_path / "a_image.tif", image)
    write_volume(tmp_path / "a_label.tif", label)
    (loaded,) = load_slices(find_cases(tmp_path), size=8)[:1]
    assert set(np.unique(loaded.label)) == {0, 300}


def test_class_values_must_be_consecutive_unless_declared():
    assert num_classes_of(samples(with_values(1), with_values(2))) == 3
    with pytest.raises(DataError, match=r"label values \{0, 7, 200\} are not the consecutive "
                                        r"classes 0..200 \(e.g. 1 is absent\)"):
        num_classes_of(samples(with_values(7, 200)))
    assert num_classes_of(samples(with_values(7, 200)), declared=201) == 201
    assert num_classes_of(samples(with_values(1)), declared=4) == 4  # classes absent: declared
    with pytest.raises(DataError, match="hold class 7 but --num-classes/--class-names declare 5"):
        num_classes_of(samples(with_values(7)), declared=5)
    many = with_values(*range(MAX_INFERRED_CLASSES + 1), shape=(16, 16))
    with pytest.raises(DataError, match=f"{MAX_INFERRED_CLASSES + 1} different values"):
        num_classes_of(samples(many))
    assert num_classes_of(samples(many), declared=MAX_INFERRED_CLASSES + 1) == 129


def test_labels_without_any_foreground_are_refused():
    """All-background labels trained a model for a class it never saw."""
    with pytest.raises(DataError, match="No training label has any foreground"):
        num_classes_of(samples(with_values(), with_values()))
    with pytest.raises(DataError, match="No training label has any foreground"):
        num_classes_of(samples(with_values()), declared=3)


def _dataset(src, dst, relabel) -> None:
    for path in sorted(src.glob("*_image.tif")):
        label = read_volume(path.with_name(path.name.replace("_image", "_label"))).data
        write_volume(dst / path.name, read_volume(path).data)
        write_volume(dst / path.name.replace("_image", "_label"), relabel(label))


def test_training_on_0_255_masks_gives_a_binary_model(acdc_slices_dir, tmp_path):
    """0/255 masks made a 256-class model (then evaluated at Dice 0.9 from absent classes)."""
    _dataset(acdc_slices_dir, tmp_path / "d",
             lambda lbl: np.where(lbl > 0, 255, 0).astype(np.uint8))
    with pytest.warns(DataWarning, match="0/255"):
        assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"),
                     *TINY]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_classes"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert main(["evaluate", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "d"),
                     "--report", str(tmp_path / "r.json"), "--quiet"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["summary"]["per_class"]) == ["class 1"]


@pytest.mark.parametrize("relabel,message", [
    (lambda lbl: np.choose(lbl, [0, 7, 200, 200]).astype(np.uint8),
     "label values {0, 7, 200} are not the consecutive classes"),
    (lambda lbl: np.zeros_like(lbl, np.uint8), "No training label has any foreground"),
])
def test_training_refuses_bad_label_sets_before_anything_is_written(
        acdc_slices_dir, tmp_path, capsys, relabel, message):
    _dataset(acdc_slices_dir, tmp_path / "d", relabel)
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"),
                 *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-jras train: error: ") and message in err[0]
    assert not (tmp_path / "run").exists()
    if "consecutive" in message:  # the classes declared: accepted
        assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"),
                     *TINY, "--num-classes", "201"]) == 0
        assert json.loads((tmp_path / "run" / "config.json").read_text())["num_classes"] == 201
        assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r2"),
                     *TINY, "--num-classes", "4"]) == 2
        assert "hold class 200 but --num-classes" in capsys.readouterr().err
