"""Dice, HD95 and Hausdorff distance per class, per case and summarised."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from napari_jras.core.errors import DataError
from napari_jras.core.metrics import (
    dice_per_class,
    evaluate_case,
    hausdorff_per_class,
    mean_dice,
    missing_penalty,
    summarize,
)


def square(shape=(40, 40), top=10, left=10, size=10, value=1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    out[top:top + size, left:left + size] = value
    return out


def test_dice_hand_computed():
    gt = np.array([[0, 1, 1, 0],
                   [0, 1, 1, 0],
                   [2, 2, 0, 0]])
    pred = np.array([[0, 1, 0, 0],
                     [0, 1, 1, 1],
                     [2, 0, 0, 0]])
    # class 1: |P|=4, |G|=4, overlap 3 -> 6/8; class 2: |P|=1, |G|=2, overlap 1 -> 2/3
    np.testing.assert_allclose(dice_per_class(pred, gt, 3), [0.75, 2 / 3])


def test_identical_masks():
    gt = square() + square(top=25, left=25, size=8, value=2)
    assert np.array_equal(dice_per_class(gt, gt, 3), [1.0, 1.0])
    hd95, hd = hausdorff_per_class(gt, gt, 3)
    assert np.array_equal(hd95, [0.0, 0.0]) and np.array_equal(hd, [0.0, 0.0])


@pytest.mark.parametrize("d", [1, 3, 7])
def test_hausdorff_of_shifted_squares_is_shift(d):
    _, hd = hausdorff_per_class(square(left=10 + d), square(), 2)
    assert hd[0] == pytest.approx(d)


def test_spacing_scales_distances():
    pred, gt = square(left=14), square()
    hd95_px, hd_px = hausdorff_per_class(pred, gt, 2)
    hd95_mm, hd_mm = hausdorff_per_class(pred, gt, 2, spacing=(2.0, 0.5))
    assert hd_px[0] == pytest.approx(4.0) and hd_mm[0] == pytest.approx(2.0)
    assert hd95_mm[0] == pytest.approx(0.5 * hd95_px[0])
    assert hausdorff_per_class(pred, gt, 2, spacing=(3.0, 3.0))[1][0] == pytest.approx(12.0)


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    spacing = (1.5, 0.7)
    structure = ndimage.generate_binary_structure(2, 1)
    for _ in range(5):
        gt = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((48, 56)), 3) > 0.5)
        pred = ndimage.binary_dilation(gt, iterations=2) ^ (rng.random(gt.shape) > 0.97)
        surfaces = [np.argwhere(m & ~ndimage.binary_erosion(m, structure)) * spacing
                    for m in (pred, gt)]
        pairwise = cdist(*surfaces)
        pooled = np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)])
        hd95, hd = hausdorff_per_class(pred.astype(np.uint8), gt.astype(np.uint8), 2, spacing)
        assert hd[0] == pytest.approx(pooled.max())
        assert hd95[0] == pytest.approx(np.percentile(pooled, 95))


def test_empty_class_conventions():
    gt = square()
    empty = np.zeros_like(gt)
    assert math.isnan(dice_per_class(empty, empty, 2)[0])  # absent class: no score
    assert dice_per_class(empty, gt, 2)[0] == 0.0
    assert dice_per_class(gt, empty, 2)[0] == 0.0
    hd95, hd = hausdorff_per_class(empty, empty, 2)
    assert math.isnan(hd95[0]) and math.isnan(hd[0])  # absent from both: no distance
    diagonal = math.hypot(gt.shape[0] - 1, gt.shape[1] - 1)
    for pred, truth in ((empty, gt), (gt, empty)):  # missing from one mask: the penalty
        hd95, hd = hausdorff_per_class(pred, truth, 2)
        assert hd95[0] == pytest.approx(diagonal) and hd[0] == pytest.approx(diagonal)
    hd95, hd = hausdorff_per_class(empty, gt, 2, spacing=(2.0, 0.5))
    assert hd[0] == pytest.approx(math.hypot(2.0 * (gt.shape[0] - 1), 0.5 * (gt.shape[1] - 1)))


def test_missing_penalty_is_the_largest_possible_distance():
    assert missing_penalty((5, 5)) == pytest.approx(math.hypot(4, 4))
    assert missing_penalty((3, 5, 9), (2.0, 1.0, 0.5)) == pytest.approx(math.sqrt(16 + 16 + 16))
    corners = np.zeros((20, 30), np.uint8)
    corners[0, 0], corners[-1, -1] = 1, 2
    pred = np.where(corners == 2, 1, 0)  # class 1 at the opposite corner: the worst real case
    assert hausdorff_per_class(pred, (corners == 1).astype(np.uint8), 2)[1][0] <= \
        missing_penalty(corners.shape)


def test_3d_volumes():
    gt = np.zeros((6, 20, 20), dtype=np.uint8)
    gt[1:5, 5:15, 5:15] = 1
    pred = np.zeros_like(gt)
    pred[1:5, 5:15, 7:17] = 1
    assert dice_per_class(pred, gt, 2)[0] == pytest.approx(2 * 4 * 10 * 8 / (2 * 400))
    assert hausdorff_per_class(pred, gt, 2)[1][0] == pytest.approx(2.0)
    assert hausdorff_per_class(pred, gt, 2, spacing=(5.0, 1.0, 0.5))[1][0] == pytest.approx(1.0)


def test_evaluate_case_structure_and_means():
    gt = square() + square(top=25, left=25, size=8, value=2)
    pred = square(left=12) + square(top=25, left=25, size=8, value=2)
    result = evaluate_case(pred, gt, 4, spacing=(1.0, 1.0), class_names=["bg", "a", "b", "c"])
    assert result["units"] == "mm"
    assert list(result["per_class"]) == ["a", "b", "c"]
    assert result["per_class"]["a"]["dice"] == pytest.approx(0.8)
    assert result["per_class"]["a"]["hd"] == pytest.approx(2.0)
    assert result["per_class"]["b"] == {"dice": 1.0, "hd95": 0.0, "hd": 0.0, "missing": False}
    c = result["per_class"]["c"]  # absent from both: no Dice, no distance, not in the means
    assert math.isnan(c["dice"]) and math.isnan(c["hd95"]) and math.isnan(c["hd"])
    assert not c["missing"]
    assert result["mean"]["dice"] == pytest.approx((0.8 + 1) / 2)
    assert result["mean"]["hd"] == pytest.approx(2.0 / 2)
    unnamed = evaluate_case(pred, gt, 3)
    assert unnamed["units"] == "pixels" and list(unnamed["per_class"]) == ["class_1", "class_2"]


def test_evaluate_case_penalises_a_missed_class():
    gt = square() + square(top=25, left=25, size=8, value=2)
    pred = square()  # class 2 missed entirely: the penalty, counted in the mean
    result = evaluate_case(pred, gt, 3)
    penalty = missing_penalty(gt.shape)
    assert result["per_class"]["class_2"]["hd"] == pytest.approx(penalty)
    assert result["per_class"]["class_2"]["missing"] and not result["per_class"]["class_1"]["missing"]
    assert result["mean"]["hd"] == pytest.approx(penalty / 2)
    assert result["mean"]["dice"] == pytest.approx(0.5)


def test_classes_absent_from_both_masks_never_raise_a_mean():
    """A 0/255 mask read as 256 classes scored mean Dice 0.9 from 254 absent classes."""
    gt = square(value=255)
    pred = square(left=12, value=255)  # shifted by 2 of 10 pixels: Dice 0.8
    result = evaluate_case(pred, gt, 256)
    dice = [v["dice"] for v in result["per_class"].values()]
    assert sum(not math.isnan(d) for d in dice) == 1
    assert result["mean"]["dice"] == pytest.approx(result["per_class"]["class_255"]["dice"])
    assert result["mean"]["dice"] == pytest.approx(0.8)
    assert mean_dice(pred, gt, 256) == pytest.approx(0.8)
    assert math.isnan(mean_dice(np.zeros_like(gt), np.zeros_like(gt), 3))
    summary = summarize([result, evaluate_case(np.zeros_like(gt), np.zeros_like(gt), 256)])
    assert summary["mean"]["dice"]["mean"] == pytest.approx(result["mean"]["dice"])
    assert summary["mean"]["dice"]["n_nan"] == 1
    assert summary["per_class"]["class_1"]["dice"]["n_nan"] == 2


def test_summarize_mean_std_and_nan_counts():
    gt = square()
    cases = [evaluate_case(square(left=10 + d), gt, 2) for d in (0, 2, 4)]
    cases.append(evaluate_case(np.zeros_like(gt), gt, 2))
    summary = summarize(cases)
    assert summary["n_cases"] == 4 and summary["units"] == "pixels"
    dices = [1.0, 0.8, 0.6, 0.0]
    hd = summary["per_class"]["class_1"]["hd"]
    hds = [0, 2, 4, missing_penalty(gt.shape)]
    assert hd["mean"] == pytest.approx(np.mean(hds)) and hd["std"] == pytest.approx(np.std(hds))
    assert hd["n_nan"] == 0 and summary["per_class"]["class_1"]["n_missing"] == 1
    assert summary["n_missing"] == 1
    dice = summary["per_class"]["class_1"]["dice"]
    assert dice["mean"] == pytest.approx(np.mean(dices)) and dice["std"] == pytest.approx(np.std(dices))
    assert summary["mean"]["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert summary["mean"]["hd"]["n_nan"] == 0
    both_empty = summarize([evaluate_case(np.zeros_like(gt), np.zeros_like(gt), 2)])
    assert both_empty["mean"]["hd"]["n_nan"] == 1 and both_empty["n_missing"] == 0


def test_summarize_rejects_empty_and_mixed_units():
    with pytest.raises(DataError, match="No case results"):
        summarize([])
    gt = square()
    with pytest.raises(DataError, match="mix units"):
        summarize([evaluate_case(gt, gt, 2), evaluate_case(gt, gt, 2, spacing=(1, 1))])


@pytest.mark.parametrize("pred,gt,num_classes,spacing,message", [
    (np.zeros((4, 4)), np.zeros((4, 5)), 2, None, "does not match"),
    (np.full((4, 4), 3), np.zeros((4, 4)), 3, None, "class value 3"),
    (np.zeros((4, 4)), np.full((4, 4), -1), 3, None, "negative"),
    (np.zeros(4), np.zeros(4), 2, None, "2-D or 3-D"),
    (np.zeros((4, 4)), np.zeros((4, 4)), 1, None, "num_classes"),
    (np.zeros((4, 4)), np.zeros((4, 4)), 2, (1.0,), "spacing"),
    (np.zeros((4, 4)), np.zeros((4, 4)), 2, (1.0, 0.0), "positive"),
])
def test_invalid_inputs(pred, gt, num_classes, spacing, message):
    with pytest.raises(DataError, match=message):
        evaluate_case(pred, gt, num_classes, spacing=spacing)


def test_invalid_class_names():
    gt = square()
    with pytest.raises(DataError, match="class names"):
        evaluate_case(gt, gt, 3, class_names=["a", "b", "c", "d"])
