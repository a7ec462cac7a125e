"""The work behind ``napari-jras bank``: summary, add, rebuild, anonymise, pack, export.

Plain functions (no printing, no argument parsing: the command line lives in
``napari_jras.cli_bank``), also used by the assistant; they return data and raise
:class:`BankError` for anything the user has to fix.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bank import DB_FILE, ExemplarBank, is_writable
from .checkpoint import atomic_write_bytes, load_model
from .data import load_slices
from .engine import InferenceEngine
from .errors import BankError
from .io import find_cases, write_volume
from .model import JRASModel
from .pipeline import provenance_of


def summary(bank: ExemplarBank) -> dict:
    """Counts per origin, the bank's settings, whether its folder can be written, and the ids of
    damaged embeddings."""
    records = bank.records()
    origins: dict[str, int] = {}
    for r in records:
        origins[r.get("origin", "?")] = origins.get(r.get("origin", "?"), 0) + 1
    return {"path": str(bank.path), "exemplars": len(records), "size": bank.size,
            "num_classes": bank.num_classes, "class_names": bank.class_names,
            "embed_dim": bank.embed_dim, "retriever_version": bank.retriever_version,
            "patients": len({r.get("patient_id") for r in records}), "origins": origins,
            "writable": is_writable(bank.path), "damaged_embeddings": bank.damaged_embeddings()}


def _check_new_bank_folder(path: Path) -> None:
    """Refuse a path where a new bank cannot go, before anything is loaded or written."""
    if path.is_file():
        raise BankError(f"{path} is a file, not a bank folder: give an existing bank or a new "
                        "folder for one")
    if path.is_dir() and any(path.iterdir()):
        raise BankError(f"{path} is a folder that is not an exemplar bank (no {DB_FILE} in it) "
                        "and not empty: give an existing bank or a new folder for one")


def add_cases(bank_dir: str | Path, model_dir: str | Path, data: str | Path,
              origin: str = "import", device: str = "auto",
              patient_regex: str | None = None) -> tuple[ExemplarBank, list[int]]:
    """Add every slice of the labelled cases under ``data``, embedded by the model's retriever.

    The bank is created when ``bank_dir`` holds none; if adding fails, a bank created here is
    removed again, so a failed command leaves nothing behind.

    Args:
        bank_dir: an existing bank, or a new or empty folder for one (at the model's size,
            classes and embedding size).
        model_dir: a J-RAS run folder whose retriever embeds the exemplars.
        data: labelled cases (a folder, or one image file with its label).
        origin: the exemplars' origin (``import``, ``training`` or ``correction``).
        device: where to embed.
        patient_regex: how to find the patient id in a case name (default: the built-in rule).

    Returns:
        The open bank (the caller closes it) and the new exemplars' ids.
    """
    model = load_model(model_dir)
    if model.retriever is None:
        raise BankError("A baseline model has no retriever: use a J-RAS model to embed exemplars")
    bank_dir, cfg = Path(bank_dir), model.config
    existed, created = bank_dir.exists(), False
    if (bank_dir / DB_FILE).exists():
        bank = ExemplarBank.open(bank_dir)
    else:
        _check_new_bank_folder(bank_dir)
        bank = None
    try:
        if bank is not None:  # refuse a bank of another model before reading any data
            engine = InferenceEngine(model, bank, device=device)
            if len(bank):
                engine.ensure_bank_embeddings()
        samples = load_slices(find_cases(data, patient_regex),
                              size=cfg.size if bank is None else bank.size, modality=cfg.modality)
        if bank is None:
            bank = ExemplarBank.create(bank_dir, size=cfg.size, num_classes=cfg.num_classes,
                                       embed_dim=model.retriever.embed_dim,
                                       class_names=cfg.class_names)
            created = True
            engine = InferenceEngine(model, bank, device=device)
        images = np.stack([s.image for s in samples])
        ids = bank.add(images, np.stack([s.label for s in samples]),
                       [provenance_of(s, origin) for s in samples],
                       embeddings=engine.embed_for_bank(images), retriever_version=engine.version)
    except BaseException:
        if bank is not None:
            bank.close()
        if created:  # nothing of the failed command stays; a given empty folder stays empty
            shutil.rmtree(bank_dir, ignore_errors=True)
            if existed:
                bank_dir.mkdir()
        raise
    return bank, ids


def write_key(path: Path, patients: dict[str, str], bank_dir: Path | None = None) -> None:
    """Write the pseudonym key (``patient_id,pseudonym`` lines) atomically and durably.

    An existing file is never replaced (it may be the only key of an earlier anonymisation),
    and a key inside the bank folder ``bank_dir`` is refused (it would travel with the bank).

    Args:
        path: the new key file.
        patients: {patient id: pseudonym}.
        bank_dir: the bank folder the key must stay out of.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise BankError(f"{path} exists: choose a new file for the pseudonym key (an existing "
                        "key is never overwritten)")
    if bank_dir is not None:
        inside = Path(bank_dir).resolve()
        if inside == path.resolve() or inside in path.resolve().parents:
            raise BankError(f"The key {path} would be inside the bank folder {bank_dir}: keep "
                            "the key apart from the bank (it undoes the pseudonyms)")
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([("patient_id", "pseudonym"),
                                                     *patients.items()])
    atomic_write_bytes(path, text.getvalue().encode(), what="the pseudonym key")


