"""Soft top-K fusion: retrieved exemplars become a guide image and a soft one-hot guide mask.

Weights are ``softmax(s_k / tau)`` over the top-K cosine similarities. The choice of the top-K
is not differentiable, the weights are: the segmentation loss reaches the retriever through
them (the bank side is detached; bank embeddings are refreshed on a schedule).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ModelError
from .ranges import check_number

MAX_K = 8
MIN_TAU, MAX_TAU = 0.01, 10.0


@dataclass
class Guide:
    """Guidance for a batch.

    ``image`` (B,1,H,W) and ``mask`` (B,C,H,W) are the fused guide the ``concat`` fusion stacks
    onto the query; ``exemplars`` (B,K,H,W) float and ``exemplar_masks`` (B,K,H,W) int are the
    exemplars themselves, which the ``readout`` fusion reads one by one; ``present`` (B,K) is
    False for empty slots (a query trained or predicted without exemplars). ``weights`` and
    ``scores`` are (B,K). ``readout_trust`` (B,), set by the inference engine only: how much
    the readout fusion's propagated mask counts in each query's prediction
    (:func:`~.readout.trust_readout`).
    """

    image: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    exemplars: torch.Tensor | None = None
    exemplar_masks: torch.Tensor | None = None
    present: torch.Tensor | None = None
    readout_trust: torch.Tensor | None = None


def make_guide(images: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor,
               scores: torch.Tensor, indices: torch.Tensor, num_classes: int) -> Guide:
    """A :class:`Guide` from exemplars (B,K,H,W) and their fusion weights (B,K).

    Args:
        images: (B, K, H, W) float exemplar images, at the query size.
        masks: (B, K, H, W) integer exemplar label maps, values below ``num_classes``.
        weights: (B, K) fusion weights (:func:`fusion_weights`).
        scores: (B, K) retrieval scores; -inf marks a slot no exemplar filled.
        indices: (B, K) bank rows of the exemplars.
        num_classes: number of classes including background.

    Returns:
        The guide, with ``present`` = finite ``scores``.

    Raises:
        ModelError: an exemplar mask holds a class >= ``num_classes``.
    """
    guide_image, guide_mask = combine(weights, images, masks, num_classes)
    present = torch.isfinite(scores).to(weights.device)  # -inf: a slot no exemplar filled
    return Guide(guide_image, guide_mask, weights, scores, indices, images, masks, present)


def empty_guide(batch: int, size: tuple[int, int], num_classes: int,
                device: torch.device | str = "cpu") -> Guide:
    """A guide with no exemplar: all-zero guide image and mask, as guide dropout trains.

    Args:
        batch: number of queries B.
        size: (H, W) of the queries.
        num_classes: number of classes C including background.
        device: where the tensors are made.

    Returns:
        A guide with one empty slot per query: zero ``image`` (B, 1, H, W), ``mask``
        (B, C, H, W) and ``weights`` (B, 1), ``scores`` -inf, ``present`` False.
    """
    zeros = torch.zeros((batch, 1, *size), device=device)
    none = torch.full((batch, 1), -torch.inf, device=device)
    return Guide(zeros, torch.zeros((batch, num_classes, *size), device=device),
                 torch.zeros((batch, 1), device=device), none,
                 torch.zeros((batch, 1), dtype=torch.long, device=device), zeros, zeros.long(),
                 torch.zeros((batch, 1), dtype=torch.bool, device=device))


def check_k_tau(k: int, tau: float) -> None:
    """Validate the fusion hyper-parameters (whole 1 <= K <= 8, 0.01 <= tau <= 10).

    Raises:
        ModelError: ``k`` is not a whole number in [1, 8] (a bool is refused), or ``tau`` is
            not a number in [0.01, 10].
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_K:
        raise ModelError(f"K must be between 1 and {MAX_K} (a whole number), got {k!r}")
    check_number(tau, "tau", MIN_TAU, MAX_TAU)


