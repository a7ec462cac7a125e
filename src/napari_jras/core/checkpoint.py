"""Run folders: ``config.json`` + ``model.safetensors`` (never pickle), written atomically.

Loading never executes code from a file: weights are read with ``safetensors`` only (a pickle
``.pt``/``.pth``/``.bin`` file is refused with a clear message, never unpickled) and the
configuration is plain JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError, StorageError
from .model import JRASModel, ModelConfig
from .run_files import CONFIG_FILE, WEIGHTS_FILE

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
_PICKLE_REFUSED = ("napari-jras never loads pickle files (.pt, .pth, .bin, .ckpt), which can run "
                   "code when opened: use a run folder with config.json + model.safetensors")


def atomic_write_bytes(path: Path, data: bytes, *, tmp: Path | None = None,
                       make_parents: bool = True, what: str = "") -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (crash-safe).

    The temporary name is unique per call unless ``tmp`` is given, so concurrent writers never
    mix their bytes. ``make_parents=False`` refuses to recreate a folder that is gone (e.g. a
    bank deleted while open). A failed write (disk full, no permission) raises
    :class:`StorageError` ("Cannot write <what> <path>: ..."), removes the temporary file and
    leaves the previous content of ``path`` untouched.

    Args:
        path: the file to (re)write.
        data: its whole new content.
        tmp: the temporary file to write first (same folder as ``path``); None: a unique
            ``.<name>.<pid>-<random>.partial`` next to it.
        make_parents: create missing parent folders.
        what: what the file is, for the error message (e.g. ``the pseudonym key``).

    Raises:
        StorageError: the write, fsync or rename failed, or a part of the folder path is a
            file.
    """
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    target = f"{what} {path}" if what else str(path)
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the folder gone or read-only: nothing left in it
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):  # from mkdir / open
            raise StorageError(f"Cannot write {target}: a part of its folder path is a file, "
                               "not a folder") from exc
        raise StorageError.of(exc, "write", target) from exc
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk where the OS allows it (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open folders: renames are durable there anyway
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    """Save tensors as safetensors atomically (contiguous CPU copies).

    Args:
        path: the ``.safetensors`` file to write.
        tensors: the tensors by name (e.g. a ``state_dict``); they are detached, not changed.
        metadata: string pairs stored in the file's header, or None.

    Raises:
        StorageError: as :func:`atomic_write_bytes`.
    """
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear error when it is missing, damaged or a pickle.

    Returns:
        The tensors by name, on the CPU.

    Raises:
        ModelError: the file is missing, unreadable, a pickle, or not a valid safetensors
            file (never unpickled).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Missing weights file {path}")
    try:
        kind = weights_format(path)
    except OSError as exc:
        raise ModelError(f"Cannot read the weights file {path}: {exc.strerror or exc}") from exc
    if kind == "pickle":
        raise ModelError(f"{path} is a pickle (PyTorch) file, not safetensors: {_PICKLE_REFUSED}")
    if kind == "damaged":
        raise ModelError(f"The weights file {path} is damaged or not a safetensors file (its "
                         "first bytes are not a safetensors header)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise ModelError(f"The weights file {path} is damaged or not a safetensors file ({exc})") from exc


def weights_format(path: Path) -> str:
    """``"safetensors"``, ``"pickle"`` or ``"damaged"``: what the file at ``path`` holds.

    A safetensors file starts with an 8-byte little-endian header length N followed by N bytes
    of JSON object, so any first byte is possible (a header of 9600 bytes starts with 0x80, the
    pickle PROTO opcode). The file is called a pickle only when it is *not* safetensors (N does
    not fit in the file or the header is no JSON object) and it starts like a ``torch.save`` zip
    archive (``PK\\x03\\x04``) or a pickle stream of protocol 2-5 (``\\x80`` + version).
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = os.fstat(fh.fileno()).st_size
        if len(head) == 8:
            length = struct.unpack("<Q", head)[0]
            if 2 <= length <= min(size - 8, _MAX_HEADER):
                try:
                    header = json.loads(fh.read(length))
                except (UnicodeDecodeError, ValueError):
                    header = None
                if isinstance(header, dict):
                    return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in _PICKLE_PROTOCOLS):
        return "pickle"
    return "damaged"


def save_model(run_dir: str | Path, model: JRASModel, weights_name: str = WEIGHTS_FILE) -> Path:
    """Write the model's config and weights into ``run_dir``; returns the weights path.

    Args:
        run_dir: the run folder (created if missing); ``config.json`` is (re)written there.
        model: the model; its ``config`` and ``state_dict`` are saved.
        weights_name: the weights file's name in ``run_dir``.

    Returns:
        The path of the weights file written.

    Raises:
        StorageError: a file could not be written (:func:`atomic_write_bytes`).
    """
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / CONFIG_FILE, model.config.to_dict())
    weights = run_dir / weights_name
    save_tensors(weights, model.state_dict(), {"format": "napari-jras"})
    return weights


def read_config(run_dir: str | Path) -> ModelConfig:
    """Read and validate a run folder's ``config.json``.

    Raises:
        ModelError: ``run_dir`` is a file (a pickle checkpoint is named as such), is missing,
            has no ``config.json``, or that file is unreadable, not JSON or holds an invalid
            setting.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        if run_dir.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(f"{run_dir} is a pickle checkpoint: {_PICKLE_REFUSED}")
        raise ModelError(f"{run_dir} is a file: give the model folder (with {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE}) instead")
    if not run_dir.is_dir():
        raise ModelError(f"Model folder not found: {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise ModelError(f"{run_dir} is not a napari-jras model: it has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is damaged: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:  # e.g. a number given as text
        raise ModelError(f"{path} holds an invalid setting: {exc}") from exc


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               weights_name: str = WEIGHTS_FILE) -> JRASModel:
    """Rebuild a model from a run folder, checking that the weights fit the config exactly.

    Args:
        run_dir: the run folder (``config.json`` + the weights file).
        device: where the model is put (``cpu``, ``cuda``... or a :class:`torch.device`).
        weights_name: the weights file's name in ``run_dir``.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        ModelError: the config fails :func:`read_config` or describes a model that cannot be
            built, the weights fail :func:`load_tensors`, have missing, unexpected or
            wrongly shaped tensors, or hold NaN or infinite values.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    try:
        model = JRASModel(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"The {CONFIG_FILE} of {run_dir} describes a model that cannot be "
                         f"built: {exc}") from exc
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
        raise ModelError(f"The weights in {run_dir} do not match its {CONFIG_FILE}: "
                         + "; ".join(parts))
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ModelError(f"The weights in {run_dir} contain NaN or infinite values ({len(broken)} "
                         f"tensors, e.g. {broken[0]}): the file is damaged or training diverged")
    model.load_state_dict(state)
    return model.to(device).eval()
