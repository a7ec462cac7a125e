"""Soft top-K fusion: retrieved exemplars become a guide image and a soft one-hot guide mask.

Weights are ``softmax(s_k / tau)`` over the top-K cosine similarities. The choice of the top-K
is not differentiable, the weights are: the segmentation loss reaches the retriever through
them (the bank side is detached; bank embeddings are refreshed on a schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ModelError

MAX_K = 8


@dataclass
class Guide:
    """Fused guidance for a batch: image (B,1,H,W), mask (B,C,H,W), weights/scores (B,K)."""

    image: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor


def check_k_tau(k: int, tau: float) -> None:
    """Validate the fusion hyper-parameters (1 <= K <= 8, tau > 0)."""
    if not 1 <= int(k) <= MAX_K:
        raise ModelError(f"K must be between 1 and {MAX_K}, got {k}")
    if not tau > 0:
        raise ModelError(f"tau must be positive, got {tau}")


def fusion_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax of ``scores / tau`` over the last axis; -inf scores (missing exemplars) get 0."""
    valid = torch.isfinite(scores)
    if not valid.any(dim=-1).all():
        raise ModelError("No exemplar could be retrieved for at least one query (empty bank?)")
    logits = torch.where(valid, scores / tau, torch.full_like(scores, -torch.inf))
    return torch.softmax(logits, dim=-1)


def combine(weights: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
            num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of exemplar images (B,K,H,W) and one-hot masks (B,K,H,W) -> guide pair."""
    if masks.numel() and int(masks.max()) >= num_classes:
        raise ModelError(
            f"An exemplar mask has class {int(masks.max())} but the model has {num_classes} classes")
    w = weights.to(images.dtype)
    guide_image = torch.einsum("bk,bkhw->bhw", w, images)[:, None]
    onehot = F.one_hot(masks.long(), num_classes).to(images.dtype)  # B,K,H,W,C
    guide_mask = torch.einsum("bk,bkhwc->bchw", w, onehot)
    return guide_image, guide_mask


def soft_topk_guide(query_emb: torch.Tensor, bank_emb: torch.Tensor, bank_images: torch.Tensor,
                    bank_masks: torch.Tensor, num_classes: int, k: int = 2, tau: float = 0.1,
                    exclude: torch.Tensor | None = None) -> Guide:
    """Retrieve and fuse in one differentiable pass (used in training and small in-memory banks).

    ``query_emb`` (B,D) and ``bank_emb`` (N,D) are unit vectors; ``bank_images`` (N,H,W) float,
    ``bank_masks`` (N,H,W) int, at the query size. ``exclude`` (B,N) bool marks exemplars a query
    must never retrieve (itself, its own patient).
    """
    check_k_tau(k, tau)
    if bank_emb.shape[0] == 0:
        raise ModelError("The exemplar bank is empty: add annotated exemplars first")
    sim = query_emb @ bank_emb.detach().t()
    if exclude is not None:
        sim = sim.masked_fill(exclude, -torch.inf)
    k_eff = min(k, sim.shape[1])
    scores, indices = sim.topk(k_eff, dim=1)
    weights = fusion_weights(scores, tau)
    images = bank_images[indices]
    masks = bank_masks[indices]
    guide_image, guide_mask = combine(weights, images, masks, num_classes)
    return Guide(guide_image, guide_mask, weights, scores.detach(), indices)
