"""TransUNet-style backbone (Chen et al. 2021) in plain PyTorch.

A CNN encoder (the U-Net conv blocks) down to 1/16, a pre-norm transformer over the 1/16 feature
map (1x1 patch embedding, learned positional embedding interpolated to other grid sizes), and a
cascaded upsampler (CUP) decoder with skip connections at every scale, then a 1x1 head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..ranges import check_number
from . import register_backbone
from .base import Backbone, check_choice, check_fraction, check_int
from .unet import MAX_CHANNELS, NORMS, ConvDecoder, ConvEncoder, check_widest, make_norm

STRIDE = 16


class TransformerBottleneck(nn.Module):
    """Transformer over a feature map: tokens = pixels of the map, output has its shape."""

    def __init__(self, channels: int, hidden_size: int, num_layers: int, num_heads: int,
                 mlp_ratio: float, grid_size: int, dropout: float, norm: str):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, hidden_size, 1)
        self.pos_embed = nn.Parameter(torch.empty(1, hidden_size, grid_size, grid_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, round(hidden_size * mlp_ratio), dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(hidden_size),
                                                 enable_nested_tensor=False)
        self.conv_more = nn.Sequential(
            nn.Conv2d(hidden_size, channels, 3, padding=1, bias=False),
            make_norm(norm, channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, channels, h, w) -> (B, channels, h, w); the positional grid is interpolated."""
        batch, _, height, width = x.shape
        pos = self.pos_embed
        if pos.shape[-2:] != (height, width):
            pos = F.interpolate(pos, size=(height, width), mode="bilinear", align_corners=False)
        tokens = self.dropout(self.patch_embed(x) + pos).flatten(2).transpose(1, 2)
        tokens = self.transformer(tokens)
        return self.conv_more(tokens.transpose(1, 2).reshape(batch, -1, height, width))


@register_backbone
class TransUNet(Backbone):
    """TransUNet: conv encoder to 1/16, transformer bottleneck, CUP decoder with skips.

    ``img_size`` is the input size the positional embedding grid is laid out for
    (``img_size // 16`` per side); other sizes interpolate it.

    Args:
        num_classes: classes including background.
        use_retrieval: whether the input carries the guide image and mask channels.
        base_channels: channels at full resolution; ``base_channels * 2**level`` at level
            0..4 (base_channels * 16 at most 2048).
        hidden_size: transformer width, divisible by ``num_heads``.
        num_layers: transformer layers.
        num_heads: attention heads.
        mlp_ratio: transformer MLP width as a multiple of ``hidden_size``, in (0, 16].
        img_size: input side the positional grid is laid out for.
        norm: ``group``, ``instance`` or ``batch``.
        dropout: transformer dropout in [0, 1).

    Raises:
        ModelError: an option out of range (:meth:`check_options`).
    """

    name = "transunet"
    size_multiple = STRIDE

    def __init__(self, num_classes: int, use_retrieval: bool, *, base_channels: int = 32,
                 hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, img_size: int = 256, norm: str = "group",
                 dropout: float = 0.1):
        super().__init__(num_classes, use_retrieval, base_channels=base_channels,
                         hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, img_size=img_size, norm=norm, dropout=dropout)
        self.check_options(self._options)
        dropout = float(dropout)
        channels = [base_channels * 2**level for level in range(5)]
        self.feature_channels = channels
        self.encoder = ConvEncoder(self.in_channels, channels, norm)
        self.bottleneck = TransformerBottleneck(channels[-1], hidden_size, num_layers, num_heads,
                                                mlp_ratio, img_size // STRIDE, dropout, norm)
        self.decoder = ConvDecoder(channels, norm, "bilinear")
        self.head = nn.Conv2d(channels[0], num_classes, 1)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Ranges of the options (docs/cli.md, "Configuration reference").

        Raises:
            ModelError: an option out of range or of the wrong type.
        """
        check_int(options["base_channels"], "base_channels", 1, MAX_CHANNELS)
        check_widest(options["base_channels"] * STRIDE, "base_channels * 16")
        check_int(options["hidden_size"], "hidden_size", 1, 2048)
        check_int(options["num_layers"], "num_layers", 1, 48)
        check_int(options["num_heads"], "num_heads", 1, 64)
        check_int(options["img_size"], "img_size", STRIDE, 2048)
        check_choice(options["norm"], "norm", NORMS)
        check_fraction(options["dropout"], "dropout")
        hidden, heads = options["hidden_size"], options["num_heads"]
        if hidden % heads:
            raise ModelError(f"hidden_size ({hidden}) must be divisible by num_heads ({heads})")
        check_number(options["mlp_ratio"], "option 'mlp_ratio'", 0, 16, open_low=True)


    def encode(self, x: Tensor, upto: int | None = None) -> list[Tensor]:
        """Encoder feature maps, finest first; the deepest through the transformer.

        With ``upto`` only levels 0..``upto`` are computed (no transformer unless it is the last).

        Args:
            x: (B, in_channels, H, W) stacked inputs, H and W multiples of 16.
            upto: last level to compute (0..4), or None for all.

        Returns:
            Feature maps; level l is (B, base_channels * 2**l, H / 2**l, W / 2**l).
        """
        features = self.encoder(x, upto)
        if upto is None or upto >= len(self.feature_channels) - 1:
            features[-1] = self.bottleneck(features[-1])
        return features

    def decode(self, features: list[Tensor]) -> Tensor:
        """Logits (B, num_classes, H, W) from all five encoder feature maps."""
        return self.head(self.decoder(features))

    def segment(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes, H, W): :meth:`encode`, then :meth:`decode`."""
        return self.decode(self.encode(x))
