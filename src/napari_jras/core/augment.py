"""Batch augmentation on tensors: random affine (image bilinear, label nearest) and intensity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                  max_rotation: float = 15.0, scale: tuple[float, float] = (0.85, 1.15),
                  max_shift: float = 0.05) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate/scale/shift (B,H,W) images and labels with the same random transform per sample.

    Args:
        images: (B, H, W) float images, resampled bilinearly.
        labels: (B, H, W) integer label maps, resampled nearest-neighbour, or None.
        generator: a CPU generator; the draws are moved to ``images``' device.
        max_rotation: largest rotation in degrees (uniform in [-max_rotation, max_rotation]).
        scale: range of the zoom factor (uniform); above 1 the content is enlarged.
        max_shift: largest translation per axis as a fraction of the image side.

    Returns:
        The transformed images (B, H, W) and labels (B, H, W) in ``labels``' dtype (None when
        ``labels`` is None); pixels moved in from outside the image are 0 (background).
    """
    b = images.shape[0]
    rand = torch.rand(b, 4, generator=generator).to(images.device)
    angle = (rand[:, 0] * 2 - 1) * math.radians(max_rotation)
    s = scale[0] + rand[:, 1] * (scale[1] - scale[0])
    tx, ty = (rand[:, 2] * 2 - 1) * max_shift * 2, (rand[:, 3] * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, *images.shape[-2:]), align_corners=False)
    out = F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[:, 0]
    out_labels = None
    if labels is not None:
        out_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest",
                                   padding_mode="zeros", align_corners=False)[:, 0].to(labels.dtype)
    return out, out_labels


def random_intensity(images: torch.Tensor, generator: torch.Generator,
                     gamma: tuple[float, float] = (0.7, 1.5), contrast: float = 0.15,
                     noise: float = 0.02) -> torch.Tensor:
    """Random gamma, contrast/brightness jitter and Gaussian noise; output clipped to [0, 1].

    Args:
        images: (B, H, W) float images in [0, 1] (clamped to it first).
        generator: a CPU generator; the draws are moved to ``images``' device.
        gamma: range of the exponent (uniform, one per image).
        contrast: the intensity factor is uniform in [1 - contrast, 1 + contrast] and the added
            brightness in [-contrast / 2, contrast / 2].
        noise: standard deviation of the additive Gaussian noise.

    Returns:
        (B, H, W) augmented images in [0, 1].
    """
    b = images.shape[0]
    rand = torch.rand(b, 3, generator=generator).to(images.device)
    g = (gamma[0] + rand[:, 0] * (gamma[1] - gamma[0])).view(b, 1, 1)
    c = (1 + (rand[:, 1] * 2 - 1) * contrast).view(b, 1, 1)
    shift = ((rand[:, 2] * 2 - 1) * contrast / 2).view(b, 1, 1)
    out = images.clamp(0, 1) ** g * c + shift
    eps = torch.randn(images.shape, generator=generator).to(images.device) * noise
    return (out + eps).clamp(0, 1)


def augment(images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Geometric then intensity augmentation of a (B,H,W) batch.

    :func:`random_affine` and :func:`random_intensity` with their default ranges.

    Args:
        images: (B, H, W) float images in [0, 1].
        labels: (B, H, W) integer label maps (transformed with the images), or None.
        generator: a CPU generator, the only source of randomness.

    Returns:
        The augmented images (B, H, W) in [0, 1] and labels (None when ``labels`` is None).
    """
    images, labels = random_affine(images, labels, generator)
    return random_intensity(images, generator), labels
