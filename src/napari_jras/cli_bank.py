"""``napari-jras bank``: the sub-command's options, and printing what the
:mod:`napari_jras.core.bank_tools` functions do."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .core.errors import BankError

if TYPE_CHECKING:
    from .core.bank_tools import RebuildResult


def add_bank_parser(sub: argparse._SubParsersAction,
                    add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``bank`` sub-command and its actions to the ``napari-jras`` parser.

    Args:
        sub: the sub-parsers of the main parser.
        add_common: adds the shared options (``--device``, ``--debug``, ...) to a parser.
    """
    b = sub.add_parser("bank", help="list, add to, rebuild, prune or export an exemplar bank")
    bsub = b.add_subparsers(dest="bank_command", required=True, metavar="ACTION")
    bl = bsub.add_parser("list", help="summary and exemplars of a bank")
    bl.add_argument("--bank", required=True)
    bl.add_argument("--limit", type=int, default=20, help="exemplars to list (0: summary only)")
    bl.add_argument("--json", action="store_true")
    ba = bsub.add_parser("add", help="add labelled cases to a bank (created if missing)")
    ba.add_argument("--bank", required=True)
    ba.add_argument("--model", required=True, help="run folder whose retriever embeds them")
    ba.add_argument("--data", required=True)
    ba.add_argument("--origin", default="import", choices=["import", "training", "correction"])
    ba.add_argument("--patient-regex")
    add_common(ba)
    br = bsub.add_parser("rebuild", help="re-embed with a model's retriever and rebuild the index")
    br.add_argument("--bank", required=True)
    br.add_argument("--model", help="run folder (without it: rebuild the index only)")
    add_common(br)
    bd = bsub.add_parser("remove", help="remove exemplars by id")
    bd.add_argument("--bank", required=True)
    bd.add_argument("ids", type=int, nargs="+")
    bn = bsub.add_parser("anonymise", help="replace patient/case ids by pseudonyms, clear "
                                           "file names and authors (in place)")
    bn.add_argument("--bank", required=True)
    bn.add_argument("--prefix", default="patient", help="pseudonyms are PREFIX-0001, ...")
    bn.add_argument("--key", help="CSV file for the patient_id,pseudonym key (keep it apart)")
    bp = bsub.add_parser("pack", help="store the bank's pixels in one file (for shipping; "
                                      "the bank stays writable)")
    bp.add_argument("--bank", required=True)
    be = bsub.add_parser("export", help="write every exemplar as a <case>_slice<z>_image.tif / "
                                        "_label.tif pair (training data: train --data OUT)")
    be.add_argument("--bank", required=True)
    be.add_argument("--out", required=True, help="a new or empty folder")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``bank`` action, printing its outcome; returns the exit status."""
    from .core import bank_tools  # imports torch: only when the command runs
    from .core.bank import ExemplarBank

    action = args.bank_command
    if action == "add":
        bank, ids = bank_tools.add_cases(args.bank, args.model, args.data, args.origin,
                                         args.device, args.patient_regex)
        with bank:
            print(f"Added {len(ids)} exemplars; the bank now holds {len(bank)}")
        return 0
    if action == "pack":
        count, file, nbytes = bank_tools.pack(args.bank)
        print(f"Packed the pixels of {count} exemplar(s) into {file.name} "
              f"({nbytes / 2**20:.1f} MiB)")
        return 0
    if action == "list" and args.limit < 0:
        raise BankError(f"--limit must be 0 (summary only) or more, got {args.limit}")
    ids = bank_tools.distinct_ids(args.ids) if action == "remove" else []
    model = bank_tools.retriever_model(args.model) \
        if action == "rebuild" and args.model else None
    with ExemplarBank.open(args.bank, read_only=action in ("list", "export")) as bank:
        if action == "list":
            _print_listing(*bank_tools.listing(bank, args.limit), as_json=args.json)
        elif action == "rebuild":
            _print_rebuild(bank_tools.rebuild(bank, model, args.device), bank.path)
        elif action == "remove":
            bank.remove(ids)
            print(f"Removed {len(ids)} exemplar(s); {len(bank)} left")
        elif action == "anonymise":
            patients = bank_tools.anonymise(bank, args.prefix, args.key)
            kept = f"; the key is in {args.key}: keep it apart from the bank" if args.key else ""
            print(f"Pseudonymised {len(patients)} patient(s) in {len(bank)} exemplars{kept}")
        elif action == "export":
            result = bank_tools.export(bank, args.out)
            older = f" ({result.superseded} older exemplar(s) of the same slices left out)" \
                if result.superseded else ""
            print(f"Exported {len(result.pairs)} exemplar(s) as image/label pairs to "
                  f"{args.out}{older}; train a model on them with "
                  f"`napari-jras train --data {args.out} --out RUN`")
        else:
            raise BankError(f"Unknown bank action {action}")
    return 0


def _damaged_note(bank_path: Path, damaged: list[int]) -> str:
    shown = ", ".join(map(str, damaged[:10])) + (", ..." if len(damaged) > 10 else "")
    return (f"{len(damaged)} damaged embedding(s) (exemplar id {shown}): re-embed the bank from "
            f"its pixels with `napari-jras bank rebuild --bank {bank_path} --model RUN`")


def _print_listing(info: dict, records: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({**info, "records": records}, indent=2, default=str))
        return
    for key, value in info.items():
        print(f"{key:18s} {value}")
    for r in records:
        print(f"  #{r['id']:<6} {r.get('origin', ''):10s} {r.get('case_id', '')} "
              f"slice {r.get('slice_index', '')}  {r.get('created', '')}")
    if info["damaged_embeddings"]:
        print("warning: " + _damaged_note(Path(info["path"]), info["damaged_embeddings"]))


def _print_rebuild(result: RebuildResult, bank_path: Path) -> None:
    if result.reembedded is not None:
        if result.reembedded:
            repaired = f" (repaired {len(result.repaired)} damaged embedding(s): exemplar id " \
                       f"{', '.join(map(str, result.repaired))})" if result.repaired else ""
            print(f"Re-embedded the bank from its stored pixels{repaired}")
        else:
            print("Embeddings were already current")
    print(f"Index rebuilt over {result.indexed} exemplars")
    if result.left_out:
        print("warning: left out of the index: " + _damaged_note(bank_path, result.left_out))
