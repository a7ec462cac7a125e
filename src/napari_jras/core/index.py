"""FAISS nearest-neighbour search over L2-normalised embeddings (inner product = cosine).

Small sets use an exact flat index; past ``approx_threshold`` vectors an HNSW graph is used.
When FAISS has GPU support (``faiss-gpu``) and sees a GPU, a flat index gets a GPU copy
(``GpuIndexFlatIP``, on the GPU torch uses) that answers searches; the exact GPU search stays
fast far beyond the CPU threshold, so the default threshold is then ``GPU_APPROX_THRESHOLD``.
HNSW graphs have no FAISS GPU implementation and stay on the CPU. ``use_gpu=False`` (or the
environment variable ``NAPARI_JRAS_FAISS_GPU=0``) keeps every index on the CPU.

Ids are arbitrary non-negative int64 values; search results are padded with id ``-1`` and
score ``-inf`` when fewer valid neighbours exist.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from .errors import BankError

log = logging.getLogger(__name__)
DEFAULT_APPROX_THRESHOLD = 50_000
GPU_APPROX_THRESHOLD = 2_000_000  # exact GPU search of 2M x 128-d is ~1 GB and milliseconds
DEFAULT_EF_SEARCH = 128
HNSW_M = 32
GPU_MAX_K = 2048  # FAISS GPU indexes cannot return more neighbours per query
GPU_TEMP_MEMORY = 256 * 1024**2  # FAISS scratch memory per GPU (its default takes ~18 % of it)
# below this many query-vector products one thread is faster: waking FAISS's OpenMP threads
# costs milliseconds when the other cores are busy (napari, torch), the search microseconds
SINGLE_THREAD_WORK = 2_000_000
COMPACT_FRACTION = 0.25  # rebuild an HNSW graph once this fraction of its vectors is removed
GPU_ENV = "NAPARI_JRAS_FAISS_GPU"


def faiss_gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001 - a GPU build without a usable driver raises anything
        return False


def gpu_by_default() -> bool:
    """Whether ``use_gpu=None`` means the GPU: available, and not switched off by the env var."""
    return os.environ.get(GPU_ENV, "1") != "0" and faiss_gpu_available()


@functools.cache
def _gpu_resources(device: int) -> faiss.StandardGpuResources:
    """One FAISS GPU resource object per device and process, with a modest scratch buffer."""
    res = faiss.StandardGpuResources()
    res.setTempMemory(GPU_TEMP_MEMORY)
    return res


def copy_to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of a CPU flat index (``GpuIndexFlatIP``) on the GPU torch uses.

    ``index_cpu_to_gpu`` converts IVF indexes the same way; HNSW has no GPU version.

    Args:
        index: a CPU FAISS index (the inner flat index, not the id map).

    Returns:
        The GPU index, on torch's current CUDA device (device 0 when torch sees no CUDA).
    """
    import torch

    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return faiss.index_cpu_to_gpu(_gpu_resources(device), device, index)


