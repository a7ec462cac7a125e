"""Pseudonymising a bank: patient and case ids replaced, file names and authors cleared."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from ..errors import BankError
from .checks import check_prefix
from .schema import transaction


def pseudonymise(db: sqlite3.Connection, path: Path, prefix: str = "patient",
                 save_key: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Replace the patient and case ids of the bank behind ``db`` by pseudonyms.

    Patients become ``<prefix>-0001``, ... (in order of their first exemplar) and each case
    ``<patient pseudonym>-case-001``, ...; ``source`` (the file name) and ``author`` are
    cleared. Slice index, origin, creation time and extra fields stay. The old values are
    wiped from the database file as well (secure delete, VACUUM, WAL truncated).

    Args:
        db: a writable connection to the bank's database.
        path: the bank folder (for messages).
        prefix: the pseudonyms' prefix (a letter, then letters, digits, '-', '_').
        save_key: receives the key ({old patient id: pseudonym}) inside the write transaction,
            before any id is replaced: when it raises, the bank is left unchanged (the key is
            never lost).

    Returns:
        The key, {old patient id: pseudonym}.
    """
    check_prefix(prefix)
    db.execute("PRAGMA secure_delete = ON")
    with transaction(db, path):  # the key matches the rows: no writer can come between
        patients: dict[str, str] = {}
        cases: dict[str, str] = {}
        per_patient: dict[str, int] = {}
        rows = []
        for exemplar_id, case, patient in db.execute(
                "SELECT id, case_id, patient_id FROM exemplars ORDER BY id").fetchall():
            alias = patients.setdefault(patient, f"{prefix}-{len(patients) + 1:04d}")
            if case not in cases:
                per_patient[alias] = per_patient.get(alias, 0) + 1
                cases[case] = f"{alias}-case-{per_patient[alias]:03d}"
            rows.append((cases[case], alias, exemplar_id))
        if save_key is not None:
            save_key(patients)
        db.executemany("UPDATE exemplars SET case_id = ?, patient_id = ?, source = '', "
                       "author = NULL WHERE id = ?", rows)
    try:
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:
        raise BankError(f"The bank at {path} was pseudonymised, but its database file "
                        f"could not be compacted ({exc}): old ids may remain in unused parts "
                        "of the file; free some space and run anonymise again") from exc
    return patients
