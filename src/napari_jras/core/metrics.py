"""Segmentation metrics: per-class Dice, HD95 and Hausdorff distance, per case and summarised.

Conventions for a foreground class c (label maps are 2-D or 3-D class indices):

* Dice: exactly one mask empty -> 0.0; both empty (the class is absent from the case) -> NaN,
  so that absent classes never raise a mean (a 1.0 for each of them made a 0/255 mask read as
  256 classes score 0.9).
* Hausdorff (HD, HD95): symmetric distances between the surface (boundary) voxels of the two
  masks, in the units of ``spacing`` (millimetres) or pixels when it is None. HD is the maximum
  and HD95 the 95th percentile of the pooled distances of both directions (as MedPy's ``hd95``).
  Both empty -> NaN (undefined); exactly one empty -> the image diagonal
  (:func:`missing_penalty`, the largest possible distance), and the class is marked
  ``missing``.
* Means over classes and cases ignore NaNs, and :func:`summarize` reports how many there were.
* std is the population standard deviation (``ddof=0``).

The NaNs are plain floats: turn them into ``null`` when writing strict JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .errors import DataError
from .io import check_label

METRICS = ("dice", "hd95", "hd")


def _check_pair(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise DataError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise DataError(f"label maps must be 2-D or 3-D, got shape {pred.shape}")
    return (check_label(pred, num_classes=num_classes, source="prediction"),
            check_label(gt, num_classes=num_classes, source="ground truth"))


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise DataError(f"spacing {spacing} has {len(spacing)} values but the labels are {ndim}-D")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"spacing values must be positive and finite, got {spacing}")
    return spacing


def dice_per_class(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class 1..C-1, shape (C-1,); NaN when both masks are empty.

    Args:
        pred: 2-D or 3-D predicted label map (class indices).
        gt: ground-truth label map of the same shape.
        num_classes: classes including background, an integer >= 2.

    Returns:
        float64 array of (C-1) values in [0, 1] or NaN.

    Raises:
        DataError: ``num_classes`` < 2 or not an integer, shapes differ, the maps are not
            2-D/3-D, or a map fails :func:`~.io.check_label` (e.g. a value >= ``num_classes``).
    """
    pred, gt = _check_pair(pred, gt, num_classes)
    return _dice_all(pred, gt, num_classes)


def mean_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``pred`` or ``gt`` (NaN if none is).

    Args:
        pred, gt, num_classes: as for :func:`dice_per_class`, which also lists the errors.
    """
    return _nanmean(dice_per_class(pred, gt, num_classes))


def _dice_all(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    return np.array([_dice(pred == c, gt == c) for c in range(1, num_classes)], dtype=np.float64)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def hausdorff_per_class(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                        spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(HD95, HD) of each foreground class, each shape (C-1,); see the module conventions.

    Args:
        pred: 2-D or 3-D predicted label map (class indices).
        gt: ground-truth label map of the same shape.
        num_classes: classes including background, an integer >= 2.
        spacing: voxel size per axis of the maps (positive, finite; millimetres), or None to
            measure in pixels.

    Returns:
        Two float64 arrays of (C-1) distances: HD95 and HD.

    Raises:
        DataError: as for :func:`dice_per_class`, or ``spacing`` of the wrong length or with
            a value that is not positive and finite.
    """
    pred, gt = _check_pair(pred, gt, num_classes)
    return _hausdorff_all(pred, gt, num_classes, _check_spacing(spacing, pred.ndim))


