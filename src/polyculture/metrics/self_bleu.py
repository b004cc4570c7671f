"""Self-BLEU (Zhu et al. 2018, Texygen): how much each text repeats the n-grams of the others.

Each text in turn is the hypothesis and every OTHER text is a reference; its BLEU-4 is scored exactly as
`nltk.translate.bleu_score.sentence_bleu(others, text, smoothing_function=SmoothingFunction().method1)` does, and
self-BLEU is the mean over texts, in [0, 1]: HIGHER means LESS diverse. Tokens are `metrics.lexical.tokenize`.

nltk recounts every reference's n-grams for every hypothesis, O(texts^2); a sample of 1,000 texts takes minutes. Here
each n-gram's largest and second-largest count over the texts (and which text holds the largest) is tabled once, so
"the largest count in any text but this one" is a look-up and the whole set costs O(tokens). BLEU's parts are nltk's:
clipped n-gram precision (denominator at least 1), method1 smoothing (0.1 added to a zero numerator), the brevity
penalty against the closest reference length (ties to the shorter), and a score of 0 when no unigram matches.
tests/test_metrics.py checks the result against nltk's sentence_bleu.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import polars as pl

from polyculture.metrics.lexical import sample_texts, tokenize

SMOOTHING_EPSILON = 0.1  # nltk SmoothingFunction().method1's default


def self_bleu(
    texts: Sequence[str | None] | pl.Series, *, max_n: int = 4, max_texts: int | None = None, seed: int = 0
) -> float | None:
    """Mean BLEU-`max_n` (uniform weights) of each text against all the others; None for fewer than 2 texts.

    `max_texts` scores a seeded sample of that many texts (each against the rest of the sample), as the report does.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    texts = sample_texts(texts, max_texts, seed)
    if len(texts) < 2:
        return None
    tokens = [tokenize(t or "") for t in texts]
    counts = [[Counter(_ngrams(toks, n)) for toks in tokens] for n in range(1, max_n + 1)]
    tops = [_top_two(per_text) for per_text in counts]
    lengths = Counter(len(toks) for toks in tokens)
    weight = 1.0 / max_n

    scores = []
    for i, toks in enumerate(tokens):
        log_sum = 0.0
        first_matches = 0
        for n_index in range(max_n):
            hyp_counts = counts[n_index][i]
            top = tops[n_index]
            matches = sum(min(c, _max_elsewhere(top[gram], i)) for gram, c in hyp_counts.items())
            total = max(1, sum(hyp_counts.values()))
            if n_index == 0:
                first_matches = matches
            precision = matches / total if matches else SMOOTHING_EPSILON / total
            log_sum += weight * math.log(precision)
        if first_matches == 0:
            scores.append(0.0)  # nltk: no unigram in common with any reference scores 0
            continue
        reference_length = _closest_other_length(lengths, len(toks))
        scores.append(_brevity_penalty(reference_length, len(toks)) * math.exp(log_sum))
    return float(np.mean(scores))


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _top_two(per_text: list[Counter[tuple[str, ...]]]) -> dict[tuple[str, ...], tuple[int, int, int]]:
    """gram -> (largest count, index of the text holding it, second-largest count in another text)."""
    top: dict[tuple[str, ...], tuple[int, int, int]] = {}
    for index, counter in enumerate(per_text):
        for gram, count in counter.items():
            best, owner, second = top.get(gram, (0, -1, 0))
            if count > best:
                top[gram] = (count, index, best)
            elif count > second:
                top[gram] = (best, owner, count)
    return top


def _max_elsewhere(entry: tuple[int, int, int], index: int) -> int:
    best, owner, second = entry
    return second if owner == index else best


def _closest_other_length(lengths: Counter[int], own: int) -> int:
    """The reference length closest to `own` among the other texts (ties to the shorter), as nltk picks it."""
    candidates = [length for length, count in lengths.items() if count - (length == own) > 0]
    return min(candidates, key=lambda length: (abs(length - own), length))


def _brevity_penalty(reference_length: int, hypothesis_length: int) -> float:
    if hypothesis_length > reference_length:
        return 1.0
    if hypothesis_length == 0:
        return 0.0
    return math.exp(1 - reference_length / hypothesis_length)
