"""Run folders: ``config.json`` + ``model.safetensors`` (never pickle), written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .model import JRASModel, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (crash-safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats (e.g. undefined Hausdorff distances) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalars
        return json_safe(obj.item())
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON (NaN -> null) atomically."""
    atomic_write_bytes(path, json.dumps(json_safe(obj), indent=2, allow_nan=False).encode())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (contiguous CPU copies)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear error when it is missing or damaged."""
    from safetensors.torch import load_file

    if not path.exists():
        raise ModelError(f"Missing weights file {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise ModelError(f"The weights file {path} is damaged or not a safetensors file ({exc})") from exc


def save_model(run_dir: str | Path, model: JRASModel, weights_name: str = WEIGHTS_FILE) -> Path:
    """Write the model's config and weights into ``run_dir``; returns the weights path."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG_FILE, model.config.to_dict())
    weights = run_dir / weights_name
    save_tensors(weights, model.state_dict(), {"format": "napari-jras"})
    return weights


def read_config(run_dir: str | Path) -> ModelConfig:
    """Read and validate a run folder's ``config.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"Model folder not found: {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise ModelError(f"{run_dir} is not a napari-jras model: it has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is damaged: {exc}") from exc
    return ModelConfig.from_dict(data)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               weights_name: str = WEIGHTS_FILE) -> JRASModel:
    """Rebuild a model from a run folder, checking that the weights fit the config exactly."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    model = JRASModel(config)
    state = load_tensors(run_dir / weights_name)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"config {tuple(expected[k].shape)})")
        raise ModelError(f"The weights in {run_dir} do not match its config.json: " + "; ".join(parts))
    model.load_state_dict(state)
    return model.to(device).eval()
