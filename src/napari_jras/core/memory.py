"""Memory needed to train a model, estimated before anything is allocated, against what is free.

The estimate (:func:`estimate_training_memory`) has four parts:

- **weights**: 4 bytes per parameter;
- **optimizer**: gradient + the two AdamW moments, 12 bytes per trainable parameter;
- **activations**: what autograd keeps for the backward pass of the largest training step (the
  supervised step: retriever + fusion + segmenter + loss; the contrastive step: the retriever on
  the batch and its candidates; the warm-up step: the retriever on two views), measured by running
  the step on PyTorch's ``meta`` device (shapes only, no memory, no computation) and summing the
  tensors saved for backward, times :data:`BACKWARD_FACTOR` for the gradients of the activations
  the backward pass holds at once;
- **data**: the training slices, labels and relevance masks the trainer keeps on the device.

:func:`check_training_memory` compares the part still to be allocated with the free memory of
the training device (:func:`available_memory`: ``MemAvailable`` of ``/proc/meminfo`` and the
cgroup limit for the CPU, ``torch.cuda.mem_get_info`` for CUDA) and refuses with a message saying
what to lower, instead of the process being killed by the kernel or failing deep in CUDA. Where
the free memory cannot be read (macOS, MPS) nothing is refused. ``NAPARI_JRAS_SKIP_MEMORY_CHECK=1``
turns the check off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from .errors import JRASError

GIB = 2**30
BACKWARD_FACTOR = 1.25
SKIP_ENV = "NAPARI_JRAS_SKIP_MEMORY_CHECK"
RELEVANCE_SIZE = 32  # side of the downsampled one-hot masks the trainer keeps per slice


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed to train: weights, optimizer state, activations of one step, device data.

    Attributes:
        parameters: number of parameters (a count, not bytes).
        weights: bytes of the parameters.
        optimizer: bytes of gradients and AdamW moments (12 per trainable parameter).
        activations: bytes autograd keeps for the largest step, times ``BACKWARD_FACTOR``.
        data: bytes of the training slices, labels and relevance masks kept on the device.
    """

    parameters: int
    weights: int
    optimizer: int
    activations: int
    data: int

    @property
    def total(self) -> int:
        """Everything together, in bytes (``parameters`` is a count and not included)."""
        return self.weights + self.optimizer + self.activations + self.data


def estimate_training_memory(model: torch.nn.Module, batch_size: int,
                             contrastive_candidates: int = 64, slices: int = 0) -> MemoryEstimate:
    """Estimate the memory to train ``model`` (a :class:`JRASModel`) with batches of ``batch_size``.

    ``slices``: training slices the trainer keeps next to the model (its retrieval bank).
    Nothing is allocated: the steps run on the ``meta`` device with the model's parameters
    swapped for meta tensors of the same shapes.

    Args:
        model: the model to train; its ``config`` gives the image size, classes and K.
        batch_size: training batch size.
        contrastive_candidates: extra images the contrastive step embeds with a batch
            (counted only for retrieval models).
        slices: training slices kept on the device (each ``size`` x ``size``).

    Returns:
        The estimate, every part in bytes.
    """
    cfg = model.config
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    size, classes = cfg.size, cfg.num_classes
    steps = [lambda m: _supervised(m, batch_size)]
    if cfg.use_retrieval:  # contrastive and warm-up steps: the retriever alone
        steps += [lambda m: _embed(m, batch_size + contrastive_candidates),
                  lambda m: _embed(m, 2 * max(2, batch_size))]
    activations = max(_saved_bytes(model, step) for step in steps)
    data = slices * (size * size * (4 + 8) + classes * RELEVANCE_SIZE**2 * 4)
    return MemoryEstimate(parameters=sum(p.numel() for p in params),
                          weights=sum(p.numel() * p.element_size() for p in params),
                          optimizer=3 * 4 * trainable,
                          activations=int(BACKWARD_FACTOR * activations), data=data)


