"""Semantic diversity of a set of embeddings.

`semantic_diversity` follows Verbalized Sampling (Zhang et al. 2025): the mean over pairs i<j of 1 - clip(cos_ij, 0, 1),
times 100. Negative cosines are clipped to 0 so that "unrelated" and "opposite" count the same (at most 100).
`nearest_neighbour_similarity` gives each row's largest cosine to any other row: near duplicates show as values near 1,
which is what semantic dedup removes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
from threadpoolctl import threadpool_limits

DENSE_MAX_ROWS = 5000  # nearest neighbours from a dense n x n matrix up to here (200 MB); FAISS beyond


def one_blas_thread() -> AbstractContextManager[object]:
    """BLAS on one thread for the report's small matrices (at most a few thousand rows): on a busy 2-core machine
    OpenBLAS's threads spin against other processes, and a 384 x 384 eigvalsh took 3-7 s instead of 0.01 s."""
    return threadpool_limits(limits=1, user_api="blas")


def prepared_rows(embeddings: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Float64 rows, L2-normalised again (cheap, and guards callers that forgot), sampled down to max_rows."""
    if max_rows < 2:
        raise ValueError(f"max_rows must be >= 2, got {max_rows}")
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array (rows x dims), got shape {x.shape}")
    if x.shape[0] > max_rows:
        # The pairwise matrix is O(rows^2): a seeded sample keeps it bounded and the figure reproducible. Sampled
        # before the float64 cast: a million 384-d rows would be a 3 GB copy.
        rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=max_rows, replace=False))
        x = x[rows]
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _mean_over_pairs(values: np.ndarray) -> float:
    """Mean of a symmetric n x n matrix over i != j (equal to the mean over pairs i < j)."""
    n = values.shape[0]
    return float((values.sum() - np.trace(values)) / (n * (n - 1)))


def semantic_diversity(embeddings: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """100 x mean over pairs of (1 - clip(cos, 0, 1)); 0.0 for fewer than 2 rows."""
    x = prepared_rows(embeddings, max_rows, seed)
    if x.shape[0] < 2:
        return 0.0
    with one_blas_thread():
        sims = np.clip(x @ x.T, 0.0, 1.0)
    return max(0.0, 100.0 * (1.0 - _mean_over_pairs(sims)))


def mean_pairwise_similarity(embeddings: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """Mean cosine similarity over pairs (unclipped, in [-1, 1]); 0.0 for fewer than 2 rows."""
    x = prepared_rows(embeddings, max_rows, seed)
    if x.shape[0] < 2:
        return 0.0
    with one_blas_thread():
        return _mean_over_pairs(x @ x.T)


def nearest_neighbour_similarity(embeddings: np.ndarray, max_rows: int = 2000, seed: int = 0) -> np.ndarray:
    """Each (sampled) row's largest cosine similarity to another row of the sample; empty for fewer than 2 rows.

    Up to DENSE_MAX_ROWS rows from the full float64 matrix; beyond, exact FAISS flat search (float32, k=2: the row
    itself and its nearest other), since `report.sample` may be 100,000 and that matrix would be 80 GB."""
    x = prepared_rows(embeddings, max_rows, seed)
    n = x.shape[0]
    if n < 2:
        return np.zeros(0)
    if n > DENSE_MAX_ROWS:
        import faiss  # only a large sample needs it

        rows = np.ascontiguousarray(x, dtype=np.float32)
        index = faiss.IndexFlatIP(rows.shape[1])
        index.add(rows)
        scores, ids = index.search(rows, 2)
        # With an exact duplicate the first hit may be the other copy: then it is the nearest other row anyway.
        nearest = np.where(ids[:, 0] == np.arange(n), scores[:, 1], scores[:, 0]).astype(np.float64)
        return np.clip(nearest, -1.0, 1.0)
    with one_blas_thread():
        sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.clip(sims.max(axis=1), -1.0, 1.0)
