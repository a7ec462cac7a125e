"""Outputs of a frozen image encoder, remembered by their exact input pixels.

LiteMedSAM's TinyViT costs about 1.5 s per 256 px image on a 2-core CPU, ten times its prompt
encoder and mask decoder together. With the encoder frozen its output depends on the input
pixels and the weights only, so an image encoded once need not be encoded again: the
assistant re-prompts the same slice after every correction and propagation, and training
without augmentation meets every slice many times (MedSAM's own fine-tuning precomputes its
embeddings for the same reason).

:func:`encode_cached` keys each image by a BLAKE2b digest of its float32 pixels and a
fingerprint of the weights, buffers and dtype of the encoder stages run (recomputed after
``load_state_dict``), so a hit returns what the encoder gave for that image (bit for bit;
a recomputation in another batch may differ in the last bits, as batched convolutions do). Entries live in a
process-wide LRU of :data:`MEMORY_BYTES` and, when ``$NAPARI_JRAS_EMBEDDING_CACHE`` names a
folder, also there as ``<fingerprint>/<digest>.npy`` (shared between processes, never pruned:
delete the folder to reclaim it). Stages with trainable parameters or in train mode, or run
with gradients on, are never cached; frozen weights changed in place other than by
``load_state_dict`` are not noticed. Inside :func:`bypassed` (per thread; the trainer uses it
for augmented training images, each of which is seen once) nothing is read or stored.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .tinyvit import TinyViT

FOLDER_ENV = "NAPARI_JRAS_EMBEDDING_CACHE"
MEMORY_BYTES = 1 << 30
"""Bytes of encoder outputs kept in memory (about 256 LiteMedSAM embeddings)."""

_fingerprints: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


class _MemoryLRU:
    """Least-recently-used tensors on the CPU, bounded by their total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: Tensor) -> None:
        if key in self.entries or value.nbytes > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


_memory = _MemoryLRU(MEMORY_BYTES)
_bypass: ContextVar[bool] = ContextVar("embedding_cache_bypass", default=False)


@contextmanager
def bypassed(active: bool = True) -> Iterator[None]:
    """Within this block (in this thread only), :func:`encode_cached` neither reads nor stores.

    For inputs that never come back, such as augmented training images: caching them would
    only push useful entries out of the LRU.

    Args:
        active: False makes the block a no-op (so a caller can pass its condition).
    """
    token = _bypass.set(active or _bypass.get())
    try:
        yield
    finally:
        _bypass.reset(token)


def clear_memory() -> None:
    """Forget every encoder output kept in memory (the folder, if any, is left as it is)."""
    _memory.clear()


def cacheable(modules: list[nn.Module]) -> bool:
    """Whether outputs of ``modules`` may be cached now: gradients off, every module in eval
    mode and without trainable parameters (a frozen computation depends on its input and
    weights only)."""
    return not torch.is_grad_enabled() and not any(
        m.training or any(p.requires_grad for p in m.parameters()) for m in modules)


def encode_cached(encoder: TinyViT, pixels: Tensor, stages: slice = slice(None)) -> Tensor:
    """``encoder(pixels, stages)``, each image's output served from the cache when it was
    computed before.

    Images not in the cache are encoded together in one call. When the stages run are not
    :func:`cacheable`, or inside :func:`bypassed`, this is just ``encoder(pixels, stages)``.

    Args:
        encoder: a TinyViT image encoder.
        pixels: (B, 3, S, S) encoder inputs (or an earlier partial run's tokens).
        stages: the stages to run, as for :meth:`TinyViT.forward`.

    Returns:
        (B, ...) outputs on ``pixels``' device, as ``encoder(pixels, stages)`` gives them.
    """
    modules = encoder.modules_run(stages)
    if pixels.is_meta or _bypass.get() or not cacheable(modules):  # meta: no values
        return encoder(pixels, stages)
    prefix = fingerprint(encoder, stages)
    flat = pixels.detach().to("cpu", torch.float32).contiguous()
    digests = [_digest(image) for image in flat]
    folder = _folder(prefix)
    found: list[Tensor | None] = [_memory.get(f"{prefix}/{d}") for d in digests]
    for i, digest in enumerate(digests):
        if found[i] is None and folder is not None:
            found[i] = _read(folder / f"{digest}.npy")
            if found[i] is not None:
                _memory.put(f"{prefix}/{digest}", found[i])
    missing = [i for i, value in enumerate(found) if value is None]
    if missing:
        computed = encoder(pixels[missing], stages).detach().to("cpu")
        for i, value in zip(missing, computed, strict=True):
            value = value.clone()  # not a view keeping the whole batch alive
            found[i] = value
            _memory.put(f"{prefix}/{digests[i]}", value)
            if folder is not None:
                _write(folder / f"{digests[i]}.npy", value)
    return torch.stack([value for value in found if value is not None]).to(pixels.device)


def fingerprint(encoder: TinyViT, stages: slice = slice(None)) -> str:
    """A digest of the weights, buffers and dtype of the modules ``stages`` runs, computed once
    and again after ``encoder.load_state_dict``."""
    start, stop, _ = stages.indices(len(encoder.layers) + 1)
    dtype = str(next(encoder.parameters()).dtype).replace("torch.", "")
    known = _fingerprints.get(encoder)
    if known is None:
        encoder.register_load_state_dict_post_hook(_forget_fingerprint)
        _fingerprints[encoder] = known = {}
    key = f"{start}-{stop}-{dtype}"
    if key not in known:
        hasher = hashlib.blake2b(digest_size=12)
        for module in encoder.modules_run(stages):
            for name, value in module.state_dict().items():
                hasher.update(name.encode())
                hasher.update(value.detach().cpu().contiguous().numpy().tobytes())
        known[key] = f"{hasher.hexdigest()}-stages{start}-{stop}-{dtype}"
    return known[key]


def _forget_fingerprint(module: nn.Module, incompatible_keys: object) -> None:
    _fingerprints.get(module, {}).clear()


def _digest(image: Tensor) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(str(tuple(image.shape)).encode())
    hasher.update(image.numpy().tobytes())
    return hasher.hexdigest()


def _folder(prefix: str) -> Path | None:
    root = os.environ.get(FOLDER_ENV)
    if not root:
        return None
    folder = Path(root).expanduser() / prefix
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _read(path: Path) -> Tensor | None:
    """A cached output, or None when the file is missing or unreadable (it is then rewritten)."""
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError):
        return None


def _write(path: Path, value: Tensor) -> None:
    """Write atomically, so a concurrent reader never sees half a file."""
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    try:
        np.save(partial, value.numpy(), allow_pickle=False)
        os.replace(partial, path)
    except OSError:  # a full or read-only disk costs a recomputation next time, nothing more
        partial.unlink(missing_ok=True)
