"""Losses of the joint trainer: segmentation (CE + Dice), mask relevance, InfoNCE, NT-Xent."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory import RELEVANCE_SIZE


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes.

    Args:
        logits: (B, C, H, W) class scores (any float type; computed in float32).
        target: (B, H, W) class indices.

    Returns:
        The scalar loss: mean cross-entropy + (1 - mean foreground soft Dice).
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice.mean())


def relevance_masks(labels: torch.Tensor, num_classes: int, chunk: int = 64) -> torch.Tensor:
    """One-hot (N,C,32,32) area-downsampled masks of labels (N,H,W), made ``chunk`` at a time
    (the full-resolution one-hot of every slice at once would take N*H*W*C*8 bytes).

    Args:
        labels: ``(N, H, W)`` int64 class indices, each below ``num_classes``.
        num_classes: classes including background.
        chunk: slices one-hot encoded at a time (bounds the memory).

    Returns:
        ``(N, num_classes, 32, 32)`` float32: each class's pixel share of every cell
        (side :data:`~.memory.RELEVANCE_SIZE`).
    """
    parts = [F.interpolate(F.one_hot(labels[i:i + chunk], num_classes).permute(0, 3, 1, 2).float(),
                           size=(RELEVANCE_SIZE, RELEVANCE_SIZE), mode="area")
             for i in range(0, len(labels), chunk)]
    return torch.cat(parts)


def mask_relevance(query_masks: torch.Tensor, cand_masks: torch.Tensor) -> torch.Tensor:
    """Mean foreground Dice between (B,C,h,w) and (M,C,h,w) one-hot masks -> (B, M).

    A class absent from both masks counts as a perfect match, so empty slices find empty slices.
    """
    q = query_masks.flatten(2)  # B,C,P
    c = cand_masks.flatten(2)  # M,C,P
    inter = torch.einsum("bcp,mcp->bmc", q, c)
    sums = q.sum(-1)[:, None, :] + c.sum(-1)[None, :, :]
    dice = torch.where(sums > 0, 2 * inter / sums.clamp_min(1e-6), torch.ones_like(sums))
    return dice[..., 1:].mean(-1)


def info_nce(q: torch.Tensor, c: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Multi-positive InfoNCE: -log(sum_pos exp(s/tau) / sum_valid exp(s/tau)), mean over rows.

    Args:
        q: (B, D) unit query embeddings.
        c: (M, D) unit candidate embeddings.
        positives: (B, M) bool, the candidates that count as positives of each query.
        valid: (B, M) bool, the candidates a query may be compared with at all.
        tau: softmax temperature.

    Returns:
        The scalar loss over the queries with at least one valid positive (0 when none has).
    """
    logits = (q @ c.t()) / tau
    logits = logits.masked_fill(~valid, -torch.inf)
    pos = logits.masked_fill(~(positives & valid), -torch.inf)
    rows = (positives & valid).any(1)
    if not rows.any():
        return logits.new_zeros(())
    loss = torch.logsumexp(logits[rows], 1) - torch.logsumexp(pos[rows], 1)
    return loss.mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent on two batches of unit embeddings (positives: same row).

    Args:
        z1: ``(N, D)`` unit embeddings of the first views.
        z2: ``(N, D)`` unit embeddings of the second views, row i pairing ``z1[i]``.
        tau: softmax temperature.

    Returns:
        The scalar loss: cross-entropy of each of the 2N embeddings finding its pair among
        the other 2N - 1.
    """
    z = torch.cat([z1, z2])
    sim = (z @ z.t()) / tau
    n = z1.shape[0]
    sim.fill_diagonal_(-torch.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
