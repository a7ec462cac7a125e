"""EmbeddingIndex: exact and approximate search, exclusion, padding, persistence, validation."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import napari_jras.core.index as index_module
from napari_jras.core.errors import BankError
from napari_jras.core.index import EmbeddingIndex, faiss_gpu_available


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    sims = q @ x.T
    order = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


def test_gpu_probe_is_a_bool():
    assert isinstance(faiss_gpu_available(), bool)


def test_exact_search_equals_brute_force():
    x, ids = unit(500, 16), np.arange(500, dtype=np.int64) * 7 + 3
    q = unit(20, 16, seed=1)
    index = EmbeddingIndex(ids, x, use_gpu=False)
    scores, found = index.search(q, 5)
    ref_scores, ref_ids = brute_force(x, ids, q, 5)
    assert index.kind == "flat" and len(index) == 500 and not index.on_gpu
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert scores.dtype == np.float32 and found.dtype == np.int64


def test_exclusion_never_returns_excluded_ids():
    x, ids = unit(100, 8), np.arange(100, 200)
    q = x[[3, 4]]  # each query is itself a stored vector: its own id is the nearest
    _, ref = brute_force(x, ids, q, 5)
    assert ref[0, 0] == 103 and ref[1, 0] == 104
    exclude = [{int(ref[0, 0]), int(ref[0, 1])}, {int(ref[1, 0])}]
    _, found = EmbeddingIndex(ids, x).search(q, 3, exclude=exclude)
    np.testing.assert_array_equal(found[0], ref[0, 2:5])
    np.testing.assert_array_equal(found[1], ref[1, 1:4])


def test_pads_when_fewer_valid_neighbours():
    x, ids = unit(5, 4), np.arange(5)
    scores, found = EmbeddingIndex(ids, x).search(x[:1], 8, exclude=[{0, 1}])
    assert sorted(found[0, :3]) == [2, 3, 4]
    assert (found[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()


def test_empty_index_returns_padding():
    index = EmbeddingIndex(np.empty(0, np.int64), np.empty((0, 4), np.float32))
    scores, found = index.search(unit(2, 4), 3)
    assert len(index) == 0 and (found == -1).all() and np.isneginf(scores).all()


def test_approximate_index_recall():
    x, ids = unit(20_000, 64), np.arange(20_000)
    q = unit(200, 64, seed=1)
    index = EmbeddingIndex(ids, x, approx_threshold=1_000)
    assert index.kind == "hnsw"
    _, found = index.search(q, 10)
    _, ref = brute_force(x, ids, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, ref, strict=True)])
    assert recall >= 0.95
    _, excluded = index.search(q[:5], 10, exclude=[set(r[:5].tolist()) for r in ref[:5]])
    assert all(not set(e) & set(r[:5]) for e, r in zip(excluded, ref[:5], strict=True))


def test_add_and_remove_flat():
    x = unit(51, 8)
    index = EmbeddingIndex(np.arange(50), x[:50])
    index.add([1000], x[50:])
    assert len(index) == 51 and index.search(x[50:], 1)[1][0, 0] == 1000
    index.remove([1000, 7])
    _, found = index.search(x[[50, 7]], 3)
    assert len(index) == 49 and not {1000, 7} & set(found.ravel())
    with pytest.raises(BankError, match="not in the index"):
        index.remove([7])
    with pytest.raises(BankError, match="already in the index"):
        index.add([3], x[:1])


def test_add_and_remove_hnsw():
    x = unit(300, 8)
    index = EmbeddingIndex(np.arange(200), x[:200], approx_threshold=100)
    assert index.kind == "hnsw"
    index.remove([5, 6])
    _, found = index.search(x[[5, 6]], 5)
    assert len(index) == 198 and not {5, 6} & set(found.ravel())
    index.add([5], x[5:6])  # an id that comes back gets its new vector only
    assert index.search(x[5:6], 1)[1][0, 0] == 5 and len(index) == 199
    index.remove(range(100, 200))  # large removals compact the graph
    assert len(index) == 99 and index.kind == "flat"


def test_flat_becomes_hnsw_past_threshold():
    x = unit(120, 8)
    index = EmbeddingIndex(np.arange(60), x[:60], approx_threshold=100)
    index.add(np.arange(60, 120), x[60:])
    assert index.kind == "hnsw" and len(index) == 120
    assert index.search(x[100:101], 1)[1][0, 0] == 100


@pytest.mark.parametrize("threshold", [50_000, 100])
def test_save_load_round_trip(tmp_path, threshold):
    x, ids = unit(300, 16), np.arange(300) + 10
    index = EmbeddingIndex(ids, x, approx_threshold=threshold)
    index.remove([10])
    index.save(tmp_path / "index.faiss")
    loaded = EmbeddingIndex.load(tmp_path / "index.faiss", expected_dim=16)
    q = unit(10, 16, seed=2)
    assert loaded.kind == index.kind and len(loaded) == 299
    np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    with pytest.raises(BankError, match="64-d are expected"):
        EmbeddingIndex.load(tmp_path / "index.faiss", expected_dim=64)


def test_damaged_or_foreign_file_raises(tmp_path):
    file = tmp_path / "index.faiss"
    EmbeddingIndex(np.arange(50), unit(50, 8)).save(file)
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(BankError, match="damaged"):
        EmbeddingIndex.load(file, 8)
    faiss.write_index(faiss.IndexFlatL2(8), str(file))
    with pytest.raises(BankError, match="not a napari-jras search index"):
        EmbeddingIndex.load(file, 8)
    with pytest.raises(BankError, match="not found"):
        EmbeddingIndex.load(tmp_path / "missing.faiss", 8)


def test_invalid_inputs_raise_bank_error():
    x = unit(10, 8)
    index = EmbeddingIndex(np.arange(10), x)
    bad_queries = [unit(2, 4), x[0], np.full((1, 8), np.nan, np.float32)]
    for queries in bad_queries:
        with pytest.raises(BankError):
            index.search(queries, 2)
    for k in (0, -1, 1.5):
        with pytest.raises(BankError, match="k must be"):
            index.search(x[:1], k)
    with pytest.raises(BankError, match="exclude has"):
        index.search(x[:2], 2, exclude=[set()])
    with pytest.raises(BankError, match="unique"):
        EmbeddingIndex([1, 1], x[:2])
    with pytest.raises(BankError, match=">= 0"):
        EmbeddingIndex([-1, 2], x[:2])
    with pytest.raises(BankError, match="NaN"):
        EmbeddingIndex([0], np.full((1, 8), np.inf, np.float32))


def test_gpu_bookkeeping_with_a_stand_in_gpu(monkeypatch):
    """The GPU copy (positions mapped to ids, kept in step on add/remove) with a CPU stand-in."""
    monkeypatch.setattr(index_module, "faiss_gpu_available", lambda: True)
    monkeypatch.setattr(index_module, "copy_to_gpu", faiss.clone_index)
    x, ids = unit(3_000, 8), np.arange(3_000) + 5
    index = EmbeddingIndex(np.empty(0, np.int64), np.empty((0, 8), np.float32))
    assert index.approx_threshold == index_module.GPU_APPROX_THRESHOLD
    assert not index.on_gpu
    index.add(ids[:2_000], x[:2_000])
    index.add(ids[2_000:], x[2_000:])
    assert index.on_gpu
    index.remove([5, 6])
    q = unit(4, 8, seed=1)
    keep = np.ones(3_000, bool)
    keep[:2] = False
    np.testing.assert_array_equal(index.search(q, 5)[1], brute_force(x[keep], ids[keep], q, 5)[1])
    many = set(range(7, 2_200))  # too many to fetch on a GPU: the CPU index answers
    keep[:2_200] = False
    np.testing.assert_array_equal(index.search(q, 5, [many] * 4)[1],
                                  brute_force(x[keep], ids[keep], q, 5)[1])


def test_gpu_request_without_gpu_raises():
    if faiss_gpu_available():
        pytest.skip("a GPU is available")
    with pytest.raises(BankError, match="faiss-gpu"):
        EmbeddingIndex([0], unit(1, 4), use_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(not faiss_gpu_available(), reason="FAISS without GPU support or no GPU")
def test_gpu_matches_cpu():
    x, ids = unit(5_000, 32), np.arange(5_000)
    q = unit(50, 32, seed=3)
    gpu = EmbeddingIndex(ids, x, use_gpu=True)
    cpu = EmbeddingIndex(ids, x, use_gpu=False)
    assert gpu.on_gpu and not cpu.on_gpu
    exclude = [{int(i)} for i in range(50)]
    gpu_scores, gpu_ids = gpu.search(q, 10, exclude)
    cpu_scores, cpu_ids = cpu.search(q, 10, exclude)
    np.testing.assert_array_equal(gpu_ids, cpu_ids)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
    gpu.remove([int(cpu_ids[0, 0])])
    assert gpu.on_gpu and int(cpu_ids[0, 0]) not in gpu.search(q[:1], 10)[1]
