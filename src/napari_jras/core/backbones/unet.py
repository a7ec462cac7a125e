"""Classic U-Net (Ronneberger et al. 2015) in plain PyTorch, plus the conv blocks TransUNet reuses.

Default normalisation is GroupNorm: unlike BatchNorm it does not depend on the batch (inference
runs one slice at a time, training batches are small, and train/eval behave the same), and unlike
InstanceNorm it still works when a deep feature map shrinks to 1x1 on small inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from . import register_backbone
from .base import Backbone, check_choice, check_fraction, check_int

NORMS = ("group", "instance", "batch")
MAX_DEPTH = 6
MAX_CHANNELS = 2048  # widest feature map of the conv backbones (the U-Net default has 512)
UPSAMPLING = ("bilinear", "transpose")


def check_widest(channels: int, what: str) -> None:
    """Refuse a conv backbone whose widest feature map would exceed :data:`MAX_CHANNELS`."""
    if channels > MAX_CHANNELS:
        raise ModelError(f"{what} = {channels} channels is more than {MAX_CHANNELS}: lower "
                         "option 'base_channels' (or 'depth')")


def make_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation layer ``kind`` ("group" uses up to 8 groups) for ``channels`` channels.

    Args:
        kind: ``group`` (``gcd(channels, 8)`` groups), ``instance`` (affine) or anything else
            for batch norm.
        channels: channels to normalise.

    Returns:
        A new normalisation module.
    """
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.BatchNorm2d(channels)


class ConvBlock(nn.Sequential):
    """(conv3x3 - norm - ReLU) x 2, with optional channel dropout between the two convolutions."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float = 0.0):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout else nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Upsample x2 to ``out_channels``, concatenate the skip features, then a :class:`ConvBlock`."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str,
                 upsample: str, dropout: float = 0.0):
        super().__init__()
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        self.conv = ConvBlock(out_channels + skip_channels, out_channels, norm, dropout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Coarse features (B, in, h, w) and skip features (B, skip, 2h, 2w) -> (B, out, 2h, 2w)."""
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class ConvEncoder(nn.Module):
    """A :class:`ConvBlock` at full resolution, then (maxpool, ConvBlock) per entry of ``channels``."""

    def __init__(self, in_channels: int, channels: list[int], norm: str, dropout: float = 0.0):
        super().__init__()
        self.stem = ConvBlock(in_channels, channels[0], norm, dropout)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(c_in, c_out, norm, dropout))
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )

    def forward(self, x: Tensor, upto: int | None = None) -> list[Tensor]:
        """Feature maps at strides 1, 2, 4, ..., finest first (levels 0..``upto`` if given)."""
        features = [self.stem(x)]
        for down in self.downs[:upto]:
            features.append(down(features[-1]))
        return features


class ConvDecoder(nn.Module):
    """U-Net decoder: from the deepest feature map up to full resolution through the skips."""

    def __init__(self, channels: list[int], norm: str, upsample: str, dropout: float = 0.0):
        super().__init__()
        self.ups = nn.ModuleList(
            UpBlock(channels[i + 1], channels[i], channels[i], norm, upsample, dropout)
            for i in reversed(range(len(channels) - 1))
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        """Encoder feature maps (finest first, all levels) -> (B, channels[0], H, W)."""
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1]), strict=True):
            x = up(x, skip)
        return x


@register_backbone
class UNet(Backbone):
    """U-Net with ``depth`` downsamplings; channels ``base_channels * 2**level``.

    Args:
        num_classes: classes including background.
        use_retrieval: whether the input carries the guide image and mask channels.
        base_channels: channels at full resolution, 1..2048.
        depth: number of downsamplings, 1..6 (inputs are padded to multiples of 2**depth);
            ``base_channels * 2**depth`` at most 2048.
        norm: ``group``, ``instance`` or ``batch``.
        upsample: ``bilinear`` (then a 1x1 convolution) or ``transpose`` (transposed
            convolution).
        dropout: channel dropout inside every conv block, in [0, 1).

    Raises:
        ModelError: an option out of range (:meth:`check_options`).
    """

    name = "unet"

    def __init__(self, num_classes: int, use_retrieval: bool, *, base_channels: int = 32,
                 depth: int = 4, norm: str = "group", upsample: str = "bilinear",
                 dropout: float = 0.0):
        super().__init__(num_classes, use_retrieval, base_channels=base_channels, depth=depth,
                         norm=norm, upsample=upsample, dropout=dropout)
        self.check_options(self._options)
        dropout = float(dropout)
        channels = [base_channels * 2**level for level in range(depth + 1)]
        self.size_multiple = 2**depth
        self.feature_channels = channels
        self.encoder = ConvEncoder(self.in_channels, channels, norm, dropout)
        self.decoder = ConvDecoder(channels, norm, upsample, dropout)
        self.head = nn.Conv2d(channels[0], num_classes, 1)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """``base_channels`` 1..2048, ``depth`` 1..6, widest map <= 2048 channels, ...

        Raises:
            ModelError: an option out of range or of the wrong type.
        """
        check_int(options["base_channels"], "base_channels", 1, MAX_CHANNELS)
        check_int(options["depth"], "depth", 1, MAX_DEPTH)
        check_widest(options["base_channels"] * 2 ** options["depth"], "base_channels * 2**depth")
        check_choice(options["norm"], "norm", NORMS)
        check_choice(options["upsample"], "upsample", UPSAMPLING)
        check_fraction(options["dropout"], "dropout")

    def encode(self, x: Tensor, upto: int | None = None) -> list[Tensor]:
        """Encoder feature maps, finest first (levels 0..``upto`` if given).

        Args:
            x: (B, in_channels, H, W) stacked inputs, H and W multiples of 2**depth.
            upto: last level to compute (0..depth), or None for all.

        Returns:
            Feature maps; level l is (B, base_channels * 2**l, H / 2**l, W / 2**l).
        """
        return self.encoder(x, upto)

    def decode(self, features: list[Tensor]) -> Tensor:
        """Logits (B, num_classes, H, W) from all ``depth + 1`` encoder feature maps."""
        return self.head(self.decoder(features))

    def segment(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes, H, W): :meth:`encode`, then :meth:`decode`."""
        return self.decode(self.encode(x))
