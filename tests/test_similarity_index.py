"""similarity_index: real FAISS on small synthetic embeddings with planted near-duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from polyculture.index import similarity as si
from polyculture.index.similarity import FLAT_MAX_ROWS, IndexPlan, Neighbors, SimilarityIndex, choose_index

DIM = 64
THRESHOLD = 0.9


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def embeddings(n: int, n_dups: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Anisotropic unit rows (shared direction + noise) with `n_dups` rows planted at cosine 0.92-0.99 to an earlier one."""
    rng = np.random.default_rng(seed)
    vectors = unit(0.5 * unit(rng.standard_normal(DIM)) + rng.standard_normal((n, DIM)) / np.sqrt(DIM))
    dups = rng.choice(np.arange(n // 2, n), n_dups, replace=False)
    pairs = []
    for d in dups:
        s = int(rng.integers(0, n // 2))
        noise = rng.standard_normal(DIM)
        noise = unit(noise - (noise @ vectors[s]) * vectors[s])
        cos = rng.uniform(0.92, 0.99)
        vectors[d] = unit(cos * vectors[s] + np.sqrt(1 - cos**2) * noise)
        pairs.append((int(d), s))
    return vectors, pairs


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[tuple[int, int]]]:
    return embeddings(3000, 150)


def as_sets(found: Neighbors) -> list[set[int]]:
    return [set(found.of(q)[0].tolist()) for q in range(len(found))]


def planted_recall(found: Neighbors, pairs: list[tuple[int, int]]) -> float:
    return sum(s in set(found.of(d)[0].tolist()) for d, s in pairs) / len(pairs)


def test_flat_matches_brute_force(data):
    vectors, _ = data
    index = SimilarityIndex.build(vectors, choose_index(len(vectors), "flat", "cpu"))
    assert index.exact and index.ntotal == 3000 and index.dim == DIM
    calls = []
    found = index.neighbors(vectors, THRESHOLD, chunk=700, on_chunk=lambda done, total: calls.append((done, total)))
    assert calls == [(700, 3000), (1400, 3000), (2100, 3000), (2800, 3000), (3000, 3000)]

    sims = vectors @ vectors.T
    expected = [set(np.flatnonzero(row >= THRESHOLD - 1e-6).tolist()) for row in sims]
    assert as_sets(found) == expected
    assert found.lims.dtype == np.int64 and found.ids.dtype == np.int64 and found.sims.dtype == np.float32
    for q in (0, 1500, 2999):
        ids, got = found.of(q)
        np.testing.assert_allclose(got, sims[q, ids], atol=1e-5)
        assert (np.diff(got) <= 0).all()  # most similar first
    assert len(found.truncated) == 0


def test_identical_rows_count_at_threshold_one(data):
    vectors, _ = data
    rows = np.concatenate([vectors[:10], vectors[:10]])
    found = SimilarityIndex.build(rows, choose_index(20, "flat", "cpu")).neighbors(rows, 1.0)
    assert as_sets(found)[3] == {3, 13}


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_of_planted_pairs(data, kind):
    vectors, pairs = data
    plan = choose_index(len(vectors), kind, "cpu")
    index = SimilarityIndex.build(vectors, plan, seed=1)
    assert not index.exact
    found = index.neighbors(vectors, THRESHOLD)
    assert planted_recall(found, pairs) >= 0.95
    # no false neighbours: every hit really is at or above the threshold
    owner = np.repeat(np.arange(len(found)), np.diff(found.lims))
    real = (vectors[owner] * vectors[found.ids]).sum(1)
    assert (real >= THRESHOLD - 1e-5).all()


def test_knn_search_grows_k_for_a_large_cluster(data, monkeypatch):
    vectors, _ = data
    rng = np.random.default_rng(3)
    centre = vectors[0]
    cluster = unit(centre + 0.02 * rng.standard_normal((300, DIM)))  # cosine > 0.99 to each other
    rows = np.concatenate([vectors, cluster])
    members = set(range(3000, 3300)) | {0}
    plan = IndexPlan("hnsw", "cpu", hnsw_m=32, ef_search=16, k=8)
    index = SimilarityIndex.build(rows, plan)
    ks: list[int] = []
    search = index._search
    monkeypatch.setattr(index, "_search", lambda block, k: ks.append(k) or search(block, k))
    found = index.neighbors(rows[3000:3010], THRESHOLD)
    assert ks == [8, 16, 32, 64, 128, 256, 512]  # doubled until the k-th hit fell below the threshold
    for q in range(10):
        assert len(as_sets(found)[q] & members) >= 0.95 * len(members)
    assert len(found.truncated) == 0

    # a cap below the cluster size: the lists are cut, and the result says which ones
    monkeypatch.setattr(si, "MAX_K", 64)
    capped = index.neighbors(rows[3000:3010], THRESHOLD)
    assert capped.truncated.tolist() == list(range(10))
    assert all(len(s) <= 64 for s in as_sets(capped))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(data, tmp_path: Path, kind):
    vectors, _ = data
    plan = choose_index(len(vectors), kind, "cpu")
    index = SimilarityIndex.build(vectors[:2000], plan, seed=2)
    index.add(vectors[2000:])  # added rows keep counting ids
    folder = index.save(tmp_path / "idx")
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.json"]  # no temp files left
    meta = json.loads((folder / "index.json").read_text())
    assert meta["format_version"] == 1 and meta["kind"] == kind and meta["ntotal"] == 3000 and meta["dim"] == DIM

    loaded = SimilarityIndex.load(folder)
    assert loaded.plan == plan and loaded.ntotal == 3000 and loaded.dim == DIM
    before, after = index.neighbors(vectors[::7], THRESHOLD), loaded.neighbors(vectors[::7], THRESHOLD)
    assert np.array_equal(before.lims, after.lims) and np.array_equal(before.ids, after.ids)


def test_load_refuses_missing_or_foreign_folders(data, tmp_path: Path):
    with pytest.raises(ValueError, match="no saved similarity index"):
        SimilarityIndex.load(tmp_path)
    vectors, _ = data
    folder = SimilarityIndex.build(vectors[:100], choose_index(100)).save(tmp_path / "idx")
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        SimilarityIndex.load(folder)


def test_bad_input_is_refused(data):
    vectors, _ = data
    index = SimilarityIndex.build(vectors[:100], choose_index(100))
    with pytest.raises(ValueError, match="dimension 32, but the index has dimension 64"):
        index.neighbors(vectors[:5, :32], THRESHOLD)
    with pytest.raises(ValueError, match="2-D"):
        index.neighbors(vectors[0], THRESHOLD)
    with pytest.raises(ValueError, match="2-D"):
        index.add(vectors[0])
    for threshold in (0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            index.neighbors(vectors[:5], threshold)
    broken = vectors[:5].copy()
    broken[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.neighbors(broken, THRESHOLD)
    with pytest.raises(ValueError, match="L2-normalised"):
        index.add(vectors[:5] * 3)
    with pytest.raises(ValueError, match="chunk"):
        index.neighbors(vectors[:5], THRESHOLD, chunk=5000)
    with pytest.raises(ValueError, match="training rows"):
        SimilarityIndex.build(vectors[:10], IndexPlan("ivf", "cpu", nlist=50, nprobe=4))
    with pytest.raises(ValueError, match="kind must be one of"):
        choose_index(10, "lsh")
    with pytest.raises(ValueError, match="plan.kind"):
        SimilarityIndex.build(vectors[:10], IndexPlan("annoy", "cpu"))


def test_empty_index_and_empty_queries(data):
    vectors, _ = data
    index = SimilarityIndex.trained(vectors[:10], choose_index(0, "hnsw", "cpu"))
    assert index.ntotal == 0
    assert index.neighbors(vectors[:3], THRESHOLD).lims.tolist() == [0, 0, 0, 0]
    index.add(vectors[:10])
    found = index.neighbors(vectors[:0], THRESHOLD)
    assert len(found) == 0 and found.lims.tolist() == [0]


def test_auto_choice_by_size():
    assert choose_index(10).kind == "flat"
    assert choose_index(FLAT_MAX_ROWS).kind == "flat"
    plan = choose_index(1_000_000)
    assert plan.kind == "ivf" and plan.nlist == 4000 and 1 <= plan.nprobe <= plan.nlist
    assert choose_index(FLAT_MAX_ROWS + 1).kind == "ivf"
    assert choose_index(3000, "ivf").nlist == 3000 // 39  # enough training rows per list
    hnsw = choose_index(10, "hnsw")
    assert hnsw.kind == "hnsw" and hnsw.device == "cpu" and hnsw.hnsw_m > 0 and hnsw.ef_search > 0


def test_gpu_refused_without_a_gpu_build(monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert choose_index(10).device == "cpu"
    with pytest.raises(ValueError, match="FAISS GPU build.*Use device 'cpu' or 'auto'"):
        choose_index(10, device="gpu")
    with pytest.raises(ValueError, match="FAISS GPU build"):
        SimilarityIndex.build(np.eye(4, dtype=np.float32), IndexPlan("flat", "gpu"))
    with pytest.raises(ValueError, match="device must be one of auto, cpu, gpu"):
        choose_index(10, device="tpu")
