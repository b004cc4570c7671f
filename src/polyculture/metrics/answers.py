"""Answers to a closed question (a US state, a number 1-10): each matched to the allowed value it names, and counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from polyculture.index.text import normalize_text
from polyculture.metrics.attribute import attribute_summary


def canonical_answers(values: Sequence[str | None], allowed: Sequence[str]) -> list[str | None]:
    """Each value as the allowed value it matches after normalize_text, else unchanged (an off-set answer)."""
    lookup: dict[str, str] = {}
    for value in allowed:
        lookup.setdefault(normalize_text(value), value)
    return [None if v is None else lookup.get(normalize_text(v), v) for v in values]


def answer_summary(values: Sequence[str | None], target: dict[str, float]) -> dict[str, Any]:
    """attribute_summary over canonical answers, plus in_set_rate, in_set, top_answer and top_share."""
    answers = canonical_answers(values, list(target))
    summary = attribute_summary(answers, target)
    n = len(answers)
    tally = Counter(a for a in answers if a is not None)
    top = min(tally.items(), key=lambda vc: (-vc[1], str(vc[0])), default=(None, 0))
    in_set = sum(summary["counts"].values())
    return summary | {
        "set_size": len(target),
        "distinct_in_set": sum(1 for c in summary["counts"].values() if c),
        "in_set": in_set,
        "in_set_rate": in_set / n if n else None,
        "top_answer": top[0],
        "top_share": top[1] / n if n else None,
    }
