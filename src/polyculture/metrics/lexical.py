"""Lexical diversity: distinct-n and compression ratio over a corpus."""

from __future__ import annotations

import gzip
import re
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

# Word tokens: letters/digits/underscore, keeping inner apostrophes so "don't" stays one token.
_TOKEN = re.compile(r"\w+(?:['\u2019]\w+)*")
# The same pattern for polars (Rust regex), whose \w also matches combining marks; Python's \w is letters, numbers
# and "_" only.
_TOKEN_POLARS = r"[\p{L}\p{N}_]+(?:['\u2019][\p{L}\p{N}_]+)*"


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation is dropped so "Doctor." and "doctor" count as the same word."""
    return _TOKEN.findall(text.lower())


def distinct_n(texts: Sequence[str | None] | pl.Series, n: int) -> float:
    """Unique n-grams / total n-grams over the whole corpus (n-grams never span two texts).

    0.0 when the corpus has no n-gram at all (empty, or every text shorter than n tokens).
    """
    return distinct_ns(texts, (n,))[n]


def distinct_ns(texts: Sequence[str | None] | pl.Series, ns: Sequence[int]) -> dict[int, float]:
    """`distinct_n` for each n in `ns`, exact over every text, tokenising once.

    Vectorised with polars so a million texts take seconds: tokens (the same words as `tokenize`) become dense
    integer ids, an n-gram is the tuple of n consecutive ids within one text, and unique n-grams are counted by
    polars' `n_unique` over those tuples."""
    return distinct_ns_of_subsets(texts, ns, {"all": None})["all"]


def distinct_ns_of_subsets(
    texts: Sequence[str | None] | pl.Series, ns: Sequence[int], subsets: Mapping[str, np.ndarray | None]
) -> dict[str, dict[int, float]]:
    """`distinct_ns` of several subsets of one corpus (each a sorted array of row numbers, None for every row), with
    the corpus tokenised once: a report's later stages are subsets of its validated records."""
    if any(n < 1 for n in ns):
        raise ValueError(f"n must be >= 1, got {min(ns)}")
    series = texts if isinstance(texts, pl.Series) else pl.Series("text", list(texts), dtype=pl.String)
    tokens = series.cast(pl.String).fill_null("").str.to_lowercase().str.extract_all(_TOKEN_POLARS)
    grams = pl.DataFrame({"token": tokens}).with_row_index("doc").explode("token").drop_nulls("token")
    ids = grams["token"].cast(pl.Categorical).to_physical().cast(pl.UInt64)
    doc = grams["doc"]
    out: dict[str, dict[int, float]] = {}
    for key, rows in subsets.items():
        if rows is None:
            out[key] = _distinct(ids, doc, ns)
            continue
        # Whole texts are kept or dropped, so a kept text's tokens stay adjacent and its n-grams intact.
        chosen = np.zeros(len(series), dtype=bool)
        chosen[rows] = True
        keep = pl.Series(chosen).gather(doc)
        out[key] = _distinct(ids.filter(keep), doc.filter(keep), ns)
    return out


def _distinct(ids: pl.Series, doc: pl.Series, ns: Sequence[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for n in ns:
        if n == 1:
            out[n] = ids.n_unique() / len(ids) if len(ids) else 0.0
            continue
        # Row i starts an n-gram when rows i..i+n-1 belong to the same text.
        valid = (doc.shift(-(n - 1)) == doc).fill_null(False)
        if n == 2:
            # Two 32-bit token ids packed in one integer: exact, and hashed far faster than a tuple.
            keys = (ids * (1 << 32) + ids.shift(-1)).filter(valid)
            out[n] = keys.n_unique() / len(keys) if len(keys) else 0.0
            continue
        frame = pl.DataFrame({f"t{k}": ids.shift(-k) for k in range(n)}).filter(valid)
        out[n] = frame.n_unique() / frame.height if frame.height else 0.0
    return out


def sample_texts(texts: Sequence[str | None] | pl.Series, max_texts: int | None, seed: int) -> list[str | None]:
    """All the texts, or a seeded sample of `max_texts` of them in their order; a polars column is sampled before it
    becomes Python strings (a million of them would be ~150 MB for a 10k sample)."""
    n = len(texts)
    if max_texts is None or n <= max_texts:
        return texts.to_list() if isinstance(texts, pl.Series) else list(texts)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=max_texts, replace=False))
    return texts.gather(rows).to_list() if isinstance(texts, pl.Series) else [texts[i] for i in rows]


def compression_ratio(
    texts: Sequence[str | None] | pl.Series, *, max_texts: int | None = None, seed: int = 0
) -> float | None:
    """Size of the texts joined by single spaces (UTF-8 bytes) / size of the same bytes gzip-compressed (level 9).

    The definition of Shaib et al. 2024 ("Standardizing the measurement of text diversity"): a repetitive corpus
    compresses well, so HIGHER means LESS diverse. gzip's fixed ~20-byte header makes tiny corpora score below 1.
    `max_texts` compresses a seeded sample of that many texts (in their order) instead of all of them.
    None when there is no text at all.
    """
    texts = sample_texts(texts, max_texts, seed)
    joined = " ".join(t or "" for t in texts).encode("utf-8")
    if not joined.strip():
        return None
    return len(joined) / len(gzip.compress(joined, compresslevel=9, mtime=0))
