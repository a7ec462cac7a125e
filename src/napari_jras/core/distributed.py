"""Multi-process (torchrun) training helpers: process group, rank-0 duties, collectives.

``torchrun --nproc_per_node N -m napari_jras.cli train ...`` starts N copies of the command
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in the
environment. :func:`distributed_session` turns that into a process group (NCCL on CUDA, Gloo on
the CPU; rank ``r`` uses ``cuda:LOCAL_RANK``). Every helper here is a no-op in an ordinary single
process, so the same training code runs with or without torchrun.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from .device import select_device
from .errors import JRASError

TIMEOUT = timedelta(minutes=30)  # rank 0 writing the bank can keep the others waiting a while


def launched_by_torchrun() -> bool:
    """True when the torchrun environment asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of training processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes checkpoints, logs, the bank and progress."""
    return rank() == 0


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``), which picks the GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def training_device(name: str | torch.device = "auto") -> torch.device:
    """:func:`select_device`, except that distributed CUDA training uses ``cuda:LOCAL_RANK``.

    Raises:
        JRASError: the device name is unknown or not available (:func:`select_device`).
    """
    device = select_device(name)
    if device.type == "cuda" and (is_distributed() or launched_by_torchrun()):
        return torch.device("cuda", local_rank())
    return device


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[torch.device]:
    """Join the torchrun process group for the duration of the block; yields this rank's device.

    Outside torchrun (or with one process) nothing is initialised and the device is simply
    :func:`select_device`'s choice. The group is destroyed on exit.

    Args:
        device: device name as for :func:`select_device`.

    Yields:
        This rank's device: NCCL with ``cuda:LOCAL_RANK``, or Gloo on the CPU. Within an
        already initialised group, the device alone (the group is left as it is).

    Raises:
        JRASError: the device is unknown or unavailable, ``LOCAL_RANK`` has no GPU, the
            device is neither CUDA nor the CPU, or PyTorch has no ``torch.distributed``.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield training_device(device)
        return
    if not dist.is_available():
        raise JRASError("This PyTorch build has no torch.distributed: run without torchrun")
    target = training_device(device)
    if target.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise JRASError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s) "
                            "are visible: lower --nproc_per_node")
        torch.cuda.set_device(target)
        backend = "nccl"
    elif target.type == "cpu":
        backend = "gloo"
    else:
        raise JRASError(f"Distributed training runs on CUDA or the CPU, not on '{target}'")
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield target
        barrier()  # every rank reaches the teardown together
    finally:
        _release_and_destroy()


def _release_and_destroy() -> None:
    """Free what still refers to the process group, then destroy it.

    A DistributedDataParallel wrapper left in a reference cycle would otherwise be freed during
    interpreter shutdown, when Gloo's worker threads can no longer take the GIL: the process
    then aborts (``terminate called without an active exception``) after a successful run.
    """
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (all ranks get the same answer)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of ``values`` over the ranks (the values themselves in one process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of ``t`` along dim 0 (parts differ in size by at most one)."""
    if not is_distributed():
        return t
    return t.tensor_split(world_size())[rank()]


def all_gather_rows(part: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's :func:`shard` of a ``total``-row tensor, in rank order.

    Shards are padded to equal length for the collective; every rank gets identical bits.

    Args:
        part: this rank's shard (rows :func:`shard` gives it), on any device.
        total: number of rows of the whole tensor.

    Returns:
        The (total, ...) tensor on ``part``'s device; ``part`` itself in one process.
    """
    if not is_distributed():
        return part
    device = _collective_device()
    longest = -(-total // world_size())
    padded = part.new_zeros((longest, *part.shape[1:]), device=device)
    padded[:len(part)] = part.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    sizes = [len(s) for s in torch.empty(total).tensor_split(world_size())]
    return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)]).to(part.device)


def gather_strings(text: str) -> list[str]:
    """Every rank's ``text``, in rank order (``[text]`` in one process)."""
    if not is_distributed():
        return [text]
    out: list[str | None] = [None] * world_size()
    dist.all_gather_object(out, text)
    return [str(s) for s in out]