def anonymise(bank: ExemplarBank, prefix: str = "patient",
              key: str | Path | None = None) -> dict[str, str]:
    """Pseudonymise ``bank``; with ``key``, the key file is written (and synced) first.

    When the key cannot be written (its folder is a file, disk full, file exists, inside the
    bank) nothing in the bank changes.

    Args:
        bank: an open, writable bank.
        prefix: pseudonyms are ``<prefix>-0001``, ...
        key: a new CSV file for the ``patient_id,pseudonym`` key (None: no key is kept).

    Returns:
        The key, {old patient id: pseudonym}.
    """
    if key is None:
        return bank.pseudonymise(prefix)
    return bank.pseudonymise(prefix, save_key=lambda patients: write_key(Path(key), patients,
                                                                         bank.path))


def distinct_ids(ids: Sequence[int]) -> list[int]:
    """Distinct ids in the given order; refuses ids below 1 (exemplar ids start at 1)."""
    bad = [i for i in ids if i < 1]
    if bad:
        raise BankError(f"Exemplar ids are whole numbers from 1, got {bad[0]}")
    return list(dict.fromkeys(ids))


def listing(bank: ExemplarBank, limit: int) -> tuple[dict, list[dict]]:
    """What ``bank list`` shows.

    Args:
        bank: an open bank.
        limit: how many records to return (0 or less: none).

    Returns:
        The :func:`summary` and the first ``limit`` records (id and provenance).
    """
    return summary(bank), bank.records()[:limit] if limit > 0 else []


def retriever_model(model_dir: str | Path) -> JRASModel:
    """The J-RAS model of a run folder, refusing a baseline (it has no retriever)."""
    model = load_model(model_dir)
    if model.retriever is None:
        raise BankError("A baseline model has no retriever: give the J-RAS model whose "
                        "retriever embeds this bank")
    return model


@dataclass(frozen=True)
class RebuildResult:
    """What :func:`rebuild` did.

    Attributes:
        reembedded: whether the embeddings were recomputed (None: no model was given).
        repaired: ids of damaged embeddings that were recomputed.
        indexed: how many exemplars the new index holds.
        left_out: ids left out of the index because their embedding is damaged.
    """

    reembedded: bool | None
    repaired: list[int]
    indexed: int
    left_out: list[int]


def rebuild(bank: ExemplarBank, model: JRASModel | None = None,
            device: str = "auto") -> RebuildResult:
    """Re-embed ``bank`` with ``model`` (when stale, and always when some embedding is
    damaged), then rebuild and save its search index.

    Args:
        bank: an open, writable bank.
        model: a J-RAS model whose retriever embeds the bank (None: rebuild the index only).
        device: the device to embed on.
    """
    damaged = bank.damaged_embeddings()
    reembedded = None
    if model is not None:
        engine = InferenceEngine(model, bank, device=device)
        reembedded = engine.ensure_bank_embeddings(force=bool(damaged))
    left_out = bank.rebuild_index()
    return RebuildResult(reembedded, damaged if reembedded else [], len(bank) - len(left_out),
                         left_out)


def pack(bank_dir: str | Path) -> tuple[int, Path, int]:
    """Store the pixels of the bank at ``bank_dir`` in one pack file (see ``ExemplarBank.pack``).

    Returns:
        The number of exemplars packed, the pack file and its size in bytes.
    """
    with ExemplarBank.open(bank_dir) as bank:
        count, file = bank.pack()
    return count, file, file.stat().st_size


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        pairs: the case ids written (``<case>_slice<z>``), each as ``<id>_image.tif`` and
            ``<id>_label.tif``.
        superseded: exemplars left out because a newer one has the same case and slice.
    """

    pairs: list[str]
    superseded: int


def export(bank: ExemplarBank, out: str | Path) -> ExportResult:
    """Write every exemplar as a training pair ``<case>_slice<z>_image.tif`` / ``_label.tif``.

    The pairs are what :func:`~napari_jras.core.io.find_cases` reads (one 2-D case per slice;
    its patient id, the part before ``_frame``/``_slice``, keeps a volume's slices in one
    split), so ``napari-jras train --data OUT`` trains a model on the bank. Images are the
    stored 8-bit normalised slices at the bank's side, labels its class indices. Of several
    exemplars of one case and slice, the newest is written. A failed export removes what it
    wrote.

    Args:
        bank: an open bank.
        out: a new or empty folder.

    Raises:
        BankError: ``out`` is a file or a non-empty folder, or the bank is empty.
        DataError: a file cannot be written.
    """
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise BankError(f"{out} is not a new or empty folder: export into a new folder")
    records = bank.records()
    newest = {(r["case_id"], r["slice_index"]): r for r in records}  # by id: the newest wins
    if not newest:
        raise BankError(f"The bank at {bank.path} holds no exemplars: nothing to export")
    made, written, pairs, taken = not out.exists(), [], [], set()
    try:
        for (case, z), record in newest.items():
            name = f"{_file_safe(str(case))}_slice{z}"
            if name in taken:  # two case ids that differ only in characters a file name drops
                name = f"{name}_ex{record['id']}"
            image = np.round(bank.images([record["id"]])[0] * 255).astype(np.uint8)
            for suffix, data in (("image", image), ("label", bank.masks([record["id"]])[0])):
                written.append(write_volume(out / f"{name}_{suffix}.tif", data))
            pairs.append(name)
            taken.add(name)
    except BaseException:
        for file in written:
            file.unlink(missing_ok=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return ExportResult(pairs, len(records) - len(pairs))


def _file_safe(case_id: str) -> str:
    """A case id as a file-name part: characters other than letters, digits, ``.``, ``-`` and
    ``_`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._") or "case"
