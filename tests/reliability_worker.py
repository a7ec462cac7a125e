"""Worker processes for the crash-safety and concurrency tests (tests/test_reliability_*.py).

Run as ``python tests/reliability_worker.py MODE 'JSON ARGS'``. The process imports napari-jras
once and then forks one child per round (a fork costs milliseconds, an import seconds):

* ``kill``: ``args["kills"]`` times, fork a child that runs ``args["job"]`` (bank writes,
  training or fine-tuning) and SIGKILL it after a seeded random delay;
* ``together``: fork ``args["writers"]`` bank writers and ``args["readers"]`` readers at once
  and wait for all of them.

It prints one JSON line of counts: children killed, finished (exit 0) and failed (an error of
their own, e.g. a damaged bank or checkpoint they could not open: the tests require none).
Children append what they committed to ``args["log"]`` as JSON lines (``os.write`` of one short
line on an ``O_APPEND`` file: a line is all there or not at all).

Exemplars are a pure function of a tag stored in their provenance, so that the tests can check
the pixels and embedding of every exemplar in the bank, logged or not.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import numpy as np

SIZE, CLASSES, DIM = 16, 3, 16


def exemplar(tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image in k/255 steps, mask, unit embedding) of ``tag``: what the bank must give back."""
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    image = rng.integers(0, 256, (SIZE, SIZE)).astype(np.float32) / 255
    mask = rng.integers(0, CLASSES, (SIZE, SIZE)).astype(np.uint8)
    vec = rng.standard_normal(DIM).astype(np.float32)
    return image, mask, vec / np.linalg.norm(vec)


