"""prose checks: does a text read as prose? Whitespace words measured against Gopher's quality rules (Rae et al.
2021: enough words, mean word length within bounds, most words holding a letter, some function words), sized for
short records, and the text's gzip compression ratio (metrics.lexical, per record) against a bound on repetition.

It catches what a fluency score cannot: a model's loops ("2020,2020,2020,...") and run-together soups are the most
probable text it writes, so their mean token log-prob is high. The score is the share of rules passed (1.0: all);
the note names each rule that failed, with its value.
"""

from __future__ import annotations

from typing import Any

from polyculture.metrics.lexical import compression_ratio
from polyculture.spec import ProseCheck
from polyculture.stages.quality_python import Outcome

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»“”‘’…—–"


def prose_outcome(text: Any, check: ProseCheck, *, field: str) -> Outcome:
    if not isinstance(text, str) or not text.strip():
        return None, False, f"{field} is empty" if text is None or isinstance(text, str) else f"{field} is not text"
    words = [w for w in text.split() if w.strip(PUNCTUATION)]  # a lone dash or ellipsis is not a word
    failed: list[str] = []
    if len(words) < check.min_words:
        failed.append(f"{len(words)} words < {check.min_words}")
    if words:
        mean_length = sum(len(w.strip(PUNCTUATION)) for w in words) / len(words)
        if mean_length < check.min_mean_word_length:
            failed.append(f"mean word length {mean_length:.1f} < {check.min_mean_word_length:g}")
        if mean_length > check.max_mean_word_length:
            failed.append(f"mean word length {mean_length:.1f} > {check.max_mean_word_length:g}")
        alpha = sum(any(c.isalpha() for c in w) for w in words) / len(words)
        if alpha < check.min_alpha_words:
            failed.append(f"{alpha:.0%} of words hold a letter < {check.min_alpha_words:.0%}")
    stops = {w.strip(PUNCTUATION).lower() for w in words} & {s.lower() for s in check.stop_words}
    if len(stops) < check.min_stop_words:
        failed.append(f"{len(stops)} stop words < {check.min_stop_words}")
    ratio = compression_ratio([text]) or 0.0
    if ratio > check.max_compression_ratio:
        failed.append(f"compression ratio {ratio:.2f} > {check.max_compression_ratio:g} (repetitive)")
    rules = 6
    return (rules - len(failed)) / rules, not failed, "; ".join(failed) or None
