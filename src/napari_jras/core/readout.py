"""Memory-readout fusion: exemplar masks propagated onto the query by learned correspondence.

The paper's fusion (``concat``) stacks one fused guide image and mask onto the query's input
channels; a segmenter trained that way learns to ignore the guide (or, fed aligned guides, to
copy it). The ``readout`` fusion follows space-time memory networks (STM, STCN, XMem):

1. the query and each of its K exemplars go through the segmenter's own encoder;
2. a 1x1 *key* projection of the 1/4-scale features, shared by query and exemplars, gives an
   affinity between every query position and every one of the K x h x w exemplar positions
   (negative squared L2 distance, softmax over all exemplar positions, as in STCN), plus the
   log of exemplar k's retrieval weight (the retriever's say, and its gradient), plus (new
   runs, ``prior="local"``) a learned locality prior ``-lambda d^2`` on the distance between
   the two positions, so that reading starts near copying the exemplar in place and the keys
   only have to learn the motion;
3. the *values* are the exemplar one-hot masks, so the readout is a propagated soft
   segmentation ``P_read`` plus a per-pixel confidence (how peaked the affinity is). With
   ``values="fine"`` (new runs) each exemplar position carries its whole 4 x 4 block of mask
   pixels (``pixel_unshuffle``) and ``P_read`` comes back at full resolution
   (``pixel_shuffle``): read from the query itself it is the query's mask exactly, where the
   masks ``pooled`` to 1/4 scale (runs saved before) lose the boundaries: on ``acdc/val`` at
   96 px a slice's own mask pooled to 1/4 and upsampled scores Dice 0.85, at full resolution
   0.97 (``benchmarks/accuracy/readout_ceiling.py``);
4. ``[P_read, confidence]`` enter the decoder through zero-initialised 1x1 convolutions, at the
   1/4 skip (``P_read`` average-pooled to 1/4, which for ``fine`` equals the ``pooled``
   readout) and on the logits (at ``P_read``'s resolution): at initialisation, and whenever
   no exemplar is given, the network is exactly the baseline.

``P_read`` is trained by its own loss against the query's ground truth (see
:func:`readout_loss`), which is what makes the keys learn correspondence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

READOUT_LEVEL = 2  # encoder level whose features give the keys: stride 2**2 = 4
KEY_DIM = 32
VALUES = ("fine", "pooled")
PRIORS = ("local", "none")
LOCALITY_INIT = 0.5  # prior -0.5 d^2 (d in key-grid cells): 1 cell -0.5, 3 cells -4.5
READOUT_TRUST = 0.75  # tuned on held-out ACDC training patients (docs/benchmarks.md)
EPS = 1e-6


class MemoryReadout(nn.Module):
    """Keys, affinity and the zero-initialised injections of the readout fusion.

    Args:
        feature_channels: channels F of the encoder features the keys are computed from.
        num_classes: classes C including background.
        values: ``fine`` (full-resolution mask blocks) or ``pooled`` (masks pooled to the
            key scale).
        prior: ``local`` adds a learned locality prior ``-lambda d^2`` to the affinity (d: the
            distance between query and exemplar position in key-grid cells, lambda >= 0
            learned, 0.5 at first), so reading starts near "copy the exemplar in place" and
            the keys only have to learn the motion; ``none``: keys alone.
        key_dim: channels of the keys.
    """

    def __init__(self, feature_channels: int, num_classes: int, values: str = "fine",
                 prior: str = "local", key_dim: int = KEY_DIM):
        super().__init__()
        self.num_classes = num_classes
        self.fine = values == "fine"
        # lambda = softplus(raw); None: no prior (runs saved before it existed)
        self.locality = (nn.Parameter(torch.tensor(math.log(math.expm1(LOCALITY_INIT))))
                         if prior == "local" else None)
        self.key = nn.Conv2d(feature_channels, key_dim, 1)
        self.to_skip = nn.Conv2d(num_classes + 1, feature_channels, 1)
        self.to_logits = nn.Conv2d(num_classes + 1, num_classes, 1)
        for conv in (self.to_skip, self.to_logits):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def read(self, query_features: Tensor, exemplar_features: Tensor, exemplar_masks: Tensor,
             present: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Propagate exemplar masks onto the query.

        Args:
            query_features: (B, F, h, w) encoder features of the queries.
            exemplar_features: (B, K, F, h, w) features of their exemplars.
            exemplar_masks: (B, K, H, W) integer label maps of the exemplars (``fine``: H, W
                multiples s x h, s x w; ``pooled``: any H, W that pools to h, w).
            present: (B, K) bool, False for empty exemplar slots.
            weights: (B, K) retrieval fusion weights, a prior on which exemplar to read from
                (log w_k is added to the affinity logits of exemplar k); through them the
                segmentation loss reaches the retriever, as in the concat fusion.

        Returns:
            ``P_read`` (B, C, H, W) (``fine``) or (B, C, h, w) (``pooled``), a probability map
            per class where a query has at least one exemplar (zeros elsewhere), and the
            confidence (B, 1, h, w) in [0, 1].
        """
        b, k, f, h, w = exemplar_features.shape
        any_exemplar = present.any(1)
        # query-major (B, P, K x M) affinity: the softmax, the peak and their gradients reduce
        # over contiguous memory (3x faster on CPU than exemplar-major); computed in float32
        # even under AMP, where the locality prior's large values would lose precision
        with torch.autocast(query_features.device.type, enabled=False):
            kq = self.key(query_features.float()).flatten(2).transpose(1, 2)  # B,P,D
            ke = self.key(exemplar_features.reshape(b * k, f, h, w).float())
            ke = ke.reshape(b, k, -1, h * w).permute(0, 2, 1, 3).reshape(b, -1, k * h * w)
            scale_d = 1 / math.sqrt(ke.shape[1])
            # -||q - e||^2 up to a per-query constant: 2 q.e - |e|^2 (STCN's L2 affinity),
            # plus the per-exemplar terms, all folded into one bias added by the matmul
            bias = -ke.pow(2).sum(1, keepdim=True) * scale_d  # B,1,KM
            if weights is not None:
                prior = torch.log(weights.float().clamp_min(EPS))  # B,K
                bias = bias + prior[:, :, None].expand(b, k, h * w).reshape(b, 1, k * h * w)
            slot_ok = present[:, :, None].expand(b, k, h * w).reshape(b, 1, k * h * w)
            bias = bias.masked_fill(~slot_ok, -torch.inf)
            # a query without exemplars reads uniformly (and its readout is zeroed below)
            bias = torch.where(any_exemplar[:, None, None], bias, torch.zeros_like(bias))
            if self.locality is None:
                logits = torch.baddbmm(bias, kq, ke, alpha=2 * scale_d)  # B,P,KM
            else:  # the (P, KM) prior enters the matmul, the (B, 1, KM) bias after it
                local = -F.softplus(self.locality) * _squared_distances(h, w, k, bias)
                logits = torch.baddbmm(local.expand(b, -1, -1), kq, ke, alpha=2 * scale_d)
                logits = logits + bias
        affinity = logits.softmax(-1)  # over all K x h x w exemplar positions
        onehot = F.one_hot(exemplar_masks.long(), self.num_classes).permute(0, 1, 4, 2, 3).float()
        scale = exemplar_masks.shape[-2] // h
        if self.fine:  # each position's s x s block of mask pixels, C*s*s channels
            values = F.pixel_unshuffle(onehot.flatten(0, 1), scale)  # B*K,C*s*s,h,w
        else:
            values = F.adaptive_avg_pool2d(onehot.flatten(0, 1), (h, w))  # B*K,C,h,w
        channels = values.shape[1]
        values = values.reshape(b, k, channels, h * w).permute(0, 2, 1, 3)
        values = values.reshape(b, channels, k * h * w)
        # (B, P, C') then transposed: the gradient reaching the affinity stays query-major
        p_read = torch.bmm(affinity, values.transpose(1, 2)).transpose(1, 2).contiguous()
        p_read = p_read.view(b, -1, h, w)
        if self.fine:
            p_read = F.pixel_shuffle(p_read, scale)  # B,C,H,W
        # confidence: share of the affinity on the best position, on a log scale in [0, 1]
        peak = affinity.amax(-1).clamp_min(EPS)
        confidence = (torch.log(peak * k * h * w) / math.log(k * h * w + 1)).clamp(0, 1)
        on = any_exemplar.to(p_read.dtype).view(b, 1, 1, 1)
        return p_read * on, confidence.reshape(b, 1, h, w) * on

    def inject(self, p_read: Tensor, confidence: Tensor) -> tuple[Tensor, Tensor]:
        """(skip residual (B, F, h, w), logit residual at ``P_read``'s resolution).

        Args:
            p_read: propagated probabilities from :meth:`read`, (B, C, H, W) or (B, C, h, w).
            confidence: (B, 1, h, w) confidence from :meth:`read`.

        Returns:
            The residual added to the encoder features at the readout level and the one added
            (upsampled where needed) to the logits; both zero at initialisation.
        """
        dtype = self.to_skip.weight.dtype
        fine = p_read.shape[-2:] != confidence.shape[-2:]
        pooled = F.adaptive_avg_pool2d(p_read, confidence.shape[-2:]) if fine else p_read
        spread = F.interpolate(confidence, size=p_read.shape[-2:]) if fine else confidence
        return (self.to_skip(torch.cat([pooled, confidence], 1).to(dtype)),
                self.to_logits(torch.cat([p_read, spread], 1).to(dtype)))