def _log(args: dict[str, Any], **record: Any) -> None:
    fd = os.open(args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _add(bank: Any, args: dict[str, Any], tags: list[str]) -> list[int]:
    items = [exemplar(t) for t in tags]
    ids = bank.add(np.stack([i[0] for i in items]), np.stack([i[1] for i in items]),
                   [{"case_id": t, "origin": "correction", "tag": t} for t in tags],
                   np.stack([i[2] for i in items]), "v1")
    _log(args, op="add", ids=ids, tags=tags)
    return ids


def bank_job(args: dict[str, Any], round_: int) -> None:
    """Add, remove and re-index exemplars until killed."""
    from napari_jras.core.bank import ExemplarBank

    rng = random.Random(f"{args['seed']}-{round_}")
    bank = ExemplarBank.open(args["bank"])
    for step in range(10_000):
        roll = rng.random()
        if roll < 0.1 and len(bank) > 2:
            victim = rng.choice([r["id"] for r in bank.records()])
            _log(args, op="removing", id=victim)
            bank.remove([victim])
            _log(args, op="removed", id=victim)
        elif roll < 0.15:
            bank.rebuild_index()
        elif roll < 0.2:
            bank.close()
            bank = ExemplarBank.open(args["bank"])
        else:
            _add(bank, args, [f"r{round_}-s{step}-{n}" for n in range(rng.randint(1, 3))])


def train_job(args: dict[str, Any], round_: int) -> None:
    """Train (resuming from the last checkpoint) a tiny J-RAS model into ``args["run"]``."""
    from napari_jras.core.pipeline import train_run
    from napari_jras.core.train import TrainConfig

    train_run(args["data"], args["run"], args["model"],
              TrainConfig(**args["train"]), patient_regex=args["patient_regex"])
    _log(args, op="trained", round=round_)


def finetune_job(args: dict[str, Any], round_: int) -> None:
    """Fine-tune the workspace ``args["workspace"]`` (resuming an interrupted fine-tune)."""
    from napari_jras.core.workspace import Workspace

    with Workspace.open(args["workspace"]) as ws:
        version = ws.finetune(steps=args["steps"], batch_size=2, device="cpu")
        _log(args, op="finetuned", round=round_, version=version.name)


def writer_job(args: dict[str, Any], index: int) -> None:
    """Add ``args["per_writer"]`` exemplars, one or two per transaction."""
    from napari_jras.core.bank import ExemplarBank

    with ExemplarBank.open(args["bank"]) as bank:
        n = 0
        while n < args["per_writer"]:
            count = min(1 + n % 2, args["per_writer"] - n)
            _add(bank, args, [f"w{index}-{n + j}" for j in range(count)])
            n += count


def reader_job(args: dict[str, Any], index: int) -> None:
    """Search and read exemplars while the writers add; any wrong pixel is a failure."""
    from napari_jras.core.bank import ExemplarBank

    rng = np.random.default_rng(index)
    with ExemplarBank.open(args["bank"]) as bank:
        seen = 0
        for _ in range(args["queries"]):
            count = len(bank)
            if count < seen:
                raise AssertionError(f"the bank shrank from {seen} to {count} exemplars")
            seen = count
            query = rng.standard_normal((1, DIM)).astype(np.float32)
            [hits] = bank.search(query / np.linalg.norm(query), 3, "v1")
            ids = [h.id for h in hits]
            for hit, image, mask in zip(hits, bank.images(ids), bank.masks(ids), strict=True):
                want_image, want_mask, _ = exemplar(hit.record["tag"])
                if not (np.array_equal(mask, want_mask)
                        and np.allclose(image, want_image, atol=1e-6)):
                    raise AssertionError(f"exemplar {hit.id} has wrong pixels")
            time.sleep(0.005)
        _log(args, op="read", reader=index, queries=args["queries"])


JOBS = {"bank": bank_job, "train": train_job, "finetune": finetune_job}


def _child(func: Any, *call: Any) -> int:
    """Fork a child running ``func(*call)``; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            func(*call)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return pid


def _outcome(status: int, counts: dict[str, int]) -> None:
    if os.WIFSIGNALED(status):
        counts["killed"] += 1
    elif os.WEXITSTATUS(status) == 0:
        counts["finished"] += 1
    else:
        counts["failed"] += 1


def kill_rounds(args: dict[str, Any]) -> dict[str, Any]:
    """Run ``args["job"]`` in ``args["kills"]`` children, each SIGKILLed after a random delay.

    The delay is drawn from ``args["delay"]`` in seconds, or, with ``args["calibrate"]`` (the
    arguments to change for a scratch run), in multiples of the time one whole uninterrupted
    job takes on this machine, so that the kills land at the same stages on slow machines.
    """
    rng = random.Random(args["seed"])
    counts: dict[str, Any] = {"killed": 0, "finished": 0, "failed": 0}
    job = JOBS[args["job"]]
    unit = 1.0
    if args.get("calibrate"):
        start = time.monotonic()
        _outcome(os.waitpid(_child(job, {**args, **args["calibrate"]}, -1), 0)[1], counts)
        unit = counts["job_s"] = time.monotonic() - start
    low, high = args["delay"]
    for round_ in range(args["kills"]):
        pid = _child(job, args, round_)
        time.sleep(rng.uniform(low, high) * unit)
        os.kill(pid, signal.SIGKILL)
        _outcome(os.waitpid(pid, 0)[1], counts)
    return counts


def together(args: dict[str, Any]) -> dict[str, int]:
    """For each of ``args["runs"]`` (a bank and a log each), run the writers and readers side by
    side and wait for every one of them."""
    counts = {"killed": 0, "finished": 0, "failed": 0}
    for run in args["runs"]:
        run_args = {**args, **run}
        pids = [_child(writer_job, run_args, i) for i in range(args["writers"])]
        pids += [_child(reader_job, run_args, i) for i in range(args["readers"])]
        for pid in pids:
            _outcome(os.waitpid(pid, 0)[1], counts)
    return counts


# --- used by the tests (in the pytest process) ----------------------------------------------
def run_worker(mode: str, **args: Any) -> dict[str, Any]:
    """Run ``reliability_worker.py MODE`` in a subprocess; its counts, checked: none failed."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, __file__, mode, json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["failed"] == 0, done.stderr[-3000:]
    return counts


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines the children logged (a line cut by a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def seed_bank(path: str | Path, count: int = 0) -> None:
    """Create a bank of this module's size and ``count`` exemplars tagged ``seed-<i>``."""
    from napari_jras.core.bank import ExemplarBank

    with ExemplarBank.create(path, SIZE, CLASSES, DIM) as bank:
        if count:
            _add(bank, {"log": os.devnull}, [f"seed-{i}" for i in range(count)])


def check_bank(path: str | Path, log: list[dict[str, Any]]) -> int:
    """Every logged exemplar (unless removed) is in the bank, and every exemplar is exact.

    Checks the pixels and embedding of each exemplar against its tag, that the search index
    agrees with the stored embeddings (each exemplar is its own nearest neighbour) and that no
    orphan or temporary pixel file is left. Returns the number of exemplars.
    """
    from napari_jras.core.bank import ExemplarBank

    added = {i: t for r in log if r["op"] == "add" for i, t in zip(r["ids"], r["tags"], strict=True)}
    maybe_removed = {r["id"] for r in log if r["op"] == "removing"}
    removed = {r["id"] for r in log if r["op"] == "removed"}
    with ExemplarBank.open(path) as bank:
        records = {r["id"]: r for r in bank.records()}
        for exemplar_id, tag in added.items():
            if exemplar_id not in maybe_removed:
                assert records[exemplar_id]["tag"] == tag, exemplar_id
        assert not removed & set(records)
        ids, images, masks = bank.load_all()
        emb_ids, embeddings = bank.embeddings()
        assert emb_ids.tolist() == ids.tolist()
        for i, image, mask, vector in zip(ids.tolist(), images, masks, embeddings, strict=True):
            want_image, want_mask, want_vector = exemplar(records[i]["tag"])
            assert np.allclose(image, want_image, atol=1e-6), i
            assert np.array_equal(mask, want_mask) and np.array_equal(vector, want_vector), i
        if len(ids):
            assert [h[0].id for h in bank.search(embeddings, 1, "v1")] == ids.tolist()
        files = sorted(p.name for p in (Path(path) / "pixels").iterdir())
        assert files == sorted(f"{i}.npz" for i in ids.tolist()), "orphan pixel files"
        return len(ids)


def main() -> None:
    """``reliability_worker.py kill|together JSON``: print the counts as one JSON line."""
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    import torch
    import torch._dynamo  # noqa: F401 - imported by the first optimizer: seconds per child

    torch.set_num_threads(1)
    import napari_jras.core.pipeline  # noqa: F401 - import once, before forking
    import napari_jras.core.workspace  # noqa: F401

    for log in [args.get("log"), *(run["log"] for run in args.get("runs", []))]:
        if log:
            Path(log).touch()
    print(json.dumps((kill_rounds if mode == "kill" else together)(args)), flush=True)


if __name__ == "__main__":
    main()
