"""Calibration of verbalized probabilities (Verbalized Sampling) against what the model actually wrote.

Input: one row per response item, with the call it came from, its answer (any hashable key: the canonical attribute
value, or the normalised text) and the probability the model verbalized for it.

Definitions (C calls, N items with a probability):
- raw sum of a call: the sum of its items' verbalized probabilities before normalising. A model that writes a
  distribution sums to 1; small models do not (e.g. 0.3, 0.8, 1.0, 0.2, 1.0), so the raw sums are reported.
- normalised probability of an item: p_i / (raw sum of its call); a call whose raw sum is 0 spreads 1 evenly.
- verbalized share of an answer v: q(v) = (1/C) * sum over calls of the normalised probability the call put on v,
  i.e. the mean over calls of the call's verbalized distribution (sums to 1 over the answers).
- observed share of v: o(v) = items answering v / N, how often the model actually listed v.
- total_variation: 0.5 * sum_v |q(v) - o(v)| over every answer seen (0 = the verbalized distribution matches the
  observed frequencies, 1 = disjoint).
- spearman: Spearman's rank correlation between q and o over the answers seen (scipy.stats.spearmanr; None when there
  are fewer than two answers or either side is constant, where it is undefined).
- per value also: mean_probability (mean normalised probability of the items answering v) and mean_raw_probability.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import polars as pl

SUM_TOLERANCE = 0.01  # a call "sums to 1" when its raw sum is within this of 1


def calibration(
    call_ids: Sequence[str],
    answers: Sequence[Hashable],
    probabilities: Sequence[float | None],
    *,
    max_values: int | None = None,
) -> dict[str, Any] | None:
    """Calibration summary (see the module docstring); None when no item has a verbalized probability.

    Items whose probability is None (or not finite, or negative) are ignored. `max_values` limits the per-value list
    (most frequent answers first); the totals always use every answer.
    """
    if not len(call_ids) == len(answers) == len(probabilities):
        raise ValueError(
            f"call_ids, answers and probabilities must align; got {len(call_ids)}, {len(answers)}, {len(probabilities)}"
        )
    # Answers as integer codes (any hashable key), then one polars pass: a million items take a second, not a
    # Python loop's twenty.
    codes: dict[Hashable, int] = {}
    frame = pl.DataFrame(
        {
            "call": pl.Series(call_ids, dtype=pl.String),
            "answer": pl.Series([codes.setdefault(a, len(codes)) for a in answers], dtype=pl.Int64),
            "p": pl.Series(probabilities, dtype=pl.Float64, strict=False),
        }
    ).filter(pl.col("p").is_not_null() & pl.col("p").is_finite() & (pl.col("p") >= 0))
    if not frame.height:
        return None
    keys = list(codes)

    frame = frame.with_columns(total=pl.col("p").sum().over("call"), size=pl.len().over("call"))
    raw_sums = frame.group_by("call").agg(pl.col("p").sum())["p"].to_numpy()
    frame = frame.with_columns(
        share=pl.when(pl.col("total") > 0).then(pl.col("p") / pl.col("total")).otherwise(1.0 / pl.col("size"))
    )
    per_value = frame.group_by("answer").agg(
        count=pl.len(),
        verbalized=pl.col("share").sum(),
        mean_probability=pl.col("share").mean(),
        mean_raw_probability=pl.col("p").mean(),
    )
    n_calls, n_items = len(raw_sums), frame.height
    rows = sorted(
        per_value.iter_rows(named=True), key=lambda r: (-r["count"], -r["verbalized"], str(keys[r["answer"]]))
    )
    q = np.array([r["verbalized"] / n_calls for r in rows])
    o = np.array([r["count"] / n_items for r in rows])

    return {
        "calls": n_calls,
        "items": n_items,
        "values": len(rows),
        "total_variation": float(0.5 * np.abs(q - o).sum()),
        "spearman": _spearman(q, o),
        "raw_sum": {
            "mean": float(raw_sums.mean()),
            "median": float(np.median(raw_sums)),
            "min": float(raw_sums.min()),
            "max": float(raw_sums.max()),
            "share_summing_to_1": float(np.mean(np.abs(raw_sums - 1.0) <= SUM_TOLERANCE)),
        },
        "per_value": [
            {
                "value": keys[r["answer"]],
                "count": r["count"],
                "observed_share": float(oi),
                "verbalized_share": float(qi),
                "mean_probability": float(r["mean_probability"]),
                "mean_raw_probability": float(r["mean_raw_probability"]),
            }
            for r, qi, oi in list(zip(rows, q, o, strict=True))[:max_values]
        ],
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    from scipy.stats import spearmanr

    rho = float(spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None
