"""``napari-jras bank`` actions: list, add, rebuild, remove, anonymise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .bank import ExemplarBank
from .checkpoint import atomic_write_bytes, load_model
from .data import load_slices
from .engine import InferenceEngine
from .errors import BankError
from .io import find_cases
from .pipeline import provenance_of


def summary(bank: ExemplarBank) -> dict:
    """Counts per origin and the bank's settings."""
    records = bank.records()
    origins: dict[str, int] = {}
    for r in records:
        origins[r.get("origin", "?")] = origins.get(r.get("origin", "?"), 0) + 1
    return {"path": str(bank.path), "exemplars": len(records), "size": bank.size,
            "num_classes": bank.num_classes, "class_names": bank.class_names,
            "embed_dim": bank.embed_dim, "retriever_version": bank.retriever_version,
            "patients": len({r.get("patient_id") for r in records}), "origins": origins}


def add_cases(bank_dir: str | Path, model_dir: str | Path, data: str | Path,
              origin: str = "import", device: str = "auto",
              patient_regex: str | None = None) -> tuple[ExemplarBank, list[int]]:
    """Add every slice of the labelled cases under ``data``, embedded by the model's retriever."""
    model = load_model(model_dir)
    if model.retriever is None:
        raise BankError("A baseline model has no retriever: use a J-RAS model to embed exemplars")
    bank_dir = Path(bank_dir)
    if (bank_dir / "bank.sqlite").exists():
        bank = ExemplarBank.open(bank_dir)
    else:
        cfg = model.config
        bank = ExemplarBank.create(bank_dir, size=cfg.size, num_classes=cfg.num_classes,
                                   embed_dim=model.retriever.embed_dim, class_names=cfg.class_names)
    engine = InferenceEngine(model, bank, device=device)
    if len(bank):
        engine.ensure_bank_embeddings()
    samples = load_slices(find_cases(data, patient_regex), size=bank.size,
                          modality=model.config.modality)
    images = np.stack([s.image for s in samples])
    ids = bank.add(images, np.stack([s.label for s in samples]),
                   [provenance_of(s, origin) for s in samples],
                   embeddings=engine.embed_for_bank(images), retriever_version=engine.version)
    return bank, ids


def write_key(path: Path, patients: dict[str, str]) -> None:
    """Write the pseudonym key (``patient_id,pseudonym`` lines) atomically."""
    lines = ["patient_id,pseudonym"] + [f"{old},{new}" for old, new in patients.items()]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def run(args: argparse.Namespace) -> int:
    """Dispatch a ``bank`` sub-action parsed by the CLI."""
    action = args.bank_command
    if action == "add":
        bank, ids = add_cases(args.bank, args.model, args.data, args.origin, args.device,
                              args.patient_regex)
        print(f"Added {len(ids)} exemplars; the bank now holds {len(bank)}")
        return 0
    bank = ExemplarBank.open(args.bank)
    if action == "list":
        info = summary(bank)
        records = bank.records()[: args.limit] if args.limit else []
        if args.json:
            print(json.dumps({**info, "records": records}, indent=2, default=str))
            return 0
        for key, value in info.items():
            print(f"{key:18s} {value}")
        for r in records:
            print(f"  #{r['id']:<6} {r.get('origin', ''):10s} {r.get('case_id', '')} "
                  f"slice {r.get('slice_index', '')}  {r.get('created', '')}")
        return 0
    if action == "rebuild":
        if args.model:
            engine = InferenceEngine(load_model(args.model), bank, device=args.device)
            changed = engine.ensure_bank_embeddings()
            print("Re-embedded the bank" if changed else "Embeddings were already current")
        bank.rebuild_index()
        print(f"Index rebuilt over {len(bank)} exemplars")
        return 0
    if action == "remove":
        bank.remove(args.ids)
        print(f"Removed {len(args.ids)} exemplar(s); {len(bank)} left")
        return 0
    if action == "anonymise":
        if args.key and Path(args.key).exists():
            raise BankError(f"{args.key} exists: choose a new file for the pseudonym key")
        patients = bank.pseudonymise(args.prefix)
        if args.key:
            write_key(Path(args.key), patients)
        print(f"Pseudonymised {len(patients)} patient(s) in {len(bank)} exemplars"
              + (f"; the key is in {args.key}: keep it apart from the bank" if args.key else ""))
        return 0
    raise BankError(f"Unknown bank action {action}")