class EmbeddingIndex:
    """Searchable set of (id, embedding) pairs; embeddings are (N, D) float32, L2-normalised.

    The exact ``IndexFlatIP`` is used while the set has fewer than ``approx_threshold`` vectors,
    an HNSW graph (M=32, ``ef_search``) from then on; the default threshold is
    ``DEFAULT_APPROX_THRESHOLD`` on the CPU and ``GPU_APPROX_THRESHOLD`` with a GPU.
    ``use_gpu=None`` searches a flat index on the GPU when available (see
    :func:`gpu_by_default`), ``False`` never, ``True`` requires it.

    Args:
        ids: N unique non-negative integer ids, one per row of ``embeddings``.
        embeddings: (N, D) finite numbers, D >= 1 (stored as float32; not normalised here).
        approx_threshold: size from which an HNSW graph replaces the flat index (>= 1);
            None for the default above.
        ef_search: HNSW search breadth (>= 1): larger is more exact and slower.
        use_gpu: None, False or True, as above.

    Raises:
        BankError: a bad shape, dtype, NaN/inf, ids that are negative, repeated or not one
            per row, thresholds below 1, or ``use_gpu=True`` without FAISS GPU support.
    """

    def __init__(self, ids: Sequence[int] | np.ndarray, embeddings: np.ndarray, *,
                 approx_threshold: int | None = None,
                 ef_search: int = DEFAULT_EF_SEARCH, use_gpu: bool | None = None) -> None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] < 1:
            raise BankError(f"Embeddings must be a 2-D array (N, D), got shape {embeddings.shape}")
        self._configure(embeddings.shape[1], approx_threshold, ef_search, use_gpu)
        vecs = self._check_vectors(embeddings, "embeddings")
        self._attach(self._build(self._check_ids(ids, len(vecs)), vecs))

    def _configure(self, dim: int, approx_threshold: int | None, ef_search: int,
                   use_gpu: bool | None) -> None:
        if use_gpu and not faiss_gpu_available():
            raise BankError("FAISS GPU search was requested but is not available: install "
                            "faiss-gpu and check that a GPU is visible, or use the CPU")
        self._want_gpu = gpu_by_default() if use_gpu is None else bool(use_gpu)
        if approx_threshold is None:
            approx_threshold = GPU_APPROX_THRESHOLD if self._want_gpu else DEFAULT_APPROX_THRESHOLD
        if approx_threshold < 1 or ef_search < 1:
            raise BankError("approx_threshold and ef_search must be at least 1")
        self.dim = int(dim)
        self.approx_threshold = int(approx_threshold)
        self.ef_search = int(ef_search)
        self._removed: set[int] = set()  # HNSW cannot delete: removed ids are filtered out

    # --- properties -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of vectors in the index (removed ones not counted)."""
        return self._cpu.ntotal - len(self._removed)

    @property
    def kind(self) -> str:
        """``"flat"`` (exact) or ``"hnsw"`` (approximate)."""
        return "hnsw" if isinstance(self._inner, faiss.IndexHNSW) else "flat"

    @property
    def on_gpu(self) -> bool:
        """True when searches run on the GPU."""
        return self._gpu is not None

    # --- changes --------------------------------------------------------------------------
    def add(self, ids: Sequence[int] | np.ndarray, embeddings: np.ndarray) -> None:
        """Add vectors under new, unused ids.

        Crossing ``approx_threshold`` rebuilds a flat index as an HNSW graph.

        Args:
            ids: M unique non-negative integer ids not in the index (ids removed before may
                come back).
            embeddings: (M, D) finite numbers, D the index's dimension.

        Raises:
            BankError: a bad shape, dtype, NaN/inf, or an id that is invalid or already in
                the index; the index is unchanged.
        """
        vecs = self._check_vectors(embeddings, "embeddings")
        new_ids = self._check_ids(ids, len(vecs))
        if not new_ids.size:
            return
        if self._removed.intersection(new_ids.tolist()):
            self._compact()  # an id coming back must not meet its old, filtered-out vector
        taken = new_ids[np.isin(new_ids, self._row_ids)]
        if taken.size:
            raise BankError(f"Id {int(taken[0])} is already in the index")
        if self.kind == "flat" and len(self) + len(vecs) >= self.approx_threshold:
            old_ids, old_vecs = self._alive()
            self._attach(self._build(np.concatenate([old_ids, new_ids]),
                                     np.concatenate([old_vecs, vecs])))
            return
        self._cpu.add_with_ids(vecs, new_ids)
        self._row_ids = np.concatenate([self._row_ids, new_ids])
        if self._gpu is not None:
            self._gpu.add(vecs)
        elif self._want_gpu and self.kind == "flat":
            self._attach(self._cpu)  # the first vectors of an empty index: copy it to the GPU

    def remove(self, ids: Iterable[int]) -> None:
        """Remove vectors by id; unknown ids raise :class:`BankError`.

        A flat index drops them at once; an HNSW graph filters them out of searches and is
        rebuilt once more than ``COMPACT_FRACTION`` of its vectors are removed.

        Args:
            ids: ids in the index (repeats are ignored).

        Raises:
            BankError: an id is not in the index (nothing is removed).
        """
        gone = np.unique(np.asarray(list(ids), dtype=np.int64))
        present = np.isin(gone, self._row_ids) & ~np.isin(gone, list(self._removed))
        if not present.all():
            raise BankError(f"Id {int(gone[~present][0])} is not in the index")
        if self.kind == "flat":
            self._cpu.remove_ids(gone)
            self._attach(self._cpu)
            return
        self._removed.update(gone.tolist())
        if len(self._removed) > COMPACT_FRACTION * self._cpu.ntotal:
            self._compact()

    # --- search ---------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[Iterable[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` neighbours of each query: (scores (Q, k) float32, ids (Q, k) int64).

        ``exclude[q]`` lists ids query ``q`` must never get. Rows with fewer than ``k`` valid
        neighbours are padded with id -1 and score -inf.

        Args:
            queries: (Q, D) finite numbers (unit vectors for cosine scores).
            k: neighbours per query, a whole number >= 1.
            exclude: one iterable of ids per query, or None.

        Returns:
            Scores (Q, k) float32 (inner products, best first) and ids (Q, k) int64.

        Raises:
            BankError: a bad ``queries`` shape or value, ``k`` < 1 or not whole, or
                ``exclude`` not of length Q.
        """
        queries = self._check_vectors(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BankError(f"k must be a whole number of at least 1, got {k!r}")
        if exclude is not None and len(exclude) != len(queries):
            raise BankError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        k = int(k)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        total = self._cpu.ntotal
        if total == 0 or len(queries) == 0:
            return scores, ids
        blocked = [np.fromiter(e, dtype=np.int64) for e in exclude] if exclude is not None \
            else [np.empty(0, dtype=np.int64)] * len(queries)
        removed = np.fromiter(self._removed, dtype=np.int64)
        fetch = min(total, k + removed.size + max(b.size for b in blocked))
        pending = np.arange(len(queries))
        while pending.size:
            found_s, found_i = self._raw_search(queries[pending], fetch)
            unfinished = []
            for row, q in enumerate(pending):
                keep = (found_i[row] >= 0) & ~np.isin(found_i[row], removed) \
                    & ~np.isin(found_i[row], blocked[q])
                got = np.flatnonzero(keep)[:k]
                if got.size < k and fetch < total:
                    unfinished.append(q)
                    continue
                scores[q, :got.size] = found_s[row, got]
                ids[q, :got.size] = found_i[row, got]
            pending = np.asarray(unfinished, dtype=np.int64)
            fetch = min(total, 2 * fetch)
        return scores, ids

    def _raw_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._gpu if self._gpu is not None and fetch <= GPU_MAX_K else self._inner
        if index is self._gpu or len(queries) * self._cpu.ntotal > SINGLE_THREAD_WORK:
            scores, rows = index.search(queries, fetch)
        else:
            scores, rows = _single_threaded(index, queries, fetch)
        ids = np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)
        return scores, ids

    # --- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the index (CPU form, with its ids) to ``path`` atomically.

        Removed vectors of an HNSW graph are dropped (the graph is rebuilt) first.

        Raises:
            BankError: the file cannot be written; an existing file at ``path`` is intact.
        """
        path = Path(path)
        if self._removed:
            self._compact()
        tmp = path.with_name(f".{path.name}.partial")
        try:
            faiss.write_index(self._cpu, str(tmp))
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise BankError(f"Cannot write the search index {path}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path, expected_dim: int, *,
             approx_threshold: int | None = None,
             ef_search: int = DEFAULT_EF_SEARCH, use_gpu: bool | None = None) -> EmbeddingIndex:
        """Read an index written by :meth:`save`; a missing, damaged or foreign file raises.

        Args:
            path: the index file.
            expected_dim: embedding dimension the caller's retriever produces.
            approx_threshold: as for the constructor; applies to later additions.
            ef_search: HNSW search breadth, as for the constructor.
            use_gpu: as for the constructor.

        Returns:
            The loaded index (flat or HNSW, as saved).

        Raises:
            BankError: the file is missing, damaged, not a napari-jras (ID-mapped
                inner-product flat or HNSW) index, or holds vectors of another dimension;
                or ``use_gpu=True`` without FAISS GPU support.
        """
        path = Path(path)
        if not path.is_file():
            raise BankError(f"Search index not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise BankError(f"The search index {path} is damaged: rebuild it") from exc
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
        if not isinstance(inner, (faiss.IndexFlat, faiss.IndexHNSWFlat)) \
                or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise BankError(f"{path} is not a napari-jras search index: rebuild it")
        if index.d != expected_dim:
            raise BankError(f"The search index {path} holds {index.d}-d embeddings but "
                            f"{expected_dim}-d are expected: rebuild it")
        loaded = cls.__new__(cls)
        loaded._configure(index.d, approx_threshold, ef_search, use_gpu)
        loaded._attach(index)
        return loaded

    # --- internals ------------------------------------------------------------------------
    def _build(self, ids: np.ndarray, vecs: np.ndarray) -> faiss.IndexIDMap2:
        if len(ids) < self.approx_threshold:
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(vecs, ids)
        return index

    def _attach(self, index: faiss.IndexIDMap2) -> None:
        """Make ``index`` the live index: cache its ids, tune HNSW, copy a flat one to GPU."""
        self._cpu = index
        self._inner = faiss.downcast_index(index.index)
        self._row_ids = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
        self._gpu = None
        if isinstance(self._inner, faiss.IndexHNSW):
            self._inner.hnsw.efSearch = self.ef_search
            if self._want_gpu:
                log.info("HNSW index of %d vectors searched on the CPU (FAISS has no GPU HNSW)",
                         index.ntotal)
        elif self._want_gpu and index.ntotal:
            self._gpu = copy_to_gpu(self._inner)

    def _alive(self) -> tuple[np.ndarray, np.ndarray]:
        vecs = self._inner.reconstruct_n(0, self._cpu.ntotal) if self._cpu.ntotal \
            else np.empty((0, self.dim), dtype=np.float32)
        keep = ~np.isin(self._row_ids, list(self._removed))
        return self._row_ids[keep], vecs[keep]

    def _compact(self) -> None:
        ids, vecs = self._alive()
        self._removed.clear()
        self._attach(self._build(ids, vecs))

    def _check_vectors(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise BankError(f"{name} must have shape (N, {self.dim}), got {x.shape}")
        if x.dtype.kind not in "biuf":
            raise BankError(f"{name} must be numbers, got data type {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise BankError(f"{name} contain NaN or infinite values")
        return x

    @staticmethod
    def _check_ids(ids: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.shape != (n,) or (n and ids.dtype.kind not in "iu"):
            raise BankError(f"Expected {n} integer ids, got an array of shape {ids.shape}")
        ids = ids.astype(np.int64)
        if n and ids.min() < 0:
            raise BankError("Ids must be >= 0 (-1 marks a missing result)")
        if np.unique(ids).size != n:
            raise BankError("Ids must be unique")
        return ids


def _single_threaded(index: faiss.Index, queries: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with one OpenMP thread (restored afterwards)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(threads)
