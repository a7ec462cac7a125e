"""Distributed (torchrun / DDP) training on 2 CPU processes with the Gloo backend.

* ``torchrun --standalone --nproc_per_node 2 -m napari_jras.cli train``: one run folder written
  by rank 0 only, replicas in sync, world size in the log, resume, ``evaluate`` loads the result.
* Two processes started with an explicit process group: a cancel flag raised on rank 0 alone
  stops both ranks at the same step, both resume the same checkpoint, the shared seeded sampler
  stays in step and each rank trains on its own part of the global batch.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from napari_jras.cli import main
from napari_jras.core import distributed as ddp
from napari_jras.core.retrieval import retriever_version

REGEX = r"^(p\d+)_"
TINY = ["--backbone-options", '{"base_channels": 4, "depth": 2}',
        "--retriever-options", '{"width": 4, "input_size": 32}', "--embed-dim", "16",
        "--size", "32", "--batch-size", "4", "--patient-regex", REGEX, "--device", "cpu",
        "--checkpoint-every", "2", "--log-every", "1", "--warmup-steps", "1"]
TIMEOUT_S = 240
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker, tmp_path: Path) -> None:
    """Start ``worker(rank, 2, port, tmp)`` in two spawned processes; fail if they hang."""
    context = mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the distributed workers hung")


def torchrun_train(data: Path, out: Path, steps: int) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m napari_jras.cli train ...`` (Gloo, CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "napari_jras.cli", "train", "--data", str(data),
               "--out", str(out), "--steps", str(steps), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_torchrun_cli_train_resume_and_evaluate(acdc_slices_dir, tmp_path, capsys):
    run = tmp_path / "run"
    first = torchrun_train(acdc_slices_dir, run, steps=6)
    assert first.stdout.count("Model written to") == 1  # stdout of rank 0 only
    assert sorted(p.name for p in run.iterdir()) == [
        "bank", "checkpoints", "config.json", "log.jsonl", "model.safetensors",
        "run_settings.json", "train_config.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000006"]
    log = read_log(run)
    train = [r for r in log if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # one writer: no duplicated records
    assert all(r["world_size"] == 2 for r in train)
    [sync] = [r for r in log if r["phase"] == "sync_check"]
    assert sync["world_size"] == 2 and sync["in_sync"]
    assert len(sync["checksums"]) == 2 and len(set(sync["checksums"])) == 1
    assert json.loads((run / "train_config.json").read_text())["world_size"] == 2

    # as if the run had crashed after the checkpoint of step 4: every rank resumes from it
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log
                                           if r["phase"] == "train" and r["step"] <= 4))
    torchrun_train(acdc_slices_dir, run, steps=6)
    log = read_log(run)
    assert [r["step"] for r in log if r["phase"] == "train"] == [1, 2, 3, 4, 5, 6]
    last = [r for r in log if r["phase"] == "sync_check"][-1]
    assert last["step"] == 6 and last["in_sync"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000006"]

    report = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(run), "--data", str(acdc_slices_dir), "--report",
                 str(report), "--patient-regex", REGEX, "--device", "cpu", "--quiet"]) == 0
    assert json.loads(report.read_text())["data"]["cases"] == 8
    capsys.readouterr()


# --- two processes with an explicit process group ------------------------------------------
def _trainer(run_dir: Path, cancel=None):
    """A tiny J-RAS trainer on synthetic data (the same on every rank)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_jras_core import synthetic_samples, tiny_model

    from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig, seed_everything

    seed_everything(5)
    config = TrainConfig(steps=4, batch_size=4, log_every=1, checkpoint_every=10, seed=5,
                         device="cpu", retriever_warmup_steps=1)
    return JointTrainer(tiny_model(), SliceSet(synthetic_samples(), 3), config, run_dir=run_dir,
                        cancel=cancel)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_dir = Path(tmp) / "run"
        # rank 0 alone asks to stop after 2 steps: every rank must stop there
        first = _trainer(run_dir, cancel=(lambda: first.step >= 2) if rank == 0 else None)
        first.fit()
        second = _trainer(run_dir)
        resumed = second.resume()
        resumed_at = second.step
        second.fit()
        result = {
            "stopped_at": first.step, "resumed": resumed, "resumed_at": resumed_at,
            "final_step": second.step, "weights": retriever_version(second.model),
            "generator": _digest(second.generator.get_state()),
            "bank": _digest(second.bank_emb),
            "shard": ddp.shard(torch.arange(5)).tolist(), "world_size": second.world_size,
            "losses": [r["loss"] for r in second.history if r["phase"] == "train"],
        }
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_cancel_resume_and_stay_in_sync(tmp_path):
    run_two_ranks(_worker, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["stopped_at"] == r1["stopped_at"] == 2
    assert r0["resumed"] and r1["resumed"] and r0["resumed_at"] == r1["resumed_at"] == 2
    assert r0["final_step"] == r1["final_step"] == 4
    for key in ("weights", "generator", "bank", "losses"):
        assert r0[key] == r1[key], key  # losses: the mean over ranks, logged by every rank
    assert r0["world_size"] == 2
    assert r0["shard"] == [0, 1, 2] and r1["shard"] == [3, 4]  # disjoint parts of one batch
    steps = [(r["phase"], r["step"]) for r in read_log(tmp_path / "run")]
    assert len(steps) == len(set(steps))  # written once, by rank 0
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) == 2


def _session_worker(rank: int, world: int, port: int, tmp: str) -> None:
    """Join through ``distributed_session`` as torchrun would; leave a DDP wrapper in a cycle."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    with ddp.distributed_session("cpu"):
        cycle: dict = {"model": DistributedDataParallel(torch.nn.Linear(3, 1))}
        cycle["self"] = cycle
        cycle["model"](torch.ones(2, 3)).sum().backward()
        del cycle
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(
        {"ddp_alive": alive, "initialized": dist.is_initialized()}))


def test_session_frees_ddp_before_destroying_the_group(tmp_path):
    """Nothing holding the process group survives into interpreter shutdown (CI abort, stop 11)."""
    run_two_ranks(_session_worker, tmp_path)
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {
            "ddp_alive": 0, "initialized": False}


# --- single-process behaviour of the helpers -----------------------------------------------
def test_helpers_are_no_ops_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not ddp.is_distributed() and not ddp.launched_by_torchrun()
    assert ddp.rank() == 0 and ddp.world_size() == 1 and ddp.is_main()
    t = torch.arange(6.0).view(3, 2)
    assert ddp.shard(t) is t and ddp.all_gather_rows(t, 3) is t
    assert ddp.any_rank(True) and not ddp.any_rank(False)
    assert ddp.mean_over_ranks([1.5, 2.0]) == [1.5, 2.0]
    assert ddp.gather_strings("x") == ["x"]
    ddp.barrier()
    with ddp.distributed_session("cpu") as device:
        assert device == torch.device("cpu") and not dist.is_initialized()


def test_torchrun_environment_is_recognised(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not ddp.launched_by_torchrun()  # one process: plain single-process training
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ddp.launched_by_torchrun()
    assert ddp.training_device("cpu") == torch.device("cpu")
