"""Speed and scale of napari-jras: prediction latency, accept-to-searchable time, training cost.

Usage (from the repository root)::

    python benchmarks/speed/bench_speed.py --out benchmarks/results/speed_cpu
    python benchmarks/speed/bench_speed.py --out /tmp/speed --quick      # a smoke run
    python benchmarks/speed/bench_speed.py --out DIR --latency-only      # latency.json only

Three measurements, each written to ``speed.json`` (machine-readable), ``speed.md`` (tables)
and PNG plots in ``--out``:

1. **Latency** of one 256x256 slice and of a whole volume with the built-in model (self-guided:
   two passes; also in one pass), split into retriever embedding, bank search, fusion and
   network. The search part is measured on
   indexes of 1k / 10k / 100k / 1M exemplars: the real bank's embeddings, then synthetic
   L2-normalised vectors (a mix of the real ones plus noise) for the large sizes, with the exact
   flat index and the approximate HNSW index that banks switch to above 50k exemplars.
2. **Accept to searchable**: time from "accept" (embed the corrected slice, store it in the
   bank, update the index) until a search returns it, against bank size (a real on-disk bank).
3. **Training**: J-RAS vs the same backbone without retrieval: time per step, samples/s and
   peak memory (CPU RSS, CUDA max allocated), each mode in its own process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

from napari_jras.core.bank import ExemplarBank
from napari_jras.core.data import load_slices
from napari_jras.core.engine import InferenceEngine
from napari_jras.core.index import EmbeddingIndex
from napari_jras.core.io import find_cases, read_volume
from napari_jras.core.model import JRASModel, ModelConfig
from napari_jras.core.normalize import normalize
from napari_jras.core.provenance import provenance
from napari_jras.core.train import JointTrainer, SliceSet, TrainConfig, seed_everything
from napari_jras.core.workspace import builtin_model_dir

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO / "src" / "napari_jras" / "_sample"
ACDC_TRAIN = REPO.parent / "shared" / "data" / "acdc" / "train"
SLICE_SIZE = 256


def machine() -> dict:
    """Where the numbers come from."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def synthetic_embeddings(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors spread like the real ones: random real rows plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    base = real[rng.integers(0, len(real), n)]
    vecs = base + rng.normal(0, 0.05, base.shape).astype(np.float32)
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def engine_latency(engine: InferenceEngine, volume: np.ndarray, repeats: int) -> dict:
    """Per-part milliseconds for one slice and for the whole volume (medians); for a
    self-guided model also the volume in one pass (``volume_one_pass``)."""
    def parts(image: np.ndarray) -> dict:
        runs = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            pred = engine.predict(image)
            total = time.perf_counter() - t0
            runs.append({**{k: v * 1000 for k, v in pred.timings.items()}, "total": total * 1000})
        runs = runs[1:]  # the first call fills the exemplar cache
        return {key: median(r[key] for r in runs) for key in runs[0]}

    result = {"slice": parts(volume[volume.shape[0] // 2]), "volume": parts(volume),
              "volume_slices": int(volume.shape[0])}
    if engine.self_guides(volume.shape[0], None, "retrieved"):  # the volume took two passes
        engine.self_guide = False
        try:
            result["volume_one_pass"] = parts(volume)
        finally:
            engine.self_guide = True
    return result


def search_latency(real: np.ndarray, sizes: list[int], k: int, volume_slices: int,
                   repeats: int) -> list[dict]:
    """Search time of one query and of a volume's queries against indexes of ``sizes``."""
    rng = np.random.default_rng(1)
    rows = []
    for n in sizes:
        vecs = real[:n] if n <= len(real) else synthetic_embeddings(real, n)
        ids = np.arange(len(vecs))
        queries = synthetic_embeddings(real, volume_slices, seed=int(rng.integers(1 << 30)))
        for kind, threshold in (("exact", n + 1), ("hnsw", 1)):
            t0 = time.perf_counter()
            index = EmbeddingIndex(ids, vecs, approx_threshold=threshold, use_gpu=False)
            build = time.perf_counter() - t0
            exact = EmbeddingIndex(ids, vecs, approx_threshold=n + 1, use_gpu=False) \
                if kind == "hnsw" else index
            got, _ = index.search(queries, k)
            want, _ = exact.search(queries, k)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want, strict=True)]))
            rows.append({
                "bank_size": n, "index": kind, "build_s": build, "recall_at_k": recall,
                "slice_ms": timed(lambda index=index, q=queries: index.search(q[:1], k), repeats),
                "volume_ms": timed(lambda index=index, q=queries: index.search(q, k), repeats),
            })
            print(f"  search {kind:5s} n={n:>8,}: slice {rows[-1]['slice_ms']:.3f} ms, "
                  f"volume {rows[-1]['volume_ms']:.3f} ms, recall {recall:.3f}", flush=True)
    return rows


