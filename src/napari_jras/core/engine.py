"""Inference engine: device choice, AMP, batched slices, bank search with an embedding cache.

``InferenceEngine.predict`` takes a raw 2-D image or 3-D volume (Z first) and returns the label
map at the input size, optional per-class probabilities, and for every predicted slice the
retrieved exemplars (ids, images, masks, similarity, fusion weight, provenance) for display.

On CUDA the engine runs under AMP (bf16 where the GPU supports it, else fp16) with the model in
channels-last memory format, optionally through ``torch.compile``. A GPU out-of-memory error
halves the slice batch and retries, and below one slice moves the engine to the CPU.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .bank import ExemplarBank
from .checkpoint import load_model
from .data import resize_images, resize_labels
from .device import autocast, select_device
from .errors import BankError, JRASError, ModelError
from .fusion import Guide, align_exemplars, combine, fusion_weights
from .io import check_image
from .model import JRASModel
from .normalize import NormalizedSlices, intensity_map
from .retrieval import embed_images, retriever_version

log = logging.getLogger(__name__)
BANK_DIR = "bank"


@dataclass
class RetrievedExemplar:
    """One exemplar used for a slice: what the gallery shows."""

    id: int
    score: float
    weight: float
    record: dict[str, Any]
    image: np.ndarray
    mask: np.ndarray


@dataclass
class Prediction:
    """Result of :meth:`InferenceEngine.predict` (arrays at the input's shape)."""

    labels: np.ndarray
    slices: list[int]
    exemplars: dict[int, list[RetrievedExemplar]] = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


class EngineWarning(UserWarning):
    """Something the user should know about a prediction (e.g. a fallback to the CPU)."""


class InferenceEngine:
    """Runs a J-RAS (or baseline) model with an exemplar bank on the best available device.

    ``batch_size`` slices of a volume go through the network together. ``amp`` enables mixed
    precision on CUDA; ``channels_last`` (default: on CUDA) stores the network in NHWC order;
    ``compile_model`` runs it through ``torch.compile`` (with a warning and the plain model if
    compilation fails). ``on_warning`` receives user-facing warnings (the GPU fallback) as text;
    without it they are issued as :class:`EngineWarning` with :func:`warnings.warn`.
    """

    def __init__(self, model: JRASModel, bank: ExemplarBank | None = None,
                 device: str | torch.device = "auto", amp: bool = True, batch_size: int = 16,
                 channels_last: bool | None = None, compile_model: bool = False,
                 on_warning: Callable[[str], None] | None = None):
        self.device = select_device(device)
        self.model = model
        self.amp = amp
        self.batch_size = max(1, int(batch_size))
        self.channels_last = channels_last
        self.compile_model = compile_model
        self.on_warning = on_warning
        self._compiled: dict[str, Callable[..., torch.Tensor]] = {}
        self._place_model()
        self.bank = bank
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.version = retriever_version(model.retriever) if model.retriever is not None else None
        if model.config.use_retrieval:
            if bank is None:
                raise BankError("This J-RAS model needs an exemplar bank (none was given or found)")
            self._check_bank(bank)

    @classmethod
    def from_run(cls, run_dir: str | Path, bank: str | Path | ExemplarBank | None = None,
                 device: str = "auto", faiss_gpu: bool | None = None,
                 **kwargs: Any) -> InferenceEngine:
        """Load a run folder's model and its bank (``run_dir/bank`` unless ``bank`` is given).

        ``faiss_gpu=False`` keeps the bank's search index on the CPU (``None``: GPU if possible).
        """
        run_dir = Path(run_dir)
        model = load_model(run_dir, "cpu")
        if isinstance(bank, (str, Path)):
            bank = ExemplarBank.open(bank, use_gpu=faiss_gpu)
        elif bank is None and model.config.use_retrieval:
            if not (run_dir / BANK_DIR).exists():
                raise BankError(f"{run_dir} has no bank folder; give one with --bank")
            bank = ExemplarBank.open(run_dir / BANK_DIR, use_gpu=faiss_gpu)
        return cls(model, bank, device=device, **kwargs)

    # --- device placement, compilation, warnings -------------------------------------------
    def _place_model(self) -> None:
        """Move the model to ``self.device`` in the right memory format; (re)compile it."""
        nhwc = self.device.type == "cuda" if self.channels_last is None else self.channels_last
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        self.model = self.model.to(self.device, memory_format=fmt).eval()
        self._compiled = {}
        if self.compile_model:
            self._compiled["model"] = torch.compile(self.model)
            if self.model.retriever is not None:
                self._compiled["retriever"] = torch.compile(self.model.retriever)

    def _warn(self, message: str) -> None:
        log.warning(message)
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            warnings.warn(message, EngineWarning, stacklevel=3)

    def _run(self, name: str, *args: Any) -> torch.Tensor:
        """Call the compiled ``model`` or ``retriever`` when there is one, else the plain one."""
        eager = self.model if name == "model" else self.model.retriever
        compiled = self._compiled.get(name)
        if compiled is not None:
            try:
                return compiled(*args)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - compiler failures come in many types
                self._compiled = {}
                self._warn(f"torch.compile failed ({type(exc).__name__}: {exc}); "
                           "running the model uncompiled")
        return eager(*args)

    def _recover_from_oom(self, failed: int) -> None:
        """After a GPU out-of-memory error on ``failed`` slices: halve the batch, or at one slice
        move to the CPU."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if failed > 1:
            self.batch_size = max(1, min(self.batch_size, failed) // 2)
            log.warning("GPU out of memory: retrying with batch size %d", self.batch_size)
            return
        if self.device.type == "cpu":
            raise JRASError("Out of memory on the CPU even for one slice: free some memory "
                            "or use a smaller model size")
        self._warn(f"The GPU ({self.device}) ran out of memory even for one slice: "
                   "continuing on the CPU, which is slower")
        self.device = torch.device("cpu")
        self.compile_model = False  # compiling for the CPU would take longer than it saves
        self._place_model()

    def _check_bank(self, bank: ExemplarBank) -> None:
        cfg = self.model.config
        if bank.num_classes != cfg.num_classes:
            raise BankError(f"The bank has {bank.num_classes} classes but the model has "
                            f"{cfg.num_classes}: use a bank built for this model")
        if bank.embed_dim != self.model.retriever.embed_dim:
            raise BankError(f"The bank stores {bank.embed_dim}-d embeddings but the retriever "
                            f"makes {self.model.retriever.embed_dim}-d ones")

    def set_bank(self, bank: ExemplarBank) -> None:
        """Use another bank from now on."""
        self._check_bank(bank)
        self.bank = bank
        self._cache.clear()

    def set_model(self, model: JRASModel) -> None:
        """Swap in new weights (e.g. after fine-tuning); the bank is re-embedded on next use."""
        self.model = model
        self._place_model()
        self.version = retriever_version(model.retriever) if model.retriever is not None else None
        self._cache.clear()

    def ensure_bank_embeddings(self, progress: Callable[[int, int], None] | None = None) -> bool:
        """Embed the bank with the current retriever if needed; True when it was re-embedded."""
        if self.bank is None or self.model.retriever is None:
            return False
        if len(self.bank) == 0:
            raise BankError("The exemplar bank is empty: add annotated exemplars first")
        if not self.bank.needs_embedding(self.version):
            return False
        ids, images, _ = self.bank.load_all()
        imgs = torch.from_numpy(resize_images(images, (self.model.config.size,) * 2))
        chunks = []
        for i in range(0, len(ids), 256):
            chunks.append(embed_images(self.model.retriever, imgs[i:i + 256], device=self.device))
            if progress is not None:
                progress(min(i + 256, len(ids)), len(ids))
        self.bank.set_embeddings(ids, torch.cat(chunks).numpy(), self.version)
        return True

    def embed_for_bank(self, images: np.ndarray) -> np.ndarray | None:
        """Embeddings of normalised (N,H,W) images for adding them to the bank (None for baselines)."""
        if self.model.retriever is None:
            return None
        size = self.model.config.size
        t = torch.from_numpy(resize_images(np.asarray(images, np.float32), (size, size)))
        return embed_images(self.model.retriever, t, device=self.device).numpy()

    def _exemplar_tensors(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [i for i in ids if i not in self._cache]
        if missing:
            size = (self.model.config.size,) * 2
            imgs = resize_images(self.bank.images(missing), size)
            masks = resize_labels(self.bank.masks(missing), size)
            for j, i in enumerate(missing):
                self._cache[i] = (torch.from_numpy(imgs[j]), torch.from_numpy(masks[j].astype(np.int64)))
        images = torch.stack([self._cache[i][0] for i in ids])
        masks = torch.stack([self._cache[i][1] for i in ids])
        return images, masks

    def _retrieve(self, x: torch.Tensor, exclude_patient: str | None,
                  exclude_ids: Sequence[int] = ()
                  ) -> tuple[Guide, list[list[Any]], dict[str, float]]:
        cfg = self.model.config
        t0 = time.perf_counter()
        q = self._run("retriever", x[:, None]).float().cpu().numpy()
        t1 = time.perf_counter()
        hits = self.bank.search(q, cfg.k, self.version,
                                exclude_patients=[exclude_patient] * len(q),
                                exclude_ids=[exclude_ids] * len(q) if exclude_ids else None)
        t2 = time.perf_counter()
        if any(len(h) == 0 for h in hits):
            raise BankError("No exemplar could be retrieved (every exemplar is excluded or the "
                            "bank is empty)")
        k = max(len(h) for h in hits)
        ids = [[h[min(j, len(h) - 1)].id for j in range(k)] for h in hits]
        scores = torch.tensor([[h[j].score if j < len(h) else -np.inf for j in range(k)]
                               for h in hits], dtype=torch.float32)
        flat = [i for row in ids for i in row]
        images, masks = self._exemplar_tensors(flat)
        images = images.view(len(hits), k, *images.shape[-2:]).to(self.device)
        masks = masks.view(len(hits), k, *masks.shape[-2:]).to(self.device)
        images, masks = align_exemplars(x, images, masks, cfg.max_shift)
        weights = fusion_weights(scores, cfg.tau).to(self.device)
        guide_image, guide_mask = combine(weights, images, masks, cfg.num_classes)
        t3 = time.perf_counter()
        guide = Guide(guide_image, guide_mask, weights, scores, torch.tensor(ids))
        return guide, hits, {"embed": t1 - t0, "search": t2 - t1, "fusion": t3 - t2}

    @torch.inference_mode()
    def predict(self, image: np.ndarray, modality: str | None = None,
                slices: Sequence[int] | None = None, exclude_patient: str | None = None,
                exclude_ids: Sequence[int] = (), return_probabilities: bool = False,
                progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> Prediction:
        """Segment ``image`` (2-D, or 3-D Z-first); ``slices`` limits which Z slices are predicted.

        ``exclude_patient`` keeps exemplars of that patient out of retrieval (evaluation without
        leakage); ``exclude_ids`` keeps single exemplars out (e.g. near-duplicates of the image).
        Raises :class:`JRASError` subclasses with clear messages for bad input.
        A GPU out-of-memory error halves ``batch_size`` (kept for later calls) and retries; at
        one slice the engine moves to the CPU with a warning (see ``on_warning``).
        """
        data = check_image(image)
        cfg = self.model.config
        # normalised batch by batch: no float32 copy of the whole volume (bounded memory)
        vol = NormalizedSlices(data, intensity_map(data, modality or cfg.modality))
        z_all = list(range(vol.shape[0])) if slices is None else [int(z) for z in slices]
        bad = [z for z in z_all if not 0 <= z < vol.shape[0]]
        if bad:
            raise JRASError(f"Slice {bad[0]} is out of range (the image has {vol.shape[0]} slices)")
        if cfg.use_retrieval:
            self.ensure_bank_embeddings()
        labels = np.zeros(vol.shape, dtype=np.uint8)
        probs = (np.zeros((cfg.num_classes, *vol.shape), dtype=np.float16)
                 if return_probabilities else None)
        result = Prediction(labels, z_all, probabilities=probs)
        timings = {"embed": 0.0, "search": 0.0, "fusion": 0.0, "network": 0.0}
        start = 0
        while start < len(z_all):
            if cancel is not None and cancel():
                raise JRASError("Prediction cancelled")
            batch = z_all[start:start + self.batch_size]
            try:
                self._predict_batch(vol, batch, exclude_patient, exclude_ids, result, timings)
                out_of_memory = False
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True  # recover outside the handler, once its tensors are freed
            if out_of_memory:
                self._recover_from_oom(len(batch))
                continue
            start += len(batch)
            if progress is not None:
                progress(start, len(z_all))
        result.timings = timings
        result.labels = labels if data.ndim == 3 else labels[0]
        if probs is not None:
            result.probabilities = probs if data.ndim == 3 else probs[:, 0]
        return result

    def _predict_batch(self, vol: np.ndarray, batch: list[int], exclude_patient: str | None,
                       exclude_ids: Sequence[int], result: Prediction,
                       timings: dict[str, float]) -> None:
        cfg = self.model.config
        size = (cfg.size, cfg.size)
        x = torch.from_numpy(resize_images(vol[batch], size)).to(self.device)
        with autocast(self.device, self.amp):
            guide = None
            if cfg.use_retrieval:
                guide, hits, t = self._retrieve(x, exclude_patient, exclude_ids)
                for key, value in t.items():
                    timings[key] += value
            t0 = time.perf_counter()
            logits = self._run("model", x[:, None], guide).float()
            logits = F.interpolate(logits, size=vol.shape[-2:], mode="bilinear", align_corners=False)
            p = logits.softmax(1)
            result.labels[batch] = p.argmax(1).to(torch.uint8).cpu().numpy()
            if result.probabilities is not None:
                result.probabilities[:, batch] = p.permute(1, 0, 2, 3).cpu().numpy().astype(np.float16)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            timings["network"] += time.perf_counter() - t0
        if guide is not None:
            weights = guide.weights.float().cpu().numpy()
            for row, z in enumerate(batch):
                items = []
                for j, hit in enumerate(hits[row]):
                    img, mask = self._cache[hit.id]
                    items.append(RetrievedExemplar(hit.id, float(hit.score), float(weights[row, j]),
                                                   dict(hit.record), img.numpy(), mask.numpy().astype(np.uint8)))
                result.exemplars[z] = items


def load_engine(run_dir: str | Path, bank: str | Path | None = None, device: str = "auto",
                **kwargs: Any) -> InferenceEngine:
    """Convenience wrapper around :meth:`InferenceEngine.from_run` with friendly errors."""
    try:
        return InferenceEngine.from_run(run_dir, bank=bank, device=device, **kwargs)
    except (ModelError, BankError):
        raise
    except OSError as exc:
        raise ModelError(f"Cannot load the model in {run_dir}: {exc}") from exc
