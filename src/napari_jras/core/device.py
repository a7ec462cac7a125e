"""Device choice (CUDA, then MPS, then CPU) and mixed precision helpers."""

from __future__ import annotations

import contextlib

import torch

from .errors import JRASError


def select_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit name must be available.

    Args:
        name: ``auto`` (also for an empty string), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
            (case-insensitive), or a :class:`torch.device`, returned as it is.

    Returns:
        The device to use.

    Raises:
        JRASError: CUDA or MPS was asked for but is not available here, or the name is not
            a device PyTorch knows.
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise JRASError(f"Device '{name}' was requested but CUDA is not available here; "
                        "use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise JRASError("Device 'mps' was requested but Apple MPS is not available here")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise JRASError(f"Unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from exc


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else fp16 on CUDA; None (no AMP) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision context on CUDA; a no-op on CPU/MPS or when disabled.

    Args:
        device: the device the computation runs on.
        enabled: False gives the no-op context whatever the device.

    Returns:
        ``torch.autocast`` with :func:`amp_dtype`'s data type (bf16, else fp16) on CUDA, else
        a ``contextlib.nullcontext``.
    """
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)