def accept_latency(engine: InferenceEngine, slice_image: np.ndarray, slice_mask: np.ndarray,
                   sizes: list[int], repeats: int, tmp: Path) -> list[dict]:
    """Accept a corrected slice into on-disk banks of ``sizes`` and time until it is found."""
    real_ids, real = engine.bank.embeddings()
    images, masks = engine.bank.images(real_ids[:64]), engine.bank.masks(real_ids[:64])
    version = engine.version
    rows = []
    for n in sizes:
        path = tmp / f"bank_{n}"
        with ExemplarBank.create(path, size=engine.bank.size, num_classes=engine.bank.num_classes,
                                 embed_dim=engine.bank.embed_dim) as bank:
            for start in range(0, n, 1000):
                m = min(1000, n - start)
                pick = np.arange(start, start + m) % len(images)
                bank.add(images[pick], masks[pick],
                         [{"case_id": f"case{(start + j) // 10}", "origin": "training",
                           "slice_index": (start + j) % 10} for j in range(m)],
                         embeddings=synthetic_embeddings(real, m, seed=start),
                         retriever_version=version)
            times = []
            for r in range(repeats):
                t0 = time.perf_counter()
                emb = engine.embed_for_bank(slice_image[None])
                new_id = bank.add(slice_image[None], slice_mask[None],
                                  [{"case_id": f"correction{r}", "origin": "correction"}],
                                  embeddings=emb, retriever_version=version)[0]
                hits = bank.search(emb, r + 1, version)  # earlier repeats are identical copies
                times.append((time.perf_counter() - t0) * 1000)
                if new_id not in [h.id for h in hits[0]]:
                    raise RuntimeError("the accepted exemplar was not retrieved")
        rows.append({"bank_size": n, "accept_to_searchable_ms": median(times)})
        print(f"  accept n={n:>6,}: {rows[-1]['accept_to_searchable_ms']:.1f} ms", flush=True)
    return rows


def train_cost(mode: str, steps: int, data: Path) -> dict:
    """Time ``steps`` joint (or baseline) training steps in this process; peak memory."""
    torch.manual_seed(0)
    seed_everything(0)
    config = json.loads((builtin_model_dir() / "config.json").read_text())
    config["use_retrieval"] = mode == "jras"
    samples = load_slices(find_cases(data), size=config["size"])
    model = JRASModel(ModelConfig(**config))
    trainer = JointTrainer(model, SliceSet(samples, model.num_classes),
                           TrainConfig(steps=steps + 2, batch_size=8, log_every=10_000,
                                       checkpoint_every=10_000, augment=True))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_fn = trainer.supervised_step
    contrastive = trainer.contrastive_step if mode == "jras" else None
    if contrastive is not None:
        trainer.refresh_embeddings()
    for _ in range(2):  # warm-up
        step_fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
        if contrastive is not None:
            contrastive()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"mode": mode, "steps": steps, "step_ms": elapsed / steps * 1000,
            "samples_per_s": steps * 8 / elapsed, "train_slices": len(samples),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_max_allocated_mib": (torch.cuda.max_memory_allocated() / 2**20
                                       if torch.cuda.is_available() else None)}


