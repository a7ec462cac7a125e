"""Package a trained run folder as the built-in model shipped in ``napari_jras/_builtin``.

Usage (from the repository root)::

    python scripts/make_builtin_model.py --run runs/jras_u16 --baseline-report runs/base_u16_val.json \
        --report runs/jras_u16_val.json --keep-every 4

Copies the config and the weights (stored in float16; they load back into float32) and rebuilds
a reduced exemplar bank from the run's training bank: every ``--keep-every``-th slice of each case
(slices without any foreground are dropped, they guide nothing), embedded with the packaged
retriever so nothing is re-embedded at start-up, its pixels packed into one file (as
``napari-jras bank pack`` does). Absolute paths are removed from the copied
training record: only the data folder's name, case counts and the settings stay. Writes
``MODEL_CARD.md`` with the validation numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from napari_jras.core.bank import ExemplarBank
from napari_jras.core.checkpoint import atomic_write_json, load_model, load_tensors, save_tensors
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.model import ModelConfig

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "napari_jras" / "_builtin" / "cardiac_mri"


def select_exemplars(records: list[dict], masks: np.ndarray, keep_every: int) -> list[int]:
    """Indices into ``records`` to keep: every ``keep_every``-th foreground slice per case."""
    by_case: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        if masks[i].any():
            by_case.setdefault(record["case_id"], []).append(i)
    keep = []
    for rows in by_case.values():
        rows.sort(key=lambda i: records[i]["slice_index"])
        keep.extend(rows[::keep_every])
    return sorted(keep)


def reduced_bank(source: Path, dest: Path, keep_every: int) -> int:
    """Write the reduced copy of the bank ``source`` to ``dest``; returns its size."""
    with ExemplarBank.open(source) as bank:
        ids, images, masks = bank.load_all()
        records = bank.records(ids)
        emb_ids, embeddings = bank.embeddings()
        version = bank.retriever_version
        by_id = dict(zip(emb_ids.tolist(), embeddings, strict=True))
        keep = select_exemplars(records, masks, keep_every)
        provenance = [{k: records[i][k] for k in ("case_id", "patient_id", "slice_index",
                                                  "source", "origin")} for i in keep]
        with ExemplarBank.create(dest, size=images.shape[-1], num_classes=bank.num_classes,
                                 embed_dim=bank.embed_dim, class_names=bank.class_names) as out:
            out.add(images[keep], masks[keep], provenance,
                    embeddings=np.stack([by_id[int(ids[i])] for i in keep]),
                    retriever_version=version)
            return len(out)


def model_card(run: Path, report: dict | None, baseline: dict | None, bank_size: int,
               train: dict) -> str:
    """A short markdown description of the packaged model."""
    lines = ["# Built-in model: cardiac MRI (ACDC), J-RAS U-Net", "",
             f"Trained by `napari-jras train` on {train['data']['cases']} ACDC training cases "
             f"({train['data']['patients']} patients, {train['data']['slices']} slices), "
             f"{train['steps_done']} steps, {train['wall_time_s'] / 60:.0f} min on "
             f"{train['device']}. Exemplar bank: {bank_size} training slices.", "",
             "Classes: background, RV (right ventricle), myocardium, LV (left ventricle).", ""]
    if report is not None:
        lines += ["Validation (ACDC val, 20 cases, other patients), mean Dice:", "",
                  "| model | RV | myocardium | LV | mean |", "|---|---|---|---|---|"]
        for name, rep in (("J-RAS", report), ("baseline (same U-Net, no retrieval)", baseline)):
            if rep is None:
                continue
            per = rep["summary"]["per_class"]
            cells = [f"{per[c]['dice']['mean']:.3f}" for c in ("RV", "myocardium", "LV")]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {rep['summary']['mean']['dice']['mean']:.3f} |")
        lines.append("")
    lines += ["Data: ACDC (O. Bernard et al., IEEE TMI 2018), research and non-commercial use.",
              "See docs/builtin_model.md for the exact commands.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="trained J-RAS run folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep-every", type=int, default=4)
    parser.add_argument("--report", type=Path, help="evaluate report of the run (for the card)")
    parser.add_argument("--baseline-report", type=Path, help="evaluate report of the baseline")
    parser.add_argument("--readout-trust", type=float,
                        help="replace the run's readout_trust (readout fusion) in the package")
    args = parser.parse_args(argv)

    tmp = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((args.run / "config.json").read_text())
    if args.readout_trust is not None:
        config["readout_trust"] = args.readout_trust
    atomic_write_json(tmp / "config.json", ModelConfig.from_dict(config).to_dict())
    # half-precision storage halves the download; weights load back into float32 parameters
    weights = load_tensors(args.run / "model.safetensors")
    save_tensors(tmp / "model.safetensors",
                 {k: v.half() if v.is_floating_point() else v for k, v in weights.items()})
    train = json.loads((args.run / "train_config.json").read_text())
    train["data"]["path"] = Path(train["data"]["path"]).name
    if train.get("val"):
        train["val"] = Path(train["val"]).name
    atomic_write_json(tmp / "train_config.json", train)
    size = reduced_bank(args.run / "bank", tmp / "bank", args.keep_every)
    with ExemplarBank.open(tmp / "bank") as bank:  # embed with the float16-rounded retriever
        InferenceEngine(load_model(tmp, "cpu"), bank, device="cpu").ensure_bank_embeddings()
        bank.pack()  # one pixel file instead of one per exemplar (`napari-jras bank pack`)
    (tmp / "bank" / "pixels").rmdir()  # empty now; git would not keep it anyway
    reports = [json.loads(p.read_text()) if p else None for p in (args.report, args.baseline_report)]
    (tmp / "MODEL_CARD.md").write_text(model_card(args.run, reports[0], reports[1], size, train))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: bank of {size} exemplars, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
