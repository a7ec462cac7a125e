"""Property-based tests (hypothesis): reader/writer round trips, soft top-K fusion, metrics.

Kept small for CI: a few dozen examples per property, no deadline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_jras._writer import write_labels
from napari_jras.core.errors import ModelError
from napari_jras.core.fusion import MAX_K, combine, fusion_weights, soft_topk_guide
from napari_jras.core.io import read_volume, write_volume
from napari_jras.core.metrics import dice_per_class, hausdorff_per_class, missing_penalty

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

shapes = st.one_of(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                   hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6))
image_dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.float32])
spacings = st.floats(min_value=0.125, max_value=10.0, allow_nan=False, width=32)


@st.composite
def images(draw) -> np.ndarray:
    dtype = draw(image_dtypes)
    shape = draw(shapes)
    if np.dtype(dtype).kind == "f":
        elements = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    return draw(hnp.arrays(dtype, shape, elements=elements))


# --------------------------------------------------------------------------- reader / writer
@SETTINGS
@given(image=images(), ext=st.sampled_from([".tif", ".nii.gz", ".nii"]),
       spacing=st.none() | st.lists(spacings, min_size=3, max_size=3))
def test_volume_round_trip(image, ext, spacing):
    spacing = None if spacing is None else tuple(spacing[-image.ndim:])
    with tempfile.TemporaryDirectory() as tmp:
        back = read_volume(write_volume(Path(tmp) / f"case_image{ext}", image, spacing))
    assert back.data.shape == image.shape
    np.testing.assert_array_equal(back.data, image)
    imagej = ext == ".tif" and spacing is not None  # ImageJ TIFFs: uint8, uint16, float32 only
    if imagej and image.dtype == np.int16 and image.shape[-1] > 1:
        assert back.data.dtype == (np.uint16 if image.min() >= 0 else np.float32)
    else:
        assert back.data.dtype == image.dtype
    if spacing is not None and (not imagej or image.shape[-1] > 1):
        assert back.spacing is not None
        np.testing.assert_allclose(back.spacing, spacing, rtol=1e-5)


@SETTINGS
@given(label=st.integers(1, 300).flatmap(
    lambda top: hnp.arrays(np.int32, shapes, elements=st.integers(0, top))),
    ext=st.sampled_from([".tif", ".nii.gz"]))
def test_labels_round_trip_through_the_napari_writer(label, ext):
    with tempfile.TemporaryDirectory() as tmp:
        [path] = write_labels(str(Path(tmp) / f"pred{ext}"), label, {"name": "labels"})
        back = read_volume(path).data
    np.testing.assert_array_equal(back, label)
    assert back.dtype == (np.uint8 if label.max() < 256 else np.uint16)


# --------------------------------------------------------------------------- fusion
@st.composite
def score_rows(draw) -> torch.Tensor:
    batch, k = draw(st.integers(1, 4)), draw(st.integers(1, MAX_K))
    values = draw(hnp.arrays(np.float32, (batch, k), elements=st.floats(-1, 1, width=32)))
    missing = draw(hnp.arrays(bool, (batch, k)))
    missing[:, 0] = False  # every query got at least one exemplar
    values[missing] = -np.inf
    return torch.from_numpy(values)


@SETTINGS
@given(scores=score_rows(), tau=st.floats(0.01, 10.0))
def test_fusion_weights_are_a_distribution(scores, tau):
    weights = fusion_weights(scores, tau)
    assert weights.shape == scores.shape
    assert torch.all(weights >= 0) and torch.all(weights <= 1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(scores)), atol=1e-5, rtol=0)
    assert torch.all(weights[torch.isinf(scores)] == 0)
    # a higher score never gets a lower weight
    for row_s, row_w in zip(scores, weights, strict=True):
        order = torch.argsort(row_s)
        assert torch.all(torch.diff(row_w[order]) >= -1e-6)


@SETTINGS
@given(scores=score_rows(), classes=st.integers(2, 5), data=st.data())
def test_guide_is_a_convex_mix_of_exemplars(scores, classes, data):
    batch, k = scores.shape
    images = torch.from_numpy(data.draw(hnp.arrays(np.float32, (batch, k, 4, 4),
                                                   elements=st.floats(0, 1, width=32))))
    masks = torch.from_numpy(data.draw(hnp.arrays(np.int64, (batch, k, 4, 4),
                                                  elements=st.integers(0, classes - 1))))
    weights = fusion_weights(scores, 0.1)
    guide_image, guide_mask = combine(weights, images, masks, classes)
    assert guide_image.shape == (batch, 1, 4, 4) and guide_mask.shape == (batch, classes, 4, 4)
    torch.testing.assert_close(guide_mask.sum(1), torch.ones(batch, 4, 4), atol=1e-5, rtol=0)
    assert torch.all(guide_mask >= -1e-6) and torch.all(guide_mask <= 1 + 1e-6)
    assert torch.all(guide_image >= images.amin(1, keepdim=True) - 1e-5)
    assert torch.all(guide_image <= images.amax(1, keepdim=True) + 1e-5)


@SETTINGS
@given(n=st.integers(1, 10), k=st.integers(1, MAX_K), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_soft_top_k_uses_min_k_n_exemplars(n, k, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(batch, 6, generator=gen), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(n, 6, generator=gen), dim=1)
    guide = soft_topk_guide(query, bank, torch.rand(n, 4, 4, generator=gen),
                            torch.randint(0, 3, (n, 4, 4), generator=gen), 3, k=k)
    assert guide.indices.shape == (batch, min(k, n)) and guide.weights.shape == (batch, min(k, n))
    torch.testing.assert_close(guide.weights.sum(1), torch.ones(batch), atol=1e-5, rtol=0)
    best = (query @ bank.t()).argmax(1)
    assert torch.equal(guide.indices[:, 0], best)


@pytest.mark.parametrize("k", [0, MAX_K + 1])
def test_soft_top_k_refuses_k_out_of_range(k):
    with pytest.raises(ModelError, match="K must be between"):
        soft_topk_guide(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 4, 4),
                        torch.zeros(1, 4, 4, dtype=torch.long), 2, k=k)


# --------------------------------------------------------------------------- metrics
@st.composite
def mask_pairs(draw) -> tuple[np.ndarray, np.ndarray, int]:
    classes = draw(st.integers(2, 4))
    shape = draw(st.one_of(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=10),
                           hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=5)))
    labels = hnp.arrays(np.uint8, shape, elements=st.integers(0, classes - 1))
    return draw(labels), draw(labels), classes


@SETTINGS
@given(pair=mask_pairs())
def test_dice_is_symmetric_bounded_and_one_for_identical_masks(pair):
    a, b, classes = pair
    ab, ba = dice_per_class(a, b, classes), dice_per_class(b, a, classes)
    np.testing.assert_allclose(ab, ba, equal_nan=True)
    absent = np.array([not ((a == c).any() or (b == c).any()) for c in range(1, classes)])
    np.testing.assert_array_equal(np.isnan(ab), absent)  # undefined exactly where absent
    assert np.all((ab[~absent] >= 0) & (ab[~absent] <= 1))
    present = np.array([(a == c).any() for c in range(1, classes)])
    same = dice_per_class(a, a, classes)
    np.testing.assert_array_equal(same[present], 1.0)
    assert np.isnan(same[~present]).all()


@SETTINGS
@given(pair=mask_pairs(), spacing=st.none() | st.lists(spacings, min_size=3, max_size=3))
def test_hausdorff_properties(pair, spacing):
    a, b, classes = pair
    spacing = None if spacing is None else spacing[-a.ndim:]
    hd95, hd = hausdorff_per_class(a, b, classes, spacing)
    same95, same = hausdorff_per_class(a, a, classes, spacing)
    present = np.array([(a == c).any() for c in range(1, classes)])
    np.testing.assert_array_equal(same95[present], 0.0)
    np.testing.assert_array_equal(same[present], 0.0)
    assert np.isnan(same[~present]).all()  # absent from both masks: no distance
    in_a = present
    in_b = np.array([(b == c).any() for c in range(1, classes)])
    np.testing.assert_array_equal(np.isnan(hd95), ~in_a & ~in_b)
    np.testing.assert_array_equal(np.isnan(hd), ~in_a & ~in_b)
    finite = ~np.isnan(hd)
    assert np.all(hd95[finite] <= hd[finite] + 1e-9) and np.all(hd95[finite] >= 0)
    assert np.all(hd[finite] <= missing_penalty(a.shape, spacing) + 1e-9)  # never beyond it
    np.testing.assert_allclose(hd[in_a != in_b], missing_penalty(a.shape, spacing))
    back95, back = hausdorff_per_class(b, a, classes, spacing)
    np.testing.assert_allclose(back, hd, equal_nan=True)  # HD is symmetric (HD95 pools both)
    np.testing.assert_allclose(back95, hd95, equal_nan=True)