def write_report(result: dict, out: Path) -> None:
    """speed.md and the plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, search = result["latency"], result["search"]
    lines = ["# Speed and scale", "", f"Machine: `{json.dumps(result['machine'])}`", "",
             f"Command: `{result['command']}`", "",
             "## Prediction latency (built-in model, real bank of "
             f"{result['real_bank_size']} exemplars), ms", "",
             "| input | embed | search | fusion | network | total |", "|---|---|---|---|---|---|"]
    for key, label in (("slice", f"one {SLICE_SIZE}x{SLICE_SIZE} slice"),
                       ("volume", f"volume ({lat['volume_slices']} slices)"),
                       ("volume_one_pass", "the volume, one pass (`--no-self-guide`)")):
        if key not in lat:
            continue
        p = lat[key]
        lines.append(f"| {label} | {p['embed']:.1f} | {p['search']:.2f} | {p['fusion']:.1f} | "
                     f"{p['network']:.1f} | {p['total']:.1f} |")
    lines += ["", f"## Bank search against bank size (K = {result['k']})", "",
              "| exemplars | index | build s | search, slice ms | search, volume ms | recall@K "
              "vs exact | slice total ms (est.) |", "|---|---|---|---|---|---|---|"]
    other = lat["slice"]["total"] - lat["slice"]["search"]
    for r in search:
        lines.append(f"| {r['bank_size']:,} | {r['index']} | {r['build_s']:.2f} | "
                     f"{r['slice_ms']:.3f} | {r['volume_ms']:.3f} | {r['recall_at_k']:.3f} | "
                     f"{other + r['slice_ms']:.1f} |")
    lines += ["", "Slice total (est.) = measured embed + fusion + network of one slice + the "
              "search time at that bank size. Bank sizes above the real bank use synthetic "
              "embeddings (real ones plus noise).", "",
              "## Accept to searchable, ms", "", "| exemplars in the bank | ms |", "|---|---|"]
    lines += [f"| {r['bank_size']:,} | {r['accept_to_searchable_ms']:.1f} |"
              for r in result["accept"]]
    lines += ["", "## Training cost, J-RAS vs baseline (same U-Net, batch 8, size 128)", "",
              "| mode | ms / step | samples/s | peak RSS MiB | CUDA max alloc MiB |",
              "|---|---|---|---|---|"]
    for r in result["train"]:
        cuda = "-" if r["cuda_max_allocated_mib"] is None else f"{r['cuda_max_allocated_mib']:.0f}"
        lines.append(f"| {r['mode']} | {r['step_ms']:.0f} | {r['samples_per_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {cuda} |")
    lines += ["", f"J-RAS / baseline step time: {result['train_ratio']:.2f}x "
              "(a J-RAS step = one supervised step with retrieval + one contrastive step)", ""]
    (out / "speed.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, style in (("exact", "o-"), ("hnsw", "s--")):
        rows = [r for r in search if r["index"] == kind]
        axes[0].loglog([r["bank_size"] for r in rows], [r["slice_ms"] for r in rows], style,
                       label=f"{kind}, one slice")
        axes[0].loglog([r["bank_size"] for r in rows], [r["volume_ms"] for r in rows], style,
                       alpha=0.5, label=f"{kind}, volume")
    axes[0].set(xlabel="exemplars in the bank", ylabel="search time (ms)", title="Bank search")
    axes[0].legend(fontsize=8)
    acc = result["accept"]
    axes[1].semilogx([r["bank_size"] for r in acc], [r["accept_to_searchable_ms"] for r in acc],
                     "o-")
    axes[1].set(xlabel="exemplars in the bank", ylabel="ms", title="Accept to searchable",
                ylim=(0, None))
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000",
                        help="bank sizes for the search benchmark")
    parser.add_argument("--accept-sizes", default="100,1000,10000")
    parser.add_argument("--train-data", type=Path, default=ACDC_TRAIN,
                        help="labelled cases of several patients for the training-cost "
                             "measurement (default: ../shared/data/acdc/train)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the prediction latency, written to latency.json")
    parser.add_argument("--train-only", choices=["jras", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_only:
        print(json.dumps(train_cost(args.train_only, args.train_steps, args.train_data)))
        return 0
    if args.quick:
        args.sizes, args.accept_sizes, args.repeats, args.train_steps = "1000,5000", "50", 3, 2
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    accept_sizes = [int(s) for s in args.accept_sizes.split(",")]

    engine = InferenceEngine.from_run(builtin_model_dir(), device=args.device)
    engine.ensure_bank_embeddings()
    image = read_volume(SAMPLE_DIR / "patient002_frame01_image.tif").data.astype(np.float32)
    label = read_volume(SAMPLE_DIR / "patient002_frame01_label.tif").data
    pad = [(0, 0)] + [(max(0, SLICE_SIZE - s) // 2, max(0, SLICE_SIZE - s) - max(0, SLICE_SIZE - s) // 2)
                      for s in image.shape[1:]]
    volume = np.pad(image, pad)[:, :SLICE_SIZE, :SLICE_SIZE]
    print("latency ...", flush=True)
    latency = engine_latency(engine, volume, args.repeats)
    if args.latency_only:
        record = {"provenance": provenance(model_dir=builtin_model_dir(),
                                           device=str(engine.device)),
                  "machine": machine(), "command": " ".join(["python", *sys.argv]),
                  "repeats": args.repeats, "latency": latency}
        (args.out / "latency.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(latency, indent=1))
        return 0
    _, real = engine.bank.embeddings()
    print("search ...", flush=True)
    search = search_latency(real, sizes, engine.model.config.k, volume.shape[0], args.repeats)
    print("accept ...", flush=True)
    mid = image.shape[0] // 2
    norm = normalize(image, engine.model.config.modality)[mid]
    with tempfile.TemporaryDirectory() as tmp:
        accept = accept_latency(engine, norm, label[mid], accept_sizes,
                                max(3, args.repeats // 4), Path(tmp))
    print("training ...", flush=True)
    train = []
    for mode in ("baseline", "jras"):
        proc = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--train-only",
                               mode, "--train-steps", str(args.train_steps),
                               "--train-data", str(args.train_data)],
                              capture_output=True, text=True, check=True)
        train.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {mode}: {train[-1]['step_ms']:.0f} ms/step", flush=True)
    result = {
        "provenance": provenance(model_dir=builtin_model_dir(), device=str(engine.device),
                                 train_data=str(args.train_data)),
        "machine": machine(), "device": str(engine.device),
        "command": "python " + " ".join([Path(__file__).relative_to(Path.cwd()).as_posix()
                                         if Path(__file__).is_relative_to(Path.cwd())
                                         else __file__, *sys.argv[1:]]),
        "k": engine.model.config.k, "real_bank_size": int(len(real)),
        "latency": latency, "search": search, "accept": accept, "train": train,
        "train_ratio": train[1]["step_ms"] / train[0]["step_ms"],
    }
    (args.out / "speed.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    print(f"wrote {args.out}/speed.json, speed.md, speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
