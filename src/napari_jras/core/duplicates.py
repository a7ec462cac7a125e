"""Near-duplicate images grouped into pseudo-patients (2-D datasets without patient ids).

Public 2-D datasets such as BUSI and COVID-19 CT hold near-copies of the same image (crops,
re-exports, the same scan under two class folders: BUSI's ``benign_433`` and ``malignant_145``
are identical). Split by image, such copies land on both sides and a retrieval model "finds" the
answer. Here two images are **near-duplicates** when the Pearson correlation of their
thumbnails reaches ``THRESHOLD`` = 0.95: each image is resized (bilinear, antialiased, aspect
ignored) to ``THUMB`` x ``THUMB`` = 64 x 64 pixels and z-scored, so the correlation is
insensitive to brightness, contrast and size. The threshold is the one used in the audit that
found the problem (issue 14: 19 of 98 BUSI validation images of seed 0 had a training image at
>= 0.95, with masks agreeing at median Dice 0.92). Measured on the 486 BUSI benign + malignant
images: median pairwise correlation 0.48, 99 % of pairs below 0.82, 93 pairs at >= 0.95, which
form 70 groups of 2-5 images (405 pseudo-patients); COVID-19 CT train (50 slices): 2 pairs.
Groups are the connected components of the near-duplicate relation (union-find), so a chain
a~b~c is one pseudo-patient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data import as_slices, resize_images

THUMB = 64
THRESHOLD = 0.95
_BLOCK = 1024  # rows of the correlation matrix computed at once (bounded memory)


def thumbnails(images: Sequence[np.ndarray], size: int = THUMB) -> np.ndarray:
    """(N, size*size) float32 rows, z-scored and scaled so that ``a @ b`` is the correlation.

    Each image is 2-D (a 3-D input is reduced to its middle slice); a constant image gives a
    zero row (correlation 0 with everything).

    Args:
        images: N 2-D or 3-D arrays of any size and numeric dtype.
        size: side of the thumbnails; each image is resized to ``size`` x ``size`` (bilinear,
            antialiased, aspect ratio ignored).

    Returns:
        (N, size * size) float32 array of unit-norm, zero-mean rows ((0, size * size) for no
        images).
    """
    rows = []
    for image in images:
        slices = as_slices(np.asarray(image, dtype=np.float32))
        thumb = resize_images(slices[len(slices) // 2][None], (size, size))[0].ravel()
        thumb = thumb - thumb.mean()
        norm = float(np.linalg.norm(thumb))
        rows.append(thumb / norm if norm > 1e-6 * size else np.zeros_like(thumb))
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, size * size), np.float32)


def duplicate_pairs(a: np.ndarray, b: np.ndarray | None = None,
                    threshold: float = THRESHOLD) -> list[tuple[int, int]]:
    """Index pairs (i, j) whose thumbnails correlate >= ``threshold``.

    With ``b`` None: pairs i < j within ``a``; else pairs between rows of ``a`` and of ``b``.

    Args:
        a: (N, P) rows from :func:`thumbnails`.
        b: (M, P) rows from :func:`thumbnails` of the same size, or None.
        threshold: smallest correlation (in [-1, 1]) that makes a pair.

    Returns:
        Pairs (i, j) of Python ints, i a row of ``a`` and j a row of ``b`` (of ``a`` when ``b``
        is None), ordered by i, then j.
    """
    pairs = []
    other = a if b is None else b
    for start in range(0, len(a), _BLOCK):
        corr = a[start:start + _BLOCK] @ other.T
        i, j = np.nonzero(corr >= threshold)
        i = i + start
        keep = i < j if b is None else np.ones(len(i), bool)
        pairs += list(zip(i[keep].tolist(), j[keep].tolist(), strict=True))
    return pairs


def duplicate_groups(names: Sequence[str], images: Sequence[np.ndarray],
                     threshold: float = THRESHOLD) -> dict[str, str]:
    """Pseudo-patient of each name: the first (sorted) name of its near-duplicate group.

    ``names[i]`` names ``images[i]``; a name may repeat (e.g. a patient id for each of its
    slices): images of one name always share a group, and a near-duplicate pair joins the
    groups of its two names.

    Args:
        names: one name per image (converted with ``str``).
        images: the 2-D (or 3-D: middle slice) images, as for :func:`thumbnails`.
        threshold: smallest thumbnail correlation that makes two images near-duplicates.

    Returns:
        ``{name: group name}`` for every distinct name; a name without near-duplicates maps
        to itself.

    Raises:
        ValueError: ``names`` and ``images`` differ in length.
    """
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    parent = {str(n): str(n) for n in names}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for i, j in duplicate_pairs(thumbnails(images), threshold=threshold):
        ri, rj = root(str(names[i])), root(str(names[j]))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return {name: root(name) for name in parent}
