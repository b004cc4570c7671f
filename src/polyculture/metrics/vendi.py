"""Vendi score (Friedman & Dieng 2023): the effective number of distinct items in a set, from the authors' package
`vendi-score`.

With unit-normalised embeddings x_i and the cosine kernel K = X X^T, the Vendi score is exp of the Shannon entropy of the
eigenvalues of K / n: 1 when every item is the same, n when all are orthogonal. X^T X / n (dims x dims) has the same
non-zero eigenvalues, so `vendi_score.vendi.score_dual` gives the same value at O(n d^2) instead of an n x n
eigendecomposition; it also avoids `score_K`, which reads the `scipy.sparse.csr` namespace that SciPy deprecates.
With fewer rows than dimensions the rows are first rotated into their own span (X = R^T Q^T from a QR of X^T; R^T has
the same kernel R^T R = X X^T), so the eigenproblem is never larger than min(n, d).
"""

from __future__ import annotations

import numpy as np

from polyculture.metrics.semantic import one_blas_thread, prepared_rows


def vendi_score(embeddings: np.ndarray, max_rows: int = 1000, seed: int = 0) -> float | None:
    """Vendi score of the rows (a seeded sample of `max_rows` of them for large sets); None when there is no row."""
    x = prepared_rows(embeddings, max_rows, seed)
    if x.shape[0] == 0:
        return None
    from vendi_score import vendi  # imported here: only the report needs it

    with one_blas_thread():
        if x.shape[0] < x.shape[1]:
            x = np.linalg.qr(x.T, mode="r").T  # same kernel, n x n
        return float(vendi.score_dual(x, normalize=False))
