"""Concurrent use of one exemplar bank by several processes (docs/reliability.md, "Concurrency").

Writers queue up on SQLite's write lock (``BEGIN IMMEDIATE`` + busy timeout): pixel files,
rows, ``index.faiss`` and its metadata change inside that one transaction. Readers work from
WAL snapshots and never wait for writers.
"""

from __future__ import annotations

import os
import sqlite3
import time

import numpy as np
import pytest
from reliability_worker import check_bank, exemplar, read_log, run_worker, seed_bank

import napari_jras.core.bank.schema as bank_schema
from napari_jras.core.bank import ExemplarBank
from napari_jras.core.errors import BankError

RUNS = 3
WRITERS = 2
PER_WRITER = 20
SEED_EXEMPLARS = 4
LATE = [{"case_id": "late", "origin": "correction", "tag": "late"}]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_two_writers_and_a_reader_share_one_bank(tmp_path):
    runs = []
    for r in range(RUNS):
        seed_bank(tmp_path / f"bank{r}", SEED_EXEMPLARS)
        runs.append({"bank": str(tmp_path / f"bank{r}"), "log": str(tmp_path / f"log{r}")})
    counts = run_worker("together", runs=runs, writers=WRITERS, readers=1,
                        per_writer=PER_WRITER, queries=40)
    assert counts["finished"] == RUNS * (WRITERS + 1)
    for run in runs:
        log = read_log(run["log"])
        tags = sorted(t for r in log if r["op"] == "add" for t in r["tags"])
        assert tags == sorted(f"w{w}-{n}" for w in range(WRITERS) for n in range(PER_WRITER))
        assert [r["op"] for r in log].count("read") == 1
        assert check_bank(run["bank"], log) == SEED_EXEMPLARS + WRITERS * PER_WRITER


def test_a_writer_waits_for_the_lock_then_gives_up_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(bank_schema, "BUSY_TIMEOUT_S", 0.3)
    seed_bank(tmp_path / "bank", 2)
    image, mask, vector = exemplar("late")
    other = sqlite3.connect(tmp_path / "bank" / "bank.sqlite", isolation_level=None)
    with ExemplarBank.open(tmp_path / "bank") as bank:
        other.execute("BEGIN IMMEDIATE")  # another process is in the middle of a write
        started = time.monotonic()
        with pytest.raises(BankError, match="busy or read-only.*try again"):
            bank.add(image[None], mask[None], LATE,
                     vector[None], "v1")
        assert time.monotonic() - started >= 0.25  # it waited for the lock first
        # readers are not blocked by the writer (WAL snapshots)
        assert len(bank) == 2 and bank.search(vector[None], 1, "v1")[0]
        np.testing.assert_array_equal(bank.masks(bank.load_all()[0])[0], exemplar("seed-0")[1])
        other.execute("ROLLBACK")
        assert len(bank.add(image[None], mask[None], LATE,
                            vector[None], "v1")) == 1
    other.close()
    assert check_bank(tmp_path / "bank", []) == 3
