"""Searching a bank's index: exclusions (the query's own patient, single exemplars) and hits."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BankError
from ..index import EmbeddingIndex
from .checks import RECORD_COLUMNS, record
from .schema import fetch, id_list


@dataclass(frozen=True)
class Hit:
    """One retrieved exemplar: its id, cosine similarity and record (id + provenance)."""

    id: int
    score: float
    record: dict


def exclusions(db: sqlite3.Connection, n_queries: int,
               exclude_patients: Sequence[str | None] | None,
               exclude_ids: Sequence[Iterable[int]] | None) -> list[set[int]]:
    """The exemplar ids each query must not retrieve.

    Args:
        db: the bank's connection.
        n_queries: the number of queries.
        exclude_patients: per query, a patient id whose exemplars are all left out (or None).
        exclude_ids: per query, single exemplar ids to leave out.

    Returns:
        One set of ids per query.
    """
    exclude: list[set[int]] = [set() for _ in range(n_queries)]
    for name, given in (("exclude_patients", exclude_patients), ("exclude_ids", exclude_ids)):
        if given is not None and len(given) != n_queries:
            raise BankError(f"{name} has {len(given)} entries for {n_queries} queries")
    if exclude_ids is not None:
        for blocked, extra in zip(exclude, exclude_ids, strict=True):
            blocked.update(id_list(extra))
    if exclude_patients is not None:
        for patient in {p for p in exclude_patients if p is not None}:
            same = {r[0] for r in db.execute(
                "SELECT id FROM exemplars WHERE patient_id = ?", (str(patient),))}
            for blocked, p in zip(exclude, exclude_patients, strict=True):
                if p == patient:
                    blocked.update(same)
    return exclude


def hits(db: sqlite3.Connection, path: Path, index: EmbeddingIndex, queries: np.ndarray, k: int,
         exclude: list[set[int]]) -> list[list[Hit]]:
    """The ``k`` best hits of each query (fewer when fewer exemplars are eligible), best first.

    Args:
        db: the bank's connection (inside the snapshot the index reflects).
        path: the bank folder (for messages).
        index: the search index.
        queries: (Q, D) query embeddings.
        k: hits per query.
        exclude: per query, ids it must not retrieve (see :func:`exclusions`).
    """
    scores, ids = index.search(queries, k, exclude)
    found = {int(i) for i in ids.flat if i >= 0}
    rows = fetch(db, path, found, RECORD_COLUMNS)
    return [[Hit(int(i), float(s), record(rows[int(i)]))
             for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)]
