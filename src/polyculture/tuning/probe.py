"""The model probe: how collapsed is a model on an enumerable task, measured exactly and by sampling.

Exact: for each prompt phrasing, the log-probability of every whole valid answer (end-of-turn included), renormalised
over the valid set; `valid_mass` is how much probability the model puts on writing exactly a valid answer at all.
Sampled: N samples per phrasing at the given temperature, unconstrained, matched to the options; anything else is an
invalid output. Scalar figures are per phrasing, then averaged over phrasings.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from polyculture.engines.base import Engine, SamplingParams
from polyculture.engines.chat_tokens import answer_tokens
from polyculture.metrics.attribute import attribute_summary
from polyculture.tuning.families import TaskFamily

ANSWER_SLACK_CHARS = 5  # room for quotes, a full stop, spaces and the end-of-turn token
ANSWER_SLACK_TOKENS = 2  # room for a full stop or a quote after the longest answer's own tokens


def answer_token_cap(tokenizer: Any, family: TaskFamily) -> int:
    """The longest valid answer in tokens (end-of-turn included) plus slack: sampling past it cannot yield a valid
    answer, and sampling cost grows with every step, so the probe stops there."""
    tokens = answer_tokens(tokenizer, family.conversations()[0], family.answers)
    return max(len(ids) for ids in tokens.answer_ids) + ANSWER_SLACK_TOKENS


def probe_family(
    engine: Engine,
    family: TaskFamily,
    *,
    samples: int = 100,
    temperature: float = 1.0,
    answer_tokens: int | None = None,
) -> dict[str, Any]:
    """Probe figures for one family. `answer_tokens` caps a sample's length (see answer_token_cap); without a
    tokenizer at hand, the longest answer's characters plus slack (a token covers at least one character)."""
    if answer_tokens is None:
        answer_tokens = max(len(a) for a in family.answers) + ANSWER_SLACK_CHARS
    target = np.array(family.target)
    target_map = dict(zip(family.answers, family.target, strict=True))
    per_prompt: list[dict[str, Any]] = []
    distributions: list[np.ndarray] = []
    sampled_values: list[str | None] = []
    for conversation, prompt in zip(family.conversations(), family.prompts, strict=True):
        logprobs = np.array(engine.sequence_logprobs(conversation, family.answers), dtype=np.float64)
        exact = _exact_figures(logprobs, target, family.answers)
        distributions.append(np.exp(logprobs - _logsumexp(logprobs)))
        row: dict[str, Any] = {"prompt": prompt, "exact": exact}
        if samples > 0:
            completions = engine.generate(
                [conversation], SamplingParams(temperature=temperature, max_tokens=answer_tokens, n=samples)
            )[0]
            values = [family.match(c.text) if c.finish_reason == "stop" else None for c in completions]
            sampled_values.extend(values)
            row["sampled"] = _sampled_figures(values, [c.text for c in completions], target_map)
        per_prompt.append(row)

    mean_distribution = np.mean(distributions, axis=0)
    top = int(np.argmax(mean_distribution))
    result: dict[str, Any] = {
        "family": family.name,
        "options": len(family.answers),
        "exhaustive": family.exhaustive,
        "prompts": len(family.prompts),
        "target_entropy_bits": family.target_entropy / math.log(2),
        "exact": {
            **_mean_of(
                per_prompt, "exact", ["entropy_bits", "normalized_entropy", "kl_bits", "top_share", "valid_mass"]
            ),
            "top_option": family.answers[top],
            "distribution": {a: float(p) for a, p in zip(family.answers, mean_distribution, strict=True)},
        },
        "per_prompt": per_prompt,
    }
    if samples > 0:
        pooled = attribute_summary(sampled_values, target_map)
        result["sampled"] = {
            **_mean_of(
                per_prompt,
                "sampled",
                [
                    "invalid_rate",
                    "coverage",
                    "coverage_count",
                    "entropy_bits",
                    "normalized_entropy",
                    "kl_bits",
                    "top_share",
                ],
            ),
            "samples_per_prompt": samples,
            "temperature": temperature,
            "pooled_coverage_count": int(sum(1 for c in pooled["counts"].values() if c > 0)),
            "pooled_counts": pooled["counts"],
            "pooled_invalid_rate": pooled["other_share"],
        }
    return result


def _logsumexp(x: np.ndarray) -> float:
    peak = float(np.max(x))
    return peak + math.log(float(np.exp(x - peak).sum()))


def _exact_figures(logprobs: np.ndarray, target: np.ndarray, answers: list[str]) -> dict[str, Any]:
    log_mass = _logsumexp(logprobs)
    p = np.exp(logprobs - log_mass)
    nonzero = p > 0
    entropy = float(-(p[nonzero] * np.log2(p[nonzero])).sum())
    with np.errstate(divide="ignore"):
        kl = float((p[nonzero] * (np.log2(p[nonzero]) - np.log2(target[nonzero]))).sum())
    top = int(np.argmax(p))
    return {
        "entropy_bits": entropy,
        "normalized_entropy": entropy / math.log2(len(answers)),
        "kl_bits": None if math.isinf(kl) else max(0.0, kl),
        "top_option": answers[top],
        "top_share": float(p[top]),
        "valid_mass": math.exp(log_mass),
    }


def _sampled_figures(values: list[str | None], texts: list[str], target: dict[str, float]) -> dict[str, Any]:
    summary = attribute_summary(values, target)
    valid = [v for v in values if v is not None]
    top = Counter(valid).most_common(1)
    invalid = Counter(t.strip()[:60] for t, v in zip(texts, values, strict=True) if v is None)
    return {
        "n": len(values),
        "invalid_rate": summary["other_share"],
        "coverage": summary["coverage"],
        "coverage_count": int(sum(1 for c in summary["counts"].values() if c > 0)),
        "entropy_bits": summary["entropy_bits"],
        "normalized_entropy": summary["normalized_entropy"],
        "kl_bits": summary["kl_bits"],
        "top_option": top[0][0] if top else None,
        "top_share": top[0][1] / len(valid) if top else None,  # of the valid samples, like the exact figure
        "invalid_examples": [{"text": t, "count": c} for t, c in invalid.most_common(3)],
    }


def _mean_of(rows: list[dict[str, Any]], section: str, keys: list[str]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for key in keys:
        values = [r[section][key] for r in rows if r[section][key] is not None]
        means[key] = float(np.mean(values)) if values else None
    return means


def engine_tokenizer(engine: Engine) -> Any | None:
    """The tokenizer behind an in-process engine (transformers or vLLM), or None (a remote server)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None and getattr(engine, "llm", None) is not None:
        tokenizer = engine.llm.get_tokenizer()  # type: ignore[attr-defined]
    return tokenizer