def _hausdorff_all(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                   sampling: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    hd95 = np.empty(num_classes - 1)
    hd = np.empty(num_classes - 1)
    for c in range(1, num_classes):
        hd95[c - 1], hd[c - 1] = _hausdorff(pred == c, gt == c, sampling)
    return hd95, hd


def missing_penalty(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """HD / HD95 of a class missing from one mask: the image diagonal (see the module notes).

    Args:
        shape: the label map's shape.
        spacing: voxel size per axis, or None for pixels.

    Returns:
        The distance between the centres of two opposite corner voxels, in the units of
        ``spacing``.
    """
    spacing = spacing or (1.0,) * len(shape)
    return float(np.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def _missing(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Per foreground class: present in exactly one of the two masks."""
    return np.array([(pred == c).any() != (gt == c).any() for c in range(1, num_classes)])


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the image border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure)


def _hausdorff(a: np.ndarray, b: np.ndarray, sampling: tuple[float, ...] | None) -> tuple[float, float]:
    a_any, b_any = bool(a.any()), bool(b.any())
    if not a_any and not b_any:
        return float("nan"), float("nan")
    if not (a_any and b_any):
        penalty = missing_penalty(a.shape, sampling)
        return penalty, penalty
    sa, sb = _surface(a), _surface(b)
    # Crop to the surfaces' bounding box: the distance to the nearest surface voxel is unchanged.
    box = ndimage.find_objects((sa | sb).astype(np.uint8))[0]
    sa, sb = sa[box], sb[box]
    a_to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)[sa]
    b_to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)[sb]
    distances = np.concatenate([a_to_b, b_to_a])
    return float(np.percentile(distances, 95)), float(distances.max())


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _nanstd(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.std()) if finite.size else float("nan")


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [f"class_{c}" for c in range(1, num_classes)]
    names = [str(n) for n in class_names]
    if len(names) == num_classes:  # includes the background name
        names = names[1:]
    if len(names) != num_classes - 1:
        raise DataError(
            f"got {len(names)} class names for {num_classes} classes; give one per foreground "
            f"class ({num_classes - 1}) or one per class including background ({num_classes})"
        )
    if len(set(names)) != len(names):
        raise DataError(f"class names must be unique, got {names}")
    return names


def evaluate_case(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                  spacing: Sequence[float] | None = None,
                  class_names: Sequence[str] | None = None) -> dict:
    """Per-class Dice, HD95 and HD of one case, and their means over the foreground classes.

    Returns ``{"per_class": {name: {"dice", "hd95", "hd", "missing"}}, "mean": {"dice",
    "hd95", "hd"}, "units": "mm" | "pixels"}``; ``missing`` is True for a class present in
    exactly one of the two masks (its distances are the penalty). ``class_names`` lists the
    foreground classes (or all classes, background first); default ``class_1``, ``class_2``,
    ...

    Args:
        pred: 2-D or 3-D predicted label map (class indices).
        gt: ground-truth label map of the same shape.
        num_classes: classes including background, an integer >= 2.
        spacing: voxel size per axis (millimetres), or None for pixels.
        class_names: C - 1 or C unique names, or None.

    Returns:
        The dict above; values are Python floats (NaN where undefined) and bools.

    Raises:
        DataError: bad maps or ``spacing`` (:func:`hausdorff_per_class`), or a wrong number
            of class names, or repeated names.
    """
    pred, gt = _check_pair(pred, gt, num_classes)
    spacing = _check_spacing(spacing, pred.ndim)
    names = _class_names(class_names, num_classes)
    values = {"dice": _dice_all(pred, gt, num_classes)}
    values["hd95"], values["hd"] = _hausdorff_all(pred, gt, num_classes, spacing)
    missing = _missing(pred, gt, num_classes)
    return {
        "per_class": {name: {**{m: float(values[m][i]) for m in METRICS},
                             "missing": bool(missing[i])} for i, name in enumerate(names)},
        "mean": {m: _nanmean(values[m]) for m in METRICS},
        "units": "pixels" if spacing is None else "mm",
    }


def summarize(case_results: Sequence[dict]) -> dict:
    """Mean, std and NaN count over cases of every per-class and foreground-mean metric.

    Returns ``{"n_cases", "units", "n_missing", "per_class": {name: {metric: {"mean", "std",
    "n_nan"}, "n_missing"}}, "mean": {metric: {"mean", "std", "n_nan"}}}``; ``mean``
    summarises the per-case foreground means; ``n_missing`` counts the cases where the class was
    missing from one mask (penalised distances), in all over the classes at the top level.

    Args:
        case_results: :func:`evaluate_case` outputs, all with the same classes and units.

    Returns:
        The summary dict above (means and population stds ignore NaNs; NaN when all are).

    Raises:
        DataError: no results, mixed units, or results with different classes.
    """
    if not case_results:
        raise DataError("No case results to summarise")
    names = list(case_results[0]["per_class"])
    units = {r["units"] for r in case_results}
    if len(units) > 1:
        raise DataError(f"case results mix units {sorted(units)}; evaluate all cases the same way")
    for r in case_results:
        if list(r["per_class"]) != names:
            raise DataError(f"case results have different classes: {names} vs {list(r['per_class'])}")

    def stats(values: list[float]) -> dict:
        arr = np.asarray(values, dtype=np.float64)
        return {"mean": _nanmean(arr), "std": _nanstd(arr), "n_nan": int(np.isnan(arr).sum())}

    missing = {name: sum(bool(r["per_class"][name].get("missing")) for r in case_results)
               for name in names}
    return {
        "n_cases": len(case_results),
        "units": units.pop(),
        "n_missing": sum(missing.values()),
        "per_class": {
            name: {**{m: stats([r["per_class"][name][m] for r in case_results]) for m in METRICS},
                   "n_missing": missing[name]}
            for name in names
        },
        "mean": {m: stats([r["mean"][m] for r in case_results]) for m in METRICS},
    }
