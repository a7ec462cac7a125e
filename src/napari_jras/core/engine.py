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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .bank import ExemplarBank, Hit
from .checkpoint import load_model
from .data import resize_images, resize_labels
from .device import autocast, select_device
from .errors import BankError, JRASError, ModelError
from .fusion import Guide, align_exemplars, empty_guide, fusion_weights, make_guide
from .io import check_image
from .model import JRASModel
from .normalize import NormalizedSlices, intensity_map
from .prediction import Prediction, RetrievedExemplar
from .progress import CancelFn, Progress, ProgressFn
from .ranges import check_int
from .retrieval import embed_images, retriever_version
from .run_files import BANK_DIR
from .self_guide import SELF_GUIDED_SOURCES, PassCounter, first_pass_memory
from .volume_memory import GUIDE_SOURCES, VolumeMemory

log = logging.getLogger(__name__)
MAX_BATCH_SIZE = 1024  # slices per network pass (predict/evaluate --batch-size)


class EngineWarning(UserWarning):
    """Something the user should know about a prediction (e.g. a fallback to the CPU)."""


class InferenceEngine:
    """Runs a J-RAS (or baseline) model with an exemplar bank on the best available device.

    ``batch_size`` slices of a volume go through the network together. ``amp`` enables mixed
    precision on CUDA; ``channels_last`` (default: on CUDA) stores the network in NHWC order;
    ``compile_model`` runs it through ``torch.compile`` (with a warning and the plain model if
    compilation fails). ``on_warning`` receives user-facing warnings (the GPU fallback) as text;
    without it they are issued as :class:`EngineWarning` with :func:`warnings.warn`.

    Args:
        model: the model (moved to the device and put in eval mode).
        bank: the exemplar bank; required for a J-RAS model, unused by a baseline.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (:func:`~.device.select_device`).
        amp: mixed precision on CUDA.
        batch_size: slices per network pass, 1..:data:`MAX_BATCH_SIZE`.
        channels_last: NHWC memory format; None: on CUDA only.
        compile_model: run the model and retriever through ``torch.compile``.
        on_warning: receives user-facing warnings as text, or None.
        readout_only: predict from the readout fusion's propagated mask alone (a diagnostic).
        readout_trust: weight of the readout's propagated mask for slices guided by accepted
            slices of their own volume (:func:`~.readout.trust_readout`), in [0, 1]; None:
            the model's ``readout_trust``.
        self_guide: a readout model predicts a volume (no annotated slices given) in two
            passes: the second guides each slice by the first pass's prediction of its
            nearest slice plus retrieved exemplars (:meth:`predict`).

    Raises:
        JRASError: ``batch_size`` out of range or ``device`` not available.
        ModelError: ``readout_only`` for a model without the readout fusion.
        BankError: a J-RAS model without a bank, or a bank with other classes or embedding
            size.
    """

    def __init__(self, model: JRASModel, bank: ExemplarBank | None = None,
                 device: str | torch.device = "auto", amp: bool = True, batch_size: int = 16,
                 channels_last: bool | None = None, compile_model: bool = False,
                 on_warning: Callable[[str], None] | None = None, readout_only: bool = False,
                 readout_trust: float | None = None, self_guide: bool = True):
        self.batch_size = check_int(batch_size, "batch_size", 1, MAX_BATCH_SIZE, JRASError)
        kind = (f"this one: fusion {model.config.fusion}, retrieval "
                f"{'on' if model.config.use_retrieval else 'off'}")
        if readout_only and not model.config.uses_readout:
            raise ModelError(f"--readout-only needs a J-RAS model with the readout fusion ({kind})")
        if readout_trust is not None and not model.config.uses_readout:
            raise ModelError("--readout-trust needs a J-RAS model with the readout fusion "
                             f"({kind})")
        self.readout_only = readout_only
        self.self_guide = bool(self_guide)
        self.readout_trust = model.config.readout_trust if readout_trust is None else readout_trust
        self.device = select_device(device)
        self.model = model
        self.amp = amp
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

    @property
    def readout_trust(self) -> float:
        """Weight of the readout's propagated mask for slices guided by accepted slices of
        their own volume (:func:`~.readout.trust_readout`); set it to change it, within [0, 1]."""
        return self._readout_trust

    @readout_trust.setter
    def readout_trust(self, value: float) -> None:
        if isinstance(value, bool) or not (isinstance(value, (int, float))
                                           and 0.0 <= value <= 1.0):
            raise JRASError(f"--readout-trust must be between 0 and 1, got {value!r}")
        self._readout_trust = float(value)

    @classmethod
    def from_run(cls, run_dir: str | Path, bank: str | Path | ExemplarBank | None = None,
                 device: str = "auto", faiss_gpu: bool | None = None,
                 **kwargs: Any) -> InferenceEngine:
        """Load a run folder's model and its bank (``run_dir/bank`` unless ``bank`` is given).

        ``faiss_gpu=False`` keeps the bank's search index on the CPU (``None``: GPU if possible).
        A bank that cannot be written (a read-only folder) is opened read-only.

        Args:
            run_dir: the run folder (:func:`~.checkpoint.load_model`).
            bank: a bank folder or an open bank; None: ``run_dir/bank`` for a J-RAS model.
            device: as for the constructor.
            faiss_gpu: where the bank's search index lives (only for a bank opened here).
            **kwargs: the other constructor options (``batch_size``, ``amp``...).

        Returns:
            The engine.

        Raises:
            ModelError: the run folder cannot be loaded.
            BankError: no bank for a J-RAS model, or the bank cannot be opened or does not
                fit the model.
            JRASError: the other constructor errors.
        """
        run_dir = Path(run_dir)
        model = load_model(run_dir, "cpu")
        if isinstance(bank, (str, Path)):
            bank = ExemplarBank.open(bank, use_gpu=faiss_gpu, read_only=None)
        elif bank is None and model.config.use_retrieval:
            if not (run_dir / BANK_DIR).exists():
                raise BankError(f"{run_dir} has no bank folder; give one with --bank")
            bank = ExemplarBank.open(run_dir / BANK_DIR, use_gpu=faiss_gpu, read_only=None)
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

    def ensure_bank_embeddings(self, progress: ProgressFn | None = None,
                               force: bool = False) -> bool:
        """Embed the bank with the current retriever if needed (always with ``force``, e.g. to
        repair damaged embeddings); True when it was re-embedded.

        Args:
            progress: receives ``embed`` events (exemplars embedded, in chunks of 256).
            force: re-embed even when the stored embeddings match the retriever.

        Returns:
            True when the bank was (re-)embedded; False when it was up to date, or there is
            no bank or retriever.

        Raises:
            BankError: the bank is empty, or it needs embedding and is read-only.
        """
        if self.bank is None or self.model.retriever is None:
            return False
        if len(self.bank) == 0:
            raise BankError("The exemplar bank is empty: add annotated exemplars first")
        if not force and not self.bank.needs_embedding(self.version):
            return False
        if self.bank.read_only:
            raise BankError(
                f"The bank at {self.bank.path} is read-only and must be re-embedded for this "
                "model's retriever: re-embed a writable copy (`napari-jras bank rebuild --bank "
                "COPY --model RUN`) and use that")
        ids, images, _ = self.bank.load_all()
        imgs = torch.from_numpy(resize_images(images, (self.model.config.size,) * 2))
        chunks = []
        for i in range(0, len(ids), 256):
            chunks.append(embed_images(self.model.retriever, imgs[i:i + 256], device=self.device))
            if progress is not None:
                progress(Progress("embed", min(i + 256, len(ids)), len(ids)))
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

    def _search(self, x: torch.Tensor, k: int, exclude_patient: str | None,
                exclude_ids: Sequence[int], timings: dict[str, float]) -> list[list[Hit]]:
        """The bank's ``k`` best exemplars for each query of ``x`` (B,H,W)."""
        t0 = time.perf_counter()
        q = self._run("retriever", x[:, None]).float().cpu().numpy()
        t1 = time.perf_counter()
        hits = self.bank.search(q, k, self.version, exclude_patients=[exclude_patient] * len(q),
                                exclude_ids=[exclude_ids] * len(q) if exclude_ids else None)
        timings["embed"] += t1 - t0
        timings["search"] += time.perf_counter() - t1
        return hits

    def _random_hits(self, n: int, exclude_patient: str | None, exclude_ids: Sequence[int],
                     seed: int) -> list[list[Hit]]:
        """``k`` exemplars drawn at random (never of ``exclude_patient``) for each of ``n`` slices."""
        skip = set(exclude_ids)
        records = [r for r in self.bank.records()
                   if r.get("patient_id") != exclude_patient and r["id"] not in skip]
        if not records:
            raise BankError("No exemplar could be drawn (every exemplar is excluded or the bank "
                            "is empty)")
        rng = np.random.default_rng(seed)
        k = min(self.model.config.k, len(records))
        return [[Hit(int(records[j]["id"]), 0.0, records[j])
                 for j in rng.choice(len(records), k, replace=False)] for _ in range(n)]

    def _guide(self, x: torch.Tensor, vol: Any, batch: list[int], exclude_patient: str | None,
               exclude_ids: Sequence[int], source: str, memory: VolumeMemory | None,
               timings: dict[str, float]) -> tuple[Guide | None, list[list[RetrievedExemplar]]]:
        """The guide of slices ``batch`` (network input ``x``, (B,H,W)) and what the gallery shows.

        Slots are filled in order: the volume's annotated slices (``memory``), then retrieved
        (or, for the ``random`` diagnostic, random) exemplars up to K; ``none`` gives no
        exemplar. Fusion weights are ``softmax(score / tau)`` over the filled slots. A readout
        model's guide carries ``readout_trust``: ``self.readout_trust`` times the fusion weight
        of the annotated (not predicted) same-volume slots, each times its memory score.
        """
        cfg = self.model.config
        t0 = time.perf_counter()
        size = (cfg.size, cfg.size)
        rows: list[list[tuple[float, torch.Tensor, torch.Tensor, RetrievedExemplar]]] = []
        in_memory: list[set[int]] = []  # slices of this volume already in each row's memory
        trusted: list[list[float]] = []  # per row, the memory score of each annotated slot
        for z in batch:
            row = []
            nearest = memory.nearest(z) if memory is not None else []
            in_memory.append({s for s, _ in nearest})
            trusted.append([0.0 if s in memory.predicted else score for s, score in nearest])
            for s, score in nearest:
                image = torch.from_numpy(resize_images(vol[[s]], size)[0])
                mask = torch.from_numpy(resize_labels(
                    np.asarray(memory.labels[s])[None], size)[0].astype(np.int64))
                record = {**memory.records.get(s, {}), "origin": memory.origin,
                          "slice_index": s, "dz": s - z}
                if s in memory.predicted:
                    record["predicted"] = True
                row.append((score, image, mask, RetrievedExemplar(
                    -1, score, 0.0, record, image.numpy(), mask.numpy().astype(np.uint8))))
            rows.append(row)
        wanted = [0 if source == "none" or (memory is not None and memory.only)
                  else max(0, cfg.k - len(row)) for row in rows]
        hits: list[list[Hit]] = [[] for _ in batch]
        searched = timings["embed"] + timings["search"]
        if max(wanted) > 0 and source == "random":
            hits = self._random_hits(len(batch), exclude_patient, exclude_ids, seed=batch[0])
        elif max(wanted) > 0:
            own = memory.case_id if memory is not None else None
            hits = self._search(x, max(wanted) + (memory.slots if own else 0), exclude_patient,
                                exclude_ids, timings)
            if own:  # no second copy of a memory slice (the bank holds it as a correction)
                hits = [[h for h in found if h.record.get("case_id") != own
                         or h.record.get("slice_index") not in used]
                        for found, used in zip(hits, in_memory, strict=True)]
            if any(len(h) == 0 and not r for h, r in zip(hits, rows, strict=True)):
                raise BankError("No exemplar could be retrieved (every exemplar is excluded or "
                                "the bank is empty)")
        searched = timings["embed"] + timings["search"] - searched
        for row, found, n in zip(rows, hits, wanted, strict=True):
            found = found[:n]
            if found:
                images, masks = self._exemplar_tensors([h.id for h in found])
                for h, image, mask in zip(found, images, masks, strict=True):
                    row.append((h.score, image, mask, RetrievedExemplar(
                        h.id, h.score, 0.0, dict(h.record), image.numpy(),
                        mask.numpy().astype(np.uint8))))
        k = max(len(r) for r in rows)
        if k == 0:
            return None, [[] for _ in batch]
        scores = torch.full((len(batch), k), -torch.inf)
        images = torch.zeros((len(batch), k, *size))
        masks = torch.zeros((len(batch), k, *size), dtype=torch.long)
        for i, row in enumerate(rows):
            for j, (score, image, mask, _) in enumerate(row):
                scores[i, j], images[i, j], masks[i, j] = score, image, mask
        if source == "random":
            scores = torch.where(torch.isfinite(scores), torch.zeros_like(scores), scores)
        present = torch.isfinite(scores)
        weights = torch.zeros_like(scores)
        filled = present.any(1)
        weights[filled] = fusion_weights(scores[filled], cfg.tau)
        images, masks = images.to(self.device), masks.to(self.device)
        images, masks = align_exemplars(x, images, masks, cfg.max_shift)
        guide = make_guide(images, masks, weights.to(self.device), scores,
                           torch.zeros(scores.shape, dtype=torch.long), cfg.num_classes)
        if cfg.uses_readout and self.readout_trust > 0:
            accepted = torch.zeros_like(scores)
            for i, row_scores in enumerate(trusted):  # memory slots come first in each row
                accepted[i, :len(row_scores)] = torch.tensor(row_scores)
            guide.readout_trust = (self.readout_trust * (weights * accepted).sum(1)).to(self.device)
        shown = []
        for i, row in enumerate(rows):
            shown.append([replace(item, weight=float(weights[i, j]))
                          for j, (_, _, _, item) in enumerate(row)])
        timings["fusion"] += time.perf_counter() - t0 - searched
        return guide, shown

    @torch.inference_mode()
    def predict(self, image: np.ndarray, modality: str | None = None,
                slices: Sequence[int] | None = None, exclude_patient: str | None = None,
                exclude_ids: Sequence[int] = (), return_probabilities: bool = False,
                progress: ProgressFn | None = None,
                cancel: CancelFn | None = None, guide_source: str = "retrieved",
                memory: VolumeMemory | None = None) -> Prediction:
        """Segment ``image`` (2-D, or 3-D Z-first); ``slices`` limits which Z slices are predicted.

        ``exclude_patient`` keeps exemplars of that patient out of retrieval (evaluation without
        leakage); ``exclude_ids`` keeps single exemplars out (e.g. near-duplicates of the image).
        ``memory`` holds annotated slices of this same volume, which take the first exemplar
        slots of the other slices (see :mod:`.volume_memory`); ``guide_source`` is
        ``retrieved`` (the default), or ``none`` / ``random`` for diagnostics.
        **Self-guidance** (``self_guide``, on by default): a readout model given a volume and
        no ``memory`` predicts in two passes. The first predicts the slices and their
        neighbours z +- 1 with retrieved exemplars; the second predicts the slices again,
        each guided by the first pass's label map of its nearest slice (a predicted memory
        slice, :data:`~.volume_memory.PREDICTED_PENALTY` weaker, never trusted) plus K - 1
        retrieved exemplars, so the network reads the volume's own anatomy as it reads an
        annotator's accepted slice. The exemplars shown are the second pass's.
        Raises :class:`JRASError` subclasses with clear messages for bad input.
        A GPU out-of-memory error halves ``batch_size`` (kept for later calls) and retries; at
        one slice the engine moves to the CPU with a warning (see ``on_warning``).

        Args:
            image: the raw image, ``(H, W)`` or ``(Z, H, W)``, any real dtype; it is scaled
                slice batch by slice batch, never copied whole.
            modality: intensity scaling (``auto``, ``mri``, ``ct``, ``us``); None: the
                model's.
            slices: the Z indices to predict; None: all (a 2-D image has the one slice 0).
            exclude_patient: patient id whose exemplars are never retrieved, or None.
            exclude_ids: bank exemplar ids never retrieved.
            return_probabilities: also return the class probabilities.
            progress: receives a ``predict`` event per batch (slices done of all).
            cancel: polled before each batch; True stops the prediction.
            guide_source: one of ``GUIDE_SOURCES``; ``neighbour`` and ``oracle`` take their
                exemplars from ``memory`` alone (:func:`~.volume_memory.diagnostic_memory`).
            memory: annotated slices of this volume, or None.

        Returns:
            The :class:`Prediction`, arrays at the shape of ``image``.

        Raises:
            DataError: the image fails :func:`~.io.check_image`.
            JRASError: a slice or memory slice out of range, an unknown ``guide_source``, the
                prediction was cancelled, or out of memory on the CPU for one slice.
            BankError: the bank cannot be embedded, or no exemplar can be retrieved.
        """
        data = check_image(image)
        cfg = self.model.config
        # normalised batch by batch: no float32 copy of the whole volume (bounded memory)
        vol = NormalizedSlices(data, intensity_map(data, modality or cfg.modality))
        z_all = list(range(vol.shape[0])) if slices is None else [int(z) for z in slices]
        bad = [z for z in z_all if not 0 <= z < vol.shape[0]]
        if bad:
            raise JRASError(f"Slice {bad[0]} is out of range (the image has {vol.shape[0]} slices)")
        if guide_source not in GUIDE_SOURCES:
            raise JRASError(f"guide source must be one of {', '.join(GUIDE_SOURCES)}, got "
                            f"{guide_source!r}")
        if memory is not None:
            outside = [s for s in memory.labels if not 0 <= s < vol.shape[0]]
            if outside:
                raise JRASError(f"Annotated slice {outside[0]} is out of range (the image has "
                                f"{vol.shape[0]} slices)")
        if cfg.use_retrieval:
            self.ensure_bank_embeddings()
        labels = np.zeros(vol.shape, dtype=np.uint8)
        probs = (np.zeros((cfg.num_classes, *vol.shape), dtype=np.float16)
                 if return_probabilities else None)
        result = Prediction(labels, z_all, probabilities=probs)
        timings = {"embed": 0.0, "search": 0.0, "fusion": 0.0, "network": 0.0}
        count = PassCounter(len(z_all), progress, cancel)
        if self.self_guides(vol.shape[0], memory, guide_source):
            first_z = sorted({n for z in z_all for n in (z - 1, z, z + 1)
                              if 0 <= n < vol.shape[0]})
            first = Prediction(np.zeros(vol.shape, dtype=np.uint8), first_z)
            count.total += len(first_z)
            self._run_pass(vol, first_z, exclude_patient, exclude_ids, first, timings,
                           guide_source, None, count)
            memory = first_pass_memory(first)
        self._run_pass(vol, z_all, exclude_patient, exclude_ids, result, timings, guide_source,
                       memory, count)
        result.timings = timings
        result.labels = labels if data.ndim == 3 else labels[0]
        if probs is not None:
            result.probabilities = probs if data.ndim == 3 else probs[:, 0]
        return result

    def self_guides(self, depth: int, memory: VolumeMemory | None, guide_source: str) -> bool:
        """Whether :meth:`predict` runs the self-guided second pass (see there)."""
        return (self.self_guide and self.model.config.uses_readout and not self.readout_only
                and memory is None and depth > 1 and guide_source in SELF_GUIDED_SOURCES)

    def _run_pass(self, vol: np.ndarray, z_list: list[int], exclude_patient: str | None,
                  exclude_ids: Sequence[int], result: Prediction, timings: dict[str, float],
                  guide_source: str, memory: VolumeMemory | None, count: PassCounter) -> None:
        """Predict slices ``z_list`` into ``result``, batch by batch (see :meth:`predict`)."""
        start = 0
        while start < len(z_list):
            count.check_cancel()
            batch = z_list[start:start + self.batch_size]
            try:
                self._predict_batch(vol, batch, exclude_patient, exclude_ids, result, timings,
                                    guide_source, memory)
                out_of_memory = False
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True  # recover outside the handler, once its tensors are freed
            if out_of_memory:
                self._recover_from_oom(len(batch))
                continue
            start += len(batch)
            count.advance(len(batch))

    def _predict_batch(self, vol: np.ndarray, batch: list[int], exclude_patient: str | None,
                       exclude_ids: Sequence[int], result: Prediction,
                       timings: dict[str, float], guide_source: str,
                       memory: VolumeMemory | None) -> None:
        cfg = self.model.config
        size = (cfg.size, cfg.size)
        x = torch.from_numpy(resize_images(vol[batch], size)).to(self.device)
        with autocast(self.device, self.amp):
            guide = None
            if cfg.use_retrieval:
                guide, shown = self._guide(x, vol, batch, exclude_patient, exclude_ids,
                                           guide_source, memory, timings)
                result.exemplars.update(zip(batch, shown, strict=True))
                if guide is None and not cfg.uses_readout:  # concat: an all-zero guide
                    guide = empty_guide(len(batch), size, cfg.num_classes, self.device)
            t0 = time.perf_counter()
            if self.readout_only:
                p = self._readout_probabilities(x[:, None], guide, vol.shape[-2:])
            else:
                logits = self._run("model", x[:, None], guide).float()
                logits = F.interpolate(logits, size=vol.shape[-2:], mode="bilinear",
                                       align_corners=False)
                p = logits.softmax(1)
            result.labels[batch] = p.argmax(1).to(torch.uint8).cpu().numpy()
            if result.probabilities is not None:
                result.probabilities[:, batch] = p.permute(1, 0, 2, 3).cpu().numpy().astype(np.float16)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            timings["network"] += time.perf_counter() - t0

    def _readout_probabilities(self, query: torch.Tensor, guide: Guide | None,
                               size: tuple[int, int]) -> torch.Tensor:
        """The readout's propagated mask alone (a diagnostic): class probabilities at ``size``.

        A slice without exemplars gets probability 1 for the background.
        """
        _, p_read = self.model.forward_readout(query, guide)
        if p_read is None:  # no exemplar in the batch
            p_read = query.new_zeros(query.shape[0], self.model.config.num_classes, 1, 1)
        p_read = p_read.float()  # the model's own output: safe to change in place
        p_read[:, 0] += (p_read.sum(1) <= 0).float()  # no exemplar: background
        return F.interpolate(p_read, size=size, mode="bilinear", align_corners=False)


def load_engine(run_dir: str | Path, bank: str | Path | None = None, device: str = "auto",
                **kwargs: Any) -> InferenceEngine:
    """Convenience wrapper around :meth:`InferenceEngine.from_run` with friendly errors.

    Raises:
        ModelError: as :meth:`InferenceEngine.from_run`, and for an :class:`OSError` while
            loading.
        BankError: as :meth:`InferenceEngine.from_run`.
    """
    try:
        return InferenceEngine.from_run(run_dir, bank=bank, device=device, **kwargs)
    except (ModelError, BankError):
        raise
    except OSError as exc:
        raise ModelError(f"Cannot load the model in {run_dir}: {exc}") from exc
