"""Does a J-RAS model use what it retrieves, and how relevant is what it retrieves?

Usage (from the repository root)::

    python benchmarks/diagnostics/guide_use.py --model src/napari_jras/_builtin/cardiac_mri \
        --data ../shared/data/acdc/val --out benchmarks/results/diagnostics/guide_use_builtin.json

Every labelled case is predicted by the engine (as ``evaluate`` does, never retrieving the
evaluated patient) once per guide source (``retrieved``, ``random``, ``none``, ``neighbour``,
``oracle``; see ``napari-jras evaluate --guide-source``) and scored per volume at the model's
working size. A model that uses its exemplars ranks oracle > neighbour > retrieved >= none >
random. For the ``retrieved`` and ``random`` exemplars it also reports:

- ``relevance``: mean foreground Dice between the query slice's ground truth and each
  exemplar's mask (classes absent from both are left out): how useful a prior the exemplars
  are, per retriever;
- ``guide_alone``: no network, the argmax of the weighted exemplar masks.

Also reported: the gap between the top-1 and top-K similarity, the largest fusion weight and
how many distinct exemplars all queries together retrieve.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from napari_jras.core.data import as_slices, resize_labels
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.io import find_cases, load_case
from napari_jras.core.metrics import dice_per_class
from napari_jras.core.prediction import RetrievedExemplar
from napari_jras.core.provenance import provenance
from napari_jras.core.volume_memory import diagnostic_memory

SOURCES = ("retrieved", "random", "none", "neighbour", "oracle")


def relevance(items: list[RetrievedExemplar], truth: np.ndarray, num_classes: int) -> float:
    """Mean over exemplars of the foreground Dice between exemplar mask and ground truth."""
    scores = []
    for e in items:
        d = dice_per_class(e.mask, truth, num_classes)
        both_empty = [not ((e.mask == c).any() or (truth == c).any())
                      for c in range(1, num_classes)]
        d = np.where(both_empty, np.nan, d)
        if not np.all(np.isnan(d)):
            scores.append(float(np.nanmean(d)))
    return float(np.mean(scores)) if scores else float("nan")


def fused_argmax(items: list[RetrievedExemplar], num_classes: int) -> np.ndarray:
    """Argmax of the weighted one-hot exemplar masks (the guide with no network)."""
    votes = sum(e.weight * np.eye(num_classes)[e.mask.astype(int)] for e in items)
    return np.asarray(votes).argmax(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="J-RAS run folder (with bank)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    engine = InferenceEngine.from_run(args.model, device="cpu")
    cfg = engine.model.config
    size = (cfg.size, cfg.size)
    dice: dict[str, list[float]] = {s: [] for s in (*SOURCES, "guide_alone")}
    rel: dict[str, list[float]] = {"retrieved": [], "random": []}
    gaps, top_weights, retrieved_ids = [], [], set()
    cases = find_cases(args.data)
    for case in cases:
        image, label = load_case(case)
        truth = resize_labels(as_slices(label), size)
        for source in SOURCES:
            pred = engine.predict(image.data, exclude_patient=case.patient_id,
                                  guide_source=source, return_probabilities=True,
                                  memory=diagnostic_memory(source, label))
            probs = pred.probabilities if pred.probabilities.ndim == 4 else pred.probabilities[:, None]
            small = resize_labels(probs.argmax(0).astype(np.uint8), size)
            dice[source].append(float(np.mean(dice_per_class(small, truth, cfg.num_classes))))
            if source in rel:
                items = [pred.exemplars[z] for z in range(len(truth))]
                rel[source].extend(relevance(it, truth[z], cfg.num_classes)
                                   for z, it in enumerate(items))
            if source == "retrieved":
                alone = np.stack([fused_argmax(it, cfg.num_classes) for it in items])
                dice["guide_alone"].append(float(np.mean(dice_per_class(alone, truth,
                                                                        cfg.num_classes))))
                for it in items:
                    gaps.append(it[0].score - it[-1].score)
                    top_weights.append(max(e.weight for e in it))
                    retrieved_ids.update(e.id for e in it)
    result = {
        "provenance": provenance(data=args.data, cases=cases, model_dir=args.model,
                                 device=str(engine.device), guide_source="diagnostic: retrieved, "
                                 "oracle, none, random, guide alone"),
        "model": str(args.model), "data": str(args.data), "cases": len(dice["retrieved"]),
        "working_size": cfg.size, "k": cfg.k, "tau": cfg.tau, "fusion": cfg.fusion,
        "dice": {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in dice.items()},
        "relevance": {k: {"mean": float(np.nanmean(v)), "slices": len(v)}
                      for k, v in rel.items()},
        "top1_minus_topk_similarity": {"median": float(np.median(gaps)),
                                       "mean": float(np.mean(gaps))},
        "largest_fusion_weight_mean": float(np.mean(top_weights)),
        "distinct_exemplars_retrieved": len(retrieved_ids), "bank_size": len(engine.bank),
        "command": "python benchmarks/diagnostics/guide_use.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, stats in result["dice"].items():
        print(f"{name:11s} Dice {stats['mean']:.4f} +- {stats['std']:.4f}")
    for name, stats in result["relevance"].items():
        print(f"relevance of {name} exemplars: {stats['mean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
