"""Lexical diversity: distinct-n over a corpus."""

from __future__ import annotations

import re
from collections.abc import Sequence

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