def _supervised(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """The supervised step's loss on meta tensors (retrieval: embedding, fusion, segmentation)."""
    from .train import segmentation_loss

    cfg = model.config
    size, classes = cfg.size, cfg.num_classes
    x = torch.empty(batch, 1, size, size, device="meta")
    target = torch.empty(batch, size, size, dtype=torch.long, device="meta")
    if not cfg.use_retrieval:
        return segmentation_loss(model(x), target)
    from .fusion import Guide

    scores = model.embed(x) @ torch.empty(model.retriever.embed_dim, cfg.k, device="meta")
    weights = scores.softmax(-1)  # stands in for the soft top-K weights
    # the fusion's one-hot exemplar masks and images are saved for the weights' gradient
    onehot = torch.empty(batch, cfg.k, size, size, classes, device="meta")
    guide_mask = torch.einsum("bk,bkhwc->bchw", weights, onehot)
    guide_image = torch.einsum("bk,bkhw->bhw", weights,
                               torch.empty(batch, cfg.k, size, size, device="meta"))[:, None]
    guide = Guide(guide_image, guide_mask, weights, weights, weights)
    return segmentation_loss(model(x, guide), target)


def _embed(model: torch.nn.Module, batch: int) -> torch.Tensor:
    """The retriever's embeddings of a meta batch (contrastive and warm-up steps)."""
    size = model.config.size
    return model.embed(torch.empty(batch, 1, size, size, device="meta")).sum()


class _Step(torch.nn.Module):
    """Runs ``step(model)`` as its forward, so that ``functional_call`` can swap the weights."""

    def __init__(self, model: torch.nn.Module, step: Callable[[torch.nn.Module], torch.Tensor]):
        super().__init__()
        self.model = model
        self.step = step

    def forward(self) -> torch.Tensor:
        return self.step(self.model)


def _saved_bytes(model: torch.nn.Module, step: Callable[[torch.nn.Module], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``step(model)`` runs on meta."""
    meta = {f"model.{name}": torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
            for name, t in [*model.named_parameters(), *model.named_buffers()]}
    own = {t.untyped_storage()._cdata for t in meta.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional_call(_Step(model, step), meta, ())
    finally:
        model.train(was_training)
    return sum(saved.values())


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` for a new allocation, or None when they cannot be read.

    Args:
        device: a CUDA device (``torch.cuda.mem_get_info``), the CPU (the smaller of
            ``MemAvailable`` and the cgroup's limit minus usage) or anything else (None).

    Returns:
        Free bytes, or None (e.g. MPS, or a CPU without ``/proc/meminfo`` and cgroup limit).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    amounts = [_meminfo_available(), _cgroup_available()]
    known = [a for a in amounts if a is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1), None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")):
            try:
                limit = (root / limit_file).read_text().strip()
                usage = int((root / usage_file).read_text().strip())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < 2**60:
                return max(0, int(limit) - usage)
            return None
    return None


def check_training_memory(model: torch.nn.Module, batch_size: int, device: torch.device,
                          contrastive_candidates: int = 64, slices: int = 0) -> MemoryEstimate:
    """Refuse (:class:`JRASError`) to train when the estimate exceeds the free memory of ``device``.

    ``model`` is still on the CPU: there its weights and the training slices are already
    allocated and do not count again. Returns the estimate.

    Args:
        model: the model to train, still on the CPU.
        batch_size: training batch size.
        device: the training device.
        contrastive_candidates: as for :func:`estimate_training_memory`.
        slices: as for :func:`estimate_training_memory`.

    Returns:
        The estimate (also when the check is skipped or the free memory is unknown).

    Raises:
        JRASError: the memory still to be allocated exceeds the free memory of ``device``
            (never when ``NAPARI_JRAS_SKIP_MEMORY_CHECK`` is set to anything but ``0``).
    """
    estimate = estimate_training_memory(model, batch_size, contrastive_candidates, slices)
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return estimate
    free = available_memory(device)
    needed = estimate.total
    if device.type == "cpu":
        needed -= estimate.weights + estimate.data
    if free is not None and needed > free:
        raise JRASError(
            f"Training this configuration needs about {needed / GIB:.1f} GiB more memory "
            f"({estimate.parameters / 1e6:.1f} M parameters: optimizer "
            f"{estimate.optimizer / GIB:.1f} GiB; activations of a batch of {batch_size}: "
            f"{estimate.activations / GIB:.1f} GiB) but {device.type.upper()} has "
            f"{free / GIB:.1f} GiB free: lower --batch-size or --size, or choose a smaller "
            f"backbone (--backbone-options; SAM: a smaller 'image_size'), or set "
            f"{SKIP_ENV}=1 to try anyway")
    return estimate


__all__ = ["MemoryEstimate", "available_memory", "check_training_memory",
           "estimate_training_memory"]
