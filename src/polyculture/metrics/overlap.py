"""Surface overlap between responses: mean pairwise ROUGE-L (Lin 2004), via the maintained `rouge-score` package.

ROUGE-L of a pair is the F-measure of their longest common subsequence of word tokens (precision = LCS / tokens of
one, recall = LCS / tokens of the other; the pair's score is symmetric). The mean over pairs of a set is a
similarity: 1.0 when every response repeats the same words in the same order, 0.0 when no two share a word, so
LOWER means more diverse. Tokens are those of `metrics.lexical.tokenize` (lower-cased, Unicode words) rather than
rouge-score's ASCII-only default, which would score any non-Latin text as empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from polyculture.metrics.lexical import tokenize

DEFAULT_MAX_PAIRS = 2000


class _Tokenizer:
    """The tokenizer interface rouge-score expects (an object with `tokenize(text) -> list[str]`)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts (0.0 when either has no token)."""
    return float(_scorer().score(a or "", b or "")["rougeL"].fmeasure)


def pair_from_index(k: int, n: int) -> tuple[int, int]:
    """The k-th pair (i, j), i < j, of n items in row-major order: (0,1), (0,2), ..., (0,n-1), (1,2), ..."""
    total = n * (n - 1) // 2
    if not 0 <= k < total:
        raise ValueError(f"pair index {k} out of range for {n} items ({total} pairs)")
    # Pairs before row i: i*n - i*(i+1)/2. Solve for the largest such i with exact integer arithmetic.
    i = n - 2 - (math.isqrt(8 * (total - 1 - k) + 1) - 1) // 2
    j = k - (i * n - i * (i + 1) // 2) + i + 1
    return i, j


def sample_pairs(n: int, max_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """Every pair i < j when there are at most `max_pairs`, else `max_pairs` distinct pairs drawn with a seeded RNG
    (sorted, so the result depends only on n, max_pairs and seed)."""
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    picks = np.sort(np.random.default_rng(seed).choice(total, size=max_pairs, replace=False))
    return [pair_from_index(int(k), n) for k in picks]


def mean_pairwise_rouge_l(texts: Sequence[str], max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0) -> float | None:
    """Mean ROUGE-L F-measure over pairs of `texts` (all pairs, or a seeded sample of `max_pairs` for large sets).

    None for fewer than two texts (no pair to compare).
    """
    texts = [t or "" for t in texts]
    if len(texts) < 2:
        return None
    pairs = sample_pairs(len(texts), max_pairs, seed)
    scorer = _scorer()
    total = sum(scorer.score(texts[i], texts[j])["rougeL"].fmeasure for i, j in pairs)
    return float(total / len(pairs))
