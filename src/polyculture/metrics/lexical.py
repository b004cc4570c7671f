"""Lexical diversity: distinct-n and compression ratio over a corpus."""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence

import numpy as np

# Word tokens: letters/digits/underscore, keeping inner apostrophes so "don't" stays one token.
_TOKEN = re.compile(r"\w+(?:['\u2019]\w+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation is dropped so "Doctor." and "doctor" count as the same word."""
    return _TOKEN.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over the whole corpus (n-grams never span two texts).

    0.0 when the corpus has no n-gram at all (empty, or every text shorter than n tokens).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = tokenize(text or "")
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def compression_ratio(texts: Sequence[str], *, max_texts: int | None = None, seed: int = 0) -> float | None:
    """Size of the texts joined by single spaces (UTF-8 bytes) / size of the same bytes gzip-compressed (level 9).

    The definition of Shaib et al. 2024 ("Standardizing the measurement of text diversity"): a repetitive corpus
    compresses well, so HIGHER means LESS diverse. gzip's fixed ~20-byte header makes tiny corpora score below 1.
    `max_texts` compresses a seeded sample of that many texts (in their order) instead of all of them.
    None when there is no text at all.
    """
    texts = list(texts)
    if max_texts is not None and len(texts) > max_texts:
        rows = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_texts, replace=False))
        texts = [texts[i] for i in rows]
    joined = " ".join(t or "" for t in texts).encode("utf-8")
    if not joined.strip():
        return None
    return len(joined) / len(gzip.compress(joined, compresslevel=9, mtime=0))
