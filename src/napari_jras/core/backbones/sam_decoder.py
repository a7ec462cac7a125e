"""SAM's prompt encoder and mask decoder (Kirillov et al. 2023) in plain PyTorch.

Module and parameter names follow the original ``segment_anything`` code, so the
``prompt_encoder.*`` and ``mask_decoder.*`` weights of a SAM-family checkpoint such as
LiteMedSAM load by key with ``strict=True``. Only box and mask prompts are implemented (the
point embeddings are kept because the checkpoint holds them). Shapes follow the original:
sparse prompts ``(N, tokens, C)``, dense prompts and image embeddings ``(N, C, h, w)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tinyvit import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of (x, y) coordinates normalised to [0, 1]."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """(..., 2) in [0, 1] -> (..., 2 * num_pos_feats)."""
        coords = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: int) -> Tensor:
        """Encoding of the pixel centres of a ``size`` x ``size`` grid: (1, C, size, size)."""
        centres = (torch.arange(size, device=self.positional_encoding_gaussian_matrix.device,
                                dtype=torch.float32) + 0.5) / size
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)[None]


class PromptEncoder(nn.Module):
    """Boxes to sparse embeddings (two corner tokens); masks to dense embeddings.

    Args:
        embed_dim: channels C of every embedding.
        embedding_size: side h = w of the image-embedding grid (64 for LiteMedSAM).
        input_size: side of the square encoder input, the pixel frame of the boxes.
        mask_channels: hidden channels of the mask downscaling (whose input is the
            ``4 * embedding_size`` square mask prompt).
    """

    def __init__(self, embed_dim: int = 256, embedding_size: int = 64, input_size: int = 256,
                 mask_channels: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.mask_size = 4 * embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0/1: negative/positive point, 2/3: box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_channels // 4, 2, stride=2), LayerNorm2d(mask_channels // 4),
            nn.GELU(),
            nn.Conv2d(mask_channels // 4, mask_channels, 2, stride=2), LayerNorm2d(mask_channels),
            nn.GELU(),
            nn.Conv2d(mask_channels, embed_dim, 1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> Tensor:
        """Positional encoding of the image-embedding grid, (1, C, h, w)."""
        return self.pe_layer.grid(self.embedding_size)

    def forward(self, boxes: Tensor, masks: Tensor | None) -> tuple[Tensor, Tensor]:
        """Boxes ``(N, 4)`` (x1, y1, x2, y2 in input pixels) and mask logits ``(N, 1, 4h, 4w)``
        or None (SAM's "no mask" embedding) -> sparse ``(N, 2, C)``, dense ``(N, C, h, w)``.

        Args:
            boxes: (N, 4) boxes in pixels of the ``input_size`` square.
            masks: (N, 1, 4h, 4w) mask-prompt logits, or None.

        Returns:
            The sparse embeddings (N, 2, C) of the two box corners and the dense embeddings
            (N, C, h, w) of the mask prompt.
        """
        corners = (boxes.reshape(-1, 2, 2) + 0.5) / self.input_size
        sparse = self.pe_layer.encode(corners)
        sparse = sparse + torch.cat([self.point_embeddings[2].weight,
                                     self.point_embeddings[3].weight])[None]
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                boxes.shape[0], -1, self.embedding_size, self.embedding_size)
        return sparse, dense


class Attention(nn.Module):
    """Multi-head attention with projections to ``embed_dim / downsample_rate`` channels."""

    def __init__(self, embed_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = embed_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, inner)
        self.k_proj = nn.Linear(embed_dim, inner)
        self.v_proj = nn.Linear(embed_dim, inner)
        self.out_proj = nn.Linear(inner, embed_dim)

    def _heads(self, x: Tensor) -> Tensor:
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, Nq, C), (B, Nk, C), (B, Nk, C) -> (B, Nq, C).

        Args:
            q: (B, Nq, C) queries.
            k: (B, Nk, C) keys.
            v: (B, Nk, C) values, one per key.

        Returns:
            (B, Nq, C): the heads' attention outputs, joined and projected back to C channels.
        """
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)),
                                             self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        batch, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class MLPBlock(nn.Module):
    """Linear, ReLU, Linear (the two-way transformer's MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)."""
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens-to-image attention, token MLP, image-to-tokens attention.

    Args:
        dim: token channels C.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        skip_first_layer_pe: the first block's self-attention: replace the tokens by their
            attention output, without adding the positional part (SAM's first layer).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor,
                key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Update the tokens (queries) and the image embedding (keys).

        Args:
            queries: (B, N, C) tokens.
            keys: (B, h*w, C) image tokens.
            query_pe: (B, N, C) the tokens as first given (their positional part).
            key_pe: (B, h*w, C) positional encoding of the image tokens.

        Returns:
            The updated queries (B, N, C) and keys (B, h*w, C).
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's decoder transformer: ``depth`` two-way blocks and a final token-to-image attention."""

    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, num_heads, mlp_dim, i == 0)
                                    for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Image ``(B, C, h, w)``, its encoding ``(B, C, h, w)``, tokens ``(B, N, C)`` ->
        (tokens, image tokens ``(B, h*w, C)``).

        Args:
            image: image embeddings ``(B, C, h, w)`` (plus the dense prompt).
            image_pe: their positional encoding ``(B, C, h, w)``.
            tokens: output and prompt tokens ``(B, N, C)``, also used as their own
                positional part in every layer.

        Returns:
            The updated tokens ``(B, N, C)`` and image tokens ``(B, h*w, C)``.
        """
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between (hypernetworks, IoU head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """SAM's mask decoder: output tokens + prompts attend to the image, hypernetworks give masks.

    :meth:`forward` returns the single-mask output (SAM's first mask token), the one used with
    box prompts; the multimask tokens and the IoU head are kept for the checkpoint only.

    Args:
        dim: channels C of the embeddings and tokens.
        num_multimask_outputs: SAM's extra mask tokens (the checkpoint holds 3).
        iou_head_depth: layers of the (unused) IoU prediction head.
        iou_head_hidden_dim: its hidden width.
    """

    def __init__(self, dim: int = 256, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256):
        super().__init__()
        self.transformer = TwoWayTransformer(dim=dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, self.num_mask_tokens,
                                       iou_head_depth)

    def forward(self, image: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> Tensor:
        """Mask logits ``(N, 1, 4h, 4w)`` for image embeddings ``(N, C, h, w)`` (one per prompt),
        positional encoding ``(1, C, h, w)``, sparse ``(N, T, C)`` and dense ``(N, C, h, w)``.

        Args:
            image: image embeddings ``(N, C, h, w)``, one per prompt (repeat an image's
                embedding for several prompts).
            image_pe: the grid's positional encoding ``(1, C, h, w)``
                (:meth:`PromptEncoder.dense_pe`).
            sparse: sparse prompt embeddings ``(N, T, C)`` (box corners, extra tokens).
            dense: dense prompt embeddings ``(N, C, h, w)``, added to ``image``.

        Returns:
            Single-mask logits ``(N, 1, 4h, 4w)`` (not yet resized to the input).
        """
        count = sparse.shape[0]
        output = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output[None].expand(count, -1, -1), sparse], dim=1)
        src = image + dense
        _, channels, height, width = src.shape
        tokens, src = self.transformer(src, image_pe.expand(count, -1, -1, -1), tokens)
        mask_token = tokens[:, 1]  # the single-mask output
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(count, channels, height,
                                                                      width))
        weights = self.output_hypernetworks_mlps[0](mask_token)
        return torch.einsum("nc,nchw->nhw", weights, upscaled)[:, None]
