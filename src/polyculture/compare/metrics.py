"""compare.metrics: one method's figures from its completions, records, rejects and embeddings, and the comparison
of all methods (comparison.json).

Metric definitions (all over the method's VALID records unless said otherwise):
- tokens_used: generated (completion) tokens summed over every call, the quantity the budget limits.
- calls: completions (for multi-turn methods every turn's completion is an answer of its own, so a call is a turn).
- valid_rate: valid items / candidates, where candidates are the items parsed out of completions (valid records,
  items a VS selection did not keep, and items rejected as malformed or schema-violating) and valid items are those
  that passed the schema (kept or not by the selection). parse_failure_rate: calls whose completion could not be
  parsed at all / calls (an answer cut short counts here even when its complete items were salvaged);
  salvaged: valid records read from such cut answers (already among the valid). The figures below are over the
  records the method kept ("valid").
- unique_valid_per_1k_tokens: valid records left after exact dedup of the normalised text (index.text.normalize_text)
  per 1,000 generated tokens.
- semantic_diversity (metrics.semantic, VS paper: 100 x mean over pairs of 1 - clip(cos, 0, 1)), distinct_1/2
  (metrics.lexical), mean_rouge_l (metrics.overlap: mean pairwise ROUGE-L F; a similarity, lower is more diverse).
- answers (spec attributes with `source: field`, whose values are the answer set): each valid record's value is
  matched to the allowed values after normalize_text (so "california." counts as "California"); anything else is
  off-set ("other"). From metrics.attribute.attribute_summary: coverage (distinct allowed values seen / set size),
  entropy_bits and normalized_entropy (over the allowed values), kl_bits (observed || target, allowed values),
  total_variation (with off-set answers as one more category of target 0); plus in_set_rate (valid records whose
  answer is in the set / valid records) and top_answer / top_share (the most frequent answer, in the set or not, and
  its share of the valid records).
- calibration (VS methods): metrics.calibration over the valid records, keyed by the first field attribute's answer
  (or the normalised text when the spec has none); per-call raw sums are over the call's valid items.
- quality (only when the spec has quality checks; `quality_scores` is stages.quality's scores frame over the method's
  valid records): per check, checked (valid records), scored, passed, pass_rate (passed / checked: a record the check
  could not score failed) and mean_score; counts.passing (valid records passing every check, gated or not) and
  counts.unique_valid_passing (their distinct normalised texts); unique_valid_passing_per_1k_tokens: the latter per
  1,000 generated tokens, the quality-diversity figure a method is judged by when quality matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from polyculture.index.text import normalize_text
from polyculture.metrics.answers import answer_summary, canonical_answers
from polyculture.metrics.calibration import calibration
from polyculture.metrics.lexical import distinct_n, tokenize
from polyculture.metrics.overlap import DEFAULT_MAX_PAIRS, mean_pairwise_rouge_l
from polyculture.metrics.semantic import semantic_diversity
from polyculture.runs.files import jsonable
from polyculture.spec import BuildSpec
from polyculture.stages.validate import ValidationResult, salvaged_records

SELECT_STAGE = "select"  # validate's stage name for items a VS selection did not keep
CALIBRATION_VALUES = 30  # per-value rows kept in the output (totals use every value)


def method_metrics(
    spec: BuildSpec,
    *,
    method: str,
    completions: pl.DataFrame,
    records: pl.DataFrame,
    rejects: pl.DataFrame,
    embeddings: np.ndarray,
    budget_tokens: int,
    rounds: int | None = None,
    seed: int = 0,
    rouge_pairs: int = DEFAULT_MAX_PAIRS,
    quality_scores: pl.DataFrame | None = None,
) -> dict[str, Any]:
    """One method's figures (definitions in the module docstring). Frames follow the contracts in stages/__init__.py;
    `completions` may carry `round`, `shard` and `batch_seconds` columns for timing; `quality_scores` (one row per
    valid record and check: record_id, check, score, passed) adds the quality figures."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if records.height and (embeddings.ndim != 2 or embeddings.shape[0] != records.height):
        raise ValueError(f"{method}: {records.height} records but embeddings of shape {embeddings.shape}")
    calls = completions.height
    tokens_used = int(completions["completion_tokens"].sum()) if calls else 0
    parse_failures = rejects.filter(pl.col("record_id").is_null()).height
    item_rejects = rejects.filter(pl.col("record_id").is_not_null())
    candidates = records.height + item_rejects.height
    # A VS selection (sample/threshold) drops valid items on purpose: they count as valid, not as rejects.
    unselected = item_rejects.filter(pl.col("stage") == SELECT_STAGE).height
    valid_items = records.height + unselected
    texts = [t or "" for t in records["text"].to_list()] if records.height else []
    unique = len({normalize_text(t) for t in texts})

    result: dict[str, Any] = {
        "method": method,
        "status": "ok",
        "budget_tokens": budget_tokens,
        "tokens_used": tokens_used,
        "prompt_tokens": int(completions["prompt_tokens"].sum()) if calls else 0,
        "rounds": rounds,
        "generation_seconds": _generation_seconds(completions),
        "counts": {
            "calls": calls,
            "parse_failures": parse_failures,
            "candidates": candidates,
            "valid_items": valid_items,
            "valid": records.height,
            "unique_valid": unique,
            "salvaged": salvaged_records(ValidationResult(records=records, rejects=rejects)),
        },
        "valid_rate": valid_items / candidates if candidates else None,
        "parse_failure_rate": parse_failures / calls if calls else None,
        "valid_per_call": records.height / calls if calls else None,
        "unique_valid_per_1k_tokens": 1000.0 * unique / tokens_used if tokens_used else None,
        "semantic_diversity": semantic_diversity(embeddings, seed=seed) if records.height >= 2 else None,
        "distinct_1": _distinct(texts, 1),
        "distinct_2": _distinct(texts, 2),
        "mean_rouge_l": mean_pairwise_rouge_l(texts, max_pairs=rouge_pairs, seed=seed),
        "rouge_l_pairs": min(rouge_pairs, len(texts) * (len(texts) - 1) // 2),
    }
    seconds = result["generation_seconds"]
    result["generated_tokens_per_second"] = tokens_used / seconds if seconds else None

    answers: dict[str, Any] = {}
    for attr in spec.field_attributes:
        column = records[attr.name].cast(pl.String).to_list() if records.height else []
        answers[attr.name] = answer_summary(column, attr.target_distribution())
    result["answers"] = answers

    result["calibration"] = None
    if method.startswith("vs_") and records.height:
        if spec.field_attributes:
            attr = spec.field_attributes[0]
            keys = canonical_answers(records[attr.name].cast(pl.String).to_list(), attr.values)
        else:
            keys = [normalize_text(t) for t in texts]
        result["calibration"] = calibration(
            records["call_id"].to_list(),
            ["(missing)" if k is None else k for k in keys],
            records["verbalized_probability"].to_list(),
            max_values=CALIBRATION_VALUES,
        )
    if quality_scores is not None:
        result |= _quality(records, texts, quality_scores, tokens_used)
        result["counts"] |= result.pop("quality_counts")
    return result


def _quality(records: pl.DataFrame, texts: list[str], scores: pl.DataFrame, tokens_used: int) -> dict[str, Any]:
    ids = records["record_id"].cast(pl.String).to_list() if records.height else []
    unknown = set(scores["record_id"].to_list()) - set(ids)
    if unknown:  # scores of other records would count toward this method's pass rates
        raise ValueError(f"quality_scores: record ids not among the valid records, e.g. {sorted(unknown)[:3]}")
    checks: dict[str, Any] = {}
    for name in dict.fromkeys(scores["check"].to_list()):
        rows = scores.filter(pl.col("check") == name)
        passed, values = int(rows["passed"].sum()), rows["score"].drop_nulls()
        checks[name] = {
            "checked": rows.height,
            "scored": values.len(),
            "passed": passed,
            "pass_rate": passed / rows.height if rows.height else None,
            "mean_score": float(values.mean()) if values.len() else None,  # type: ignore[arg-type]
        }
    failed = set(scores.filter(~pl.col("passed"))["record_id"].to_list())
    checked = set(scores["record_id"].to_list())
    # A valid record no check ran on has not passed them: only records every check passed count.
    passing = [t for i, t in zip(ids, texts, strict=True) if i in checked and i not in failed]
    unique = len({normalize_text(t) for t in passing})
    return {
        "quality": checks,
        "quality_counts": {"passing": len(passing), "unique_valid_passing": unique},
        "passing_rate": len(passing) / len(ids) if ids else None,
        "unique_valid_passing_per_1k_tokens": 1000.0 * unique / tokens_used if tokens_used else None,
    }


def _distinct(texts: Sequence[str], n: int) -> float | None:
    """distinct-n, or None where no text has n tokens (one-word answers have no bigram: undefined, not 0)."""
    if not any(len(tokenize(t)) >= n for t in texts):
        return None
    return distinct_n(texts, n)


def _generation_seconds(completions: pl.DataFrame) -> float | None:
    if not completions.height or "batch_seconds" not in completions.columns:
        return None
    keys = [c for c in ("round", "shard") if c in completions.columns]
    # batch_seconds is repeated on every row of its shard: count it once per (round, shard).
    per_shard = completions.unique(keys) if keys else completions.head(1)
    return float(per_shard["batch_seconds"].sum())


def failed_method(method: str, error: str) -> dict[str, Any]:
    return {"method": method, "status": "failed", "error": error}


# ---- the comparison --------------------------------------------------------------------------------------------------


def comparison_report(
    spec: BuildSpec,
    results: Sequence[dict[str, Any]],
    *,
    run_id: str,
    budget_tokens: int,
    usage: dict[str, Any] | None = None,
    quality_checks: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The whole comparison as strict-JSON-ready data (NaN/inf become None); `quality_checks` describe the checks
    every method was judged by (compare.quality.check_entries: a quantile resolved to one threshold for all)."""
    quality = {"quality_checks": list(quality_checks)} if quality_checks else {}
    return jsonable(
        {
            "dataset": spec.name,
            "run_id": run_id,
            "spec_fingerprint": spec.fingerprint(),
            "model": spec.model.label,
            "engine": spec.model.engine,
            "method_options": spec.method.model_dump(mode="json", exclude={"name"}),
            "sampling": spec.sampling.model_dump(mode="json"),
            "seed": spec.seed,
            "budget_tokens": budget_tokens,
            "answer_sets": {a.name: len(a.values) for a in spec.field_attributes},
            **quality,
            "methods": list(results),
            "failed": {r["method"]: r["error"] for r in results if r.get("status") == "failed"},
            "usage": dict(usage or {}),
        }
    )

