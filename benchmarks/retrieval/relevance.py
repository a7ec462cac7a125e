"""How relevant are the retrieved exemplars? LiteMedSAM's encoder vs the small CNN vs random.

Usage (from the repository root)::

    python benchmarks/retrieval/relevance.py --bank ../shared/data/acdc/train \
        --queries ../shared/data/acdc/val --out benchmarks/results/retrieval/relevance_acdc.json

Every query slice (the ``--queries`` cases) retrieves its top ``--k`` slices from a bank made
of every slice of the ``--bank`` cases (other patients), all normalised like the engine does
and resized to ``--size``. Relevance of an exemplar = mean foreground Dice between its
ground-truth mask and the query's (``mask_relevance`` of the trainer: a class absent from both
counts as a match). Reported per retriever: the mean relevance of the top-K, and the same for

- ``random``: K bank slices drawn at random (seeded), the floor;
- ``oracle``: the K bank slices with the highest relevance, the ceiling of any retriever;
- ``cnn_builtin``: the trained retriever of the built-in cardiac model (small CNN + head);
- ``cnn_untrained``: the same architecture with random weights (what a new run starts from);
- ``litemedsam``: LiteMedSAM's frozen TinyViT image encoder, average-pooled (256 features),
  centred on the bank mean, cosine similarity: no training at all (a new run's head then
  learns from these features).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_jras.core.checkpoint import load_model
from napari_jras.core.data import load_slices
from napari_jras.core.io import find_cases
from napari_jras.core.provenance import git_state, script_command, write_report
from napari_jras.core.retrieval import LiteMedSAMEncoder, Retriever, embed_images
from napari_jras.core.train import mask_relevance

BUILTIN = Path(__file__).resolve().parents[2] / "src" / "napari_jras" / "_builtin" / "cardiac_mri"


def one_hot(labels: np.ndarray, num_classes: int, size: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, C, size, size) one-hot at ``size`` (nearest)."""
    t = torch.from_numpy(labels.astype(np.int64))
    t = F.interpolate(t[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].long()
    return F.one_hot(t, num_classes).permute(0, 3, 1, 2).float()


@torch.no_grad()
def pooled_litemedsam(images: torch.Tensor, size: int, batch: int = 16) -> torch.Tensor:
    encoder = LiteMedSAMEncoder(size, trainable_blocks=0).eval()
    return torch.cat([encoder(images[i:i + batch, None]) for i in range(0, len(images), batch)])


def cosine_topk(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (Q, k) of the most similar bank rows, features centred on the bank mean."""
    centre = bank.mean(0)
    q, b = F.normalize(queries - centre, dim=1), F.normalize(bank - centre, dim=1)
    return (q @ b.T).topk(k, dim=1).indices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128, help="working size of images")
    parser.add_argument("--mask-size", type=int, default=64, help="size of the Dice masks")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--modality", default="mri")
    parser.add_argument("--patient-regex")
    parser.add_argument("--bank-every", type=int, default=1, help="use every N-th bank case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start, commit = time.time(), git_state()  # read at start: the code that runs
    bank_cases = find_cases(args.bank, args.patient_regex)[::args.bank_every]
    bank = load_slices(bank_cases, args.size, args.modality)
    queries = load_slices(find_cases(args.queries, args.patient_regex), args.size, args.modality)
    num_classes = 1 + int(max(s.label.max() for s in [*bank, *queries]))
    bank_x = torch.from_numpy(np.stack([s.image for s in bank]))
    query_x = torch.from_numpy(np.stack([s.image for s in queries]))
    bank_y = one_hot(np.stack([s.label for s in bank]), num_classes, args.mask_size)
    query_y = one_hot(np.stack([s.label for s in queries]), num_classes, args.mask_size)
    relevance = torch.cat([mask_relevance(query_y[i:i + 32], bank_y)
                           for i in range(0, len(query_y), 32)])  # (Q, N)
    rng = np.random.default_rng(args.seed)
    picks: dict[str, torch.Tensor] = {
        "random": torch.from_numpy(rng.integers(0, len(bank), (len(queries), args.k))),
        "oracle": relevance.topk(args.k, dim=1).indices,
    }
    seconds: dict[str, float] = {}
    retrievers = {"cnn_builtin": load_model(BUILTIN).retriever,
                  "cnn_untrained": Retriever(encoder="cnn", embed_dim=64, width=16,
                                             input_size=64, center=True)}
    for name, retriever in retrievers.items():
        t = time.time()
        feats = [embed_images(retriever, x, features=True) for x in (query_x, bank_x)]
        picks[name] = cosine_topk(feats[0], feats[1], args.k)
        seconds[name] = time.time() - t
    t = time.time()
    picks["litemedsam"] = cosine_topk(pooled_litemedsam(query_x, args.size),
                                      pooled_litemedsam(bank_x, args.size), args.k)
    seconds["litemedsam"] = time.time() - t
    rows = torch.arange(len(queries))[:, None]
    results = {name: {"mean_relevance": float(relevance[rows, idx].mean()),
                      "top1_relevance": float(relevance[rows[:, 0], idx[:, 0]].mean())}
               for name, idx in picks.items()}
    for name, secs in seconds.items():
        results[name]["embed_seconds"] = round(secs, 1)
    report = {
        "what": "mean foreground Dice between query GT and its top-K retrieved exemplars' GT",
        "bank": str(args.bank), "bank_every": args.bank_every, "bank_cases": len(bank_cases),
        "queries": str(args.queries), "bank_slices": len(bank),
        "query_slices": len(queries), "k": args.k, "size": args.size,
        "mask_size": args.mask_size, "seed": args.seed, "results": results,
        "provenance": {"commit": commit, "torch": torch.__version__,
                       "threads": args.threads, "machine": platform.platform(),
                       "seconds": round(time.time() - start, 1),
                       "command": script_command(__file__, argv)},
    }
    write_report(args.out, report)
    for name, row in results.items():
        print(f"{name:14s} relevance top-{args.k} {row['mean_relevance']:.4f}  "
              f"top-1 {row['top1_relevance']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