def fusion_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax of ``scores / tau`` over the last axis; -inf scores (missing exemplars) get 0.

    Computed in float32 from the scores minus their row maximum, so the best exemplar's logit
    is exactly 0: the weights stay finite for any positive ``tau``, however small (a tiny tau
    turns the soft top-K into the nearest exemplar), and under mixed precision.

    Args:
        scores: (..., K) cosine similarities; -inf for missing exemplars.
        tau: softmax temperature (> 0).

    Returns:
        float32 weights of ``scores``' shape, summing to 1 over the last axis.

    Raises:
        ModelError: a row has no finite score (no exemplar retrieved for some query).
    """
    valid = torch.isfinite(scores)
    if not valid.any(dim=-1).all():
        raise ModelError("No exemplar could be retrieved for at least one query: the bank is "
                         "empty, or holds only exemplars of the query's own patient (which are "
                         "never retrieved)")
    scores = scores.float()
    best = scores.masked_fill(~valid, -torch.inf).amax(dim=-1, keepdim=True)
    logits = torch.where(valid, (scores - best) / tau, torch.full_like(scores, -torch.inf))
    return torch.softmax(logits, dim=-1)


def combine(weights: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
            num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of exemplar images (B,K,H,W) and one-hot masks (B,K,H,W) -> guide pair.

    Args:
        weights: (B, K) fusion weights.
        images: (B, K, H, W) float exemplar images.
        masks: (B, K, H, W) integer exemplar label maps.
        num_classes: number of classes C including background.

    Returns:
        The guide image (B, 1, H, W) and the soft one-hot guide mask (B, C, H, W), in
        ``images``' dtype.

    Raises:
        ModelError: a mask holds a class >= ``num_classes``.
    """
    if masks.numel() and int(masks.max()) >= num_classes:
        raise ModelError(
            f"An exemplar mask has class {int(masks.max())} but the model has {num_classes} classes")
    w = weights.to(images.dtype)
    guide_image = torch.einsum("bk,bkhw->bhw", w, images)[:, None]
    onehot = F.one_hot(masks.long(), num_classes).to(images.dtype)  # B,K,H,W,C
    guide_mask = torch.einsum("bk,bkhwc->bchw", w, onehot)
    return guide_image, guide_mask


def alignment_shifts(query: torch.Tensor, images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Integer shifts (B,K,2) that best align each exemplar image with its query.

    ``query`` (B,H,W), ``images`` (B,K,H,W). The shift (dy, dx) maximises the cross-correlation
    of the zero-mean images (FFT, zero padded so nothing wraps around), with |dy|, |dx| <=
    ``max_shift``. Shifting exemplar k by it puts its anatomy where the query's is.

    Args:
        query: (B, H, W) query images.
        images: (B, K, H, W) exemplar images of the same size.
        max_shift: largest shift in pixels along each axis.

    Returns:
        (B, K, 2) int64 shifts (dy, dx) in pixels, for :func:`shift_exemplars`.
    """
    h, w = images.shape[-2:]
    q = query.float() - query.float().mean(dim=(-2, -1), keepdim=True)
    e = images.float() - images.float().mean(dim=(-2, -1), keepdim=True)
    size = (2 * h, 2 * w)
    spectrum = torch.fft.rfft2(q, s=size)[:, None] * torch.fft.rfft2(e, s=size).conj()
    corr = torch.fft.irfft2(spectrum, s=size)  # corr[s] = sum_y q[y + s] e[y]
    dy = torch.arange(2 * h, device=images.device)
    dy = torch.where(dy >= h, dy - 2 * h, dy)
    dx = torch.arange(2 * w, device=images.device)
    dx = torch.where(dx >= w, dx - 2 * w, dx)
    allowed = (dy.abs()[:, None] <= max_shift) & (dx.abs()[None, :] <= max_shift)
    best = corr.masked_fill(~allowed, -torch.inf).flatten(-2).argmax(dim=-1)  # B,K
    return torch.stack([dy[best // (2 * w)], dx[best % (2 * w)]], dim=-1)


def shift_exemplars(images: torch.Tensor, masks: torch.Tensor, shifts: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Translate exemplars (B,K,H,W) by ``shifts`` (B,K,2); uncovered pixels become 0 / background.

    Args:
        images: (B, K, H, W) exemplar images.
        masks: (B, K, H, W) exemplar label maps.
        shifts: (B, K, 2) integer (dy, dx): pixel (y, x) of the result is pixel
            (y - dy, x - dx) of the input.

    Returns:
        The translated images and masks, shapes and dtypes unchanged.
    """
    b, k, h, w = images.shape
    n = b * k
    dy, dx = shifts.reshape(n, 2).unbind(-1)
    rows = torch.arange(h, device=images.device)[None] - dy[:, None]  # source row of each row
    cols = torch.arange(w, device=images.device)[None] - dx[:, None]
    inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    item = torch.arange(n, device=images.device)[:, None, None]
    r, c = rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]
    moved_images = images.reshape(n, h, w)[item, r, c] * inside
    moved_masks = masks.reshape(n, h, w)[item, r, c] * inside
    return moved_images.view(b, k, h, w), moved_masks.view(b, k, h, w)