def _squared_distances(h: int, w: int, k: int, like: Tensor) -> Tensor:
    """(h x w, K x h x w) squared distances in grid cells between every query position and
    every exemplar position (repeated for the K exemplars)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=like.device, dtype=like.dtype),
                            torch.arange(w, device=like.device, dtype=like.dtype), indexing="ij")
    positions = torch.stack([ys.flatten(), xs.flatten()], 1)  # P,2
    return (positions[:, None] - positions[None]).pow(2).sum(-1).repeat(1, k)


def trust_readout(logits: Tensor, p_read: Tensor, trust: Tensor) -> Tensor:
    """Mix the propagated mask into the network's prediction: ``log((1 - t) softmax(logits)
    + t P_read)``, per query.

    A network trained on few patients is right on its training slices, so it learns to lean
    on its image path even where, on a new patient, the mask read from an accepted neighbour
    is better (4 ACDC patients: readout alone 0.78 Dice from the neighbour, network 0.69).
    Annotated slices of the query's own volume are trustworthy exemplars, other patients'
    are not (readout alone from retrieved exemplars: 0.43), so the engine sets ``t`` from
    how much of a query's guide is accepted same-volume slices.

    Args:
        logits: (B, C, H, W) the network's logits.
        p_read: (B, C, h, w) propagated probabilities (:meth:`MemoryReadout.read`), any h, w.
        trust: (B,) weights in [0, 1]; 0 gives the network's own probabilities.

    Returns:
        (B, C, H, W) log-probabilities (valid logits: their softmax is the mixture); the rows
        with ``t`` = 0 are ``logits`` unchanged.
    """
    p_read = F.interpolate(p_read.float(), size=logits.shape[-2:], mode="bilinear",
                           align_corners=False)
    t = trust.to(p_read.device, torch.float32).clamp(0, 1).view(-1, 1, 1, 1)
    mixed = (1 - t) * logits.float().softmax(1) + t * p_read
    return torch.where(t > 0, torch.log(mixed.clamp_min(EPS)).to(logits.dtype), logits)


def readout_loss(p_read: Tensor, target: Tensor, present: Tensor) -> Tensor:
    """Cross-entropy plus foreground Dice of ``P_read`` (upsampled) for queries with exemplars.

    ``p_read`` (B, C, h, w) probabilities, ``target`` (B, H, W) labels, ``present`` (B, K).
    Returns 0 when no query of the batch has an exemplar.

    Args:
        p_read: (B, C, h, w) propagated class probabilities.
        target: (B, H, W) int64 ground-truth class indices.
        present: (B, K) bool, True for filled exemplar slots.

    Returns:
        A scalar: mean cross-entropy plus (1 - mean foreground Dice, pooled over the batch),
        both over the queries with at least one exemplar.
    """
    rows = present.any(1)
    if not bool(rows.any()):
        return p_read.new_zeros(())
    p = F.interpolate(p_read[rows].float(), size=target.shape[-2:], mode="bilinear",
                      align_corners=False).clamp_min(EPS)
    y = target[rows]
    ce = F.nll_loss(torch.log(p), y)
    onehot = F.one_hot(y, p.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (p[:, 1:] * onehot).sum((0, 2, 3))
    denom = p[:, 1:].sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice.mean())
