"""Does a J-RAS model use what it retrieves? Dice under swapped guides, and retrieval statistics.

Usage (from the repository root)::

    python benchmarks/diagnostics/guide_use.py --model src/napari_jras/_builtin/cardiac_mri \
        --data ../shared/data/acdc/val --out benchmarks/results/diagnostics/guide_use_builtin.json

For every slice of the labelled cases (at the model's working size) the segmenter is run with:

- ``retrieved``: the guide the engine builds from the bank (what users get);
- ``random``: the fused guide of K random bank exemplars (same weights);
- ``oracle``: the query's own ground truth as guide mask and the query as guide image;
- ``none``: all-zero guide channels;
- ``guide_alone``: no network, the argmax of the retrieved guide mask (how good a prior the
  fused exemplars are by themselves).

If ``retrieved`` is no better than ``random`` the retrieval carries no case-specific
information; if ``oracle`` is no better either, the segmenter ignores the guide's content.
Also reported: the gap between the top-1 and top-K similarity, the largest fusion weight and
how many distinct exemplars all queries together retrieve.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_jras.core.data import as_slices, resize_images, resize_labels
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.fusion import Guide, align_exemplars, combine
from napari_jras.core.io import find_cases, load_case
from napari_jras.core.metrics import dice_per_class
from napari_jras.core.normalize import normalize
from napari_jras.core.provenance import provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="J-RAS run folder (with bank)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    engine = InferenceEngine.from_run(args.model, device="cpu")
    engine.ensure_bank_embeddings()
    model, cfg = engine.model, engine.model.config
    size = (cfg.size, cfg.size)
    bank_ids = engine.bank.embeddings()[0]
    dice: dict[str, list[float]] = {
        k: [] for k in ("retrieved", "random", "oracle", "none", "guide_alone")}
    gaps, top_weights, retrieved_ids = [], [], set()
    cases = find_cases(args.data)
    for case in cases:
        image, label = load_case(case)
        x = torch.from_numpy(resize_images(as_slices(normalize(image.data, cfg.modality)), size))
        y = resize_labels(as_slices(label), size)
        with torch.inference_mode():
            guide, hits, _ = engine._retrieve(x, case.patient_id)
            rand = rng.choice(bank_ids, size=guide.indices.shape).tolist()
            images, masks = engine._exemplar_tensors([i for row in rand for i in row])
            images, masks = align_exemplars(x, images.view(*guide.indices.shape, *size),
                                            masks.view(*guide.indices.shape, *size),
                                            cfg.max_shift)  # aligned like the retrieved ones
            r_img, r_mask = combine(guide.weights, images, masks, cfg.num_classes)
            onehot = F.one_hot(torch.from_numpy(y.astype(np.int64)), cfg.num_classes)
            guides = {
                "retrieved": guide,
                "random": Guide(r_img, r_mask, guide.weights, guide.scores, guide.indices),
                "oracle": Guide(x[:, None], onehot.permute(0, 3, 1, 2).float(), guide.weights,
                                guide.scores, guide.indices),
                "none": Guide(torch.zeros_like(guide.image), torch.zeros_like(guide.mask),
                              guide.weights, guide.scores, guide.indices),
            }
            for name, g in guides.items():
                pred = model(x[:, None], g).argmax(1).numpy()
                dice[name].append(float(dice_per_class(pred, y, cfg.num_classes).mean()))
            alone = guide.mask.argmax(1).numpy()  # the fused exemplar masks, no network
            dice["guide_alone"].append(float(dice_per_class(alone, y, cfg.num_classes).mean()))
        scores = guide.scores.numpy()
        gaps.extend((scores[:, 0] - scores[:, -1]).tolist())
        top_weights.extend(guide.weights.max(1).values.tolist())
        retrieved_ids.update(h.id for row in hits for h in row)
    result = {
        "provenance": provenance(data=args.data, cases=cases, model_dir=args.model,
                                 device=str(engine.device), guide_source="diagnostic: retrieved, "
                                 "oracle, none, random, guide alone"),
        "model": str(args.model), "data": str(args.data), "cases": len(dice["retrieved"]),
        "working_size": cfg.size, "k": cfg.k, "tau": cfg.tau,
        "dice": {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in dice.items()},
        "top1_minus_topk_similarity": {"median": float(np.median(gaps)),
                                       "mean": float(np.mean(gaps))},
        "largest_fusion_weight_mean": float(np.mean(top_weights)),
        "distinct_exemplars_retrieved": len(retrieved_ids), "bank_size": int(len(bank_ids)),
        "command": "python benchmarks/diagnostics/guide_use.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, stats in result["dice"].items():
        print(f"{name:10s} Dice {stats['mean']:.4f} +- {stats['std']:.4f}")
    print(f"top1-topK similarity gap (median) {result['top1_minus_topk_similarity']['median']:.2e},"
          f" largest fusion weight (mean) {result['largest_fusion_weight_mean']:.3f}, "
          f"{len(retrieved_ids)} distinct exemplars of {len(bank_ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