def align_exemplars(query: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
                    max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exemplars (B,K,H,W) translated onto their query (B,H,W); unchanged if ``max_shift`` is 0.

    Args:
        query: (B, H, W) query images (not read when ``max_shift`` <= 0).
        images: (B, K, H, W) exemplar images.
        masks: (B, K, H, W) exemplar label maps, moved with their images.
        max_shift: largest shift in pixels per axis (:func:`alignment_shifts`).

    Returns:
        The aligned images and masks.
    """
    if max_shift <= 0:
        return images, masks
    return shift_exemplars(images, masks, alignment_shifts(query, images, max_shift))


def soft_topk_guide(query_emb: torch.Tensor, bank_emb: torch.Tensor, bank_images: torch.Tensor,
                    bank_masks: torch.Tensor, num_classes: int, k: int = 2, tau: float = 0.1,
                    exclude: torch.Tensor | None = None, query: torch.Tensor | None = None,
                    max_shift: int = 0) -> Guide:
    """Retrieve and fuse in one differentiable pass (used in training and small in-memory banks).

    ``query_emb`` (B,D) and ``bank_emb`` (N,D) are unit vectors; ``bank_images`` (N,H,W) float,
    ``bank_masks`` (N,H,W) int, at the query size. ``exclude`` (B,N) bool marks exemplars a query
    must never retrieve (itself, its own patient). With ``max_shift`` > 0 the exemplars are
    first translated onto the query images ``query`` (B,H,W) (:func:`align_exemplars`).

    Args:
        query_emb: (B, D) unit query embeddings (gradients flow to them through the weights).
        bank_emb: (N, D) unit bank embeddings (detached).
        bank_images: (N, H, W) float exemplar images.
        bank_masks: (N, H, W) integer exemplar label maps.
        num_classes: number of classes including background.
        k: exemplars per query; fewer when the bank holds fewer than ``k``.
        tau: softmax temperature of the fusion weights.
        exclude: (B, N) bool, True where query b must not retrieve exemplar n; or None.
        query: (B, H, W) query images; required when ``max_shift`` > 0.
        max_shift: largest exemplar-to-query translation in pixels (0: no alignment).

    Returns:
        The :class:`Guide` of the top-``min(k, N)`` exemplars; slots beyond a query's
        allowed exemplars have score -inf, weight 0 and ``present`` False.

    Raises:
        ModelError: ``k`` or ``tau`` out of range, an empty bank, a query whose candidates
            are all excluded, or a mask class >= ``num_classes``.
    """
    check_k_tau(k, tau)
    if max_shift > 0 and query is None:
        raise ModelError("Aligning exemplars (max_shift > 0) needs the query images")
    if bank_emb.shape[0] == 0:
        raise ModelError("The exemplar bank is empty: add annotated exemplars first")
    sim = query_emb @ bank_emb.detach().t()
    if exclude is not None:
        sim = sim.masked_fill(exclude, -torch.inf)
    k_eff = min(k, sim.shape[1])
    scores, indices = sim.topk(k_eff, dim=1)
    weights = fusion_weights(scores, tau)
    images, masks = align_exemplars(query, bank_images[indices], bank_masks[indices], max_shift)
    return make_guide(images, masks, weights, scores.detach(), indices, num_classes)
