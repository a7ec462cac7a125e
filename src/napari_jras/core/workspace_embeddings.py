"""Bank embeddings of a workspace: computed in chunks, kept per retriever version.

When a version with another retriever becomes active, the bank is re-embedded with it; the
embeddings it replaces are stashed as ``<stash>/<retriever version>.npz`` so that activating
their version again restores them exactly, without computing anything.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bank import ExemplarBank
from .checkpoint import atomic_write_bytes
from .data import resize_images
from .model import JRASModel
from .progress import Progress, ProgressFn
from .retrieval import embed_images, retriever_version

EMBED_CHUNK = 256


def embed_exemplars(retriever: torch.nn.Module, bank: ExemplarBank, ids: Sequence[int],
                    size: int, progress: ProgressFn | None = None) -> np.ndarray:
    """Embed bank exemplars as :meth:`InferenceEngine.ensure_bank_embeddings` does, in chunks.

    Args:
        retriever: the retriever (on its device).
        bank: the bank holding the exemplars.
        ids: the exemplars to embed.
        size: the model's input size (the exemplars are resized to it).
        progress: receives ``{"phase": "embed", "step", "total"}`` after each chunk.

    Returns:
        (len(ids), embed_dim) float32 embeddings, in the order of ``ids``.
    """
    device = next(retriever.parameters()).device
    out = [np.zeros((0, retriever.embed_dim), np.float32)]
    for start in range(0, len(ids), EMBED_CHUNK):
        part = list(ids[start:start + EMBED_CHUNK])
        images = torch.from_numpy(resize_images(bank.images(part), (size, size)))
        out.append(embed_images(retriever, images, device=device).numpy())
        if progress is not None:
            progress(Progress("embed", start + len(part), len(ids)))
    return np.concatenate(out)


def embed_bank(bank: ExemplarBank, model: JRASModel, stash: Path,
               known: dict[int, np.ndarray] | None = None,
               progress: ProgressFn | None = None) -> None:
    """Embed the bank with ``model``'s retriever (nothing to do when it already is).

    Args:
        bank: the workspace's bank (the caller holds the workspace lock).
        model: the model whose retriever embeds.
        stash: the folder of stashed embeddings: the replaced ones are kept there, and those of
            ``model``'s retriever are taken from there when present.
        known: vectors already computed with ``model``'s retriever, by exemplar id.
        progress: receives ``{"phase": "embed", "step", "total"}`` as exemplars are embedded.
    """
    version = retriever_version(model.retriever)
    if not bank.needs_embedding(version):
        return
    vectors = {**_stashed(stash, version), **(known or {})}
    _stash_embeddings(bank, stash)
    ids = [r["id"] for r in bank.records()]
    missing = [i for i in ids if i not in vectors]
    if progress is not None:
        progress(Progress("embed", 0, len(missing)))
    vectors.update(zip(missing, embed_exemplars(model.retriever, bank, missing,
                                                model.config.size, progress), strict=True))
    stack = (np.stack([vectors[i] for i in ids]) if ids
             else np.zeros((0, bank.embed_dim), np.float32))
    bank.set_embeddings(ids, stack, version)


def _stash_embeddings(bank: ExemplarBank, stash: Path) -> None:
    ids, vectors = bank.embeddings()
    version = bank.retriever_version
    if version is not None and len(ids):
        buffer = io.BytesIO()
        np.savez(buffer, ids=ids, vectors=vectors)
        atomic_write_bytes(stash / f"{version}.npz", buffer.getvalue())


def _stashed(stash: Path, version: str) -> dict[int, np.ndarray]:
    file = stash / f"{version}.npz"
    try:
        with np.load(file) as data:
            return dict(zip(data["ids"].tolist(), data["vectors"], strict=True))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return {}  # missing or damaged: the vectors are simply recomputed
