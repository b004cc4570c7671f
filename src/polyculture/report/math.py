"""The report's Math section, present when the spec has a math_answer check: what solving the problems again found.

Read from the quality stage's last pass: the check's rows of `scores` (score = agreement, passed = verified) and its
`solve_rates` (the share of a problem's solutions equal to the author's answer). Per cell pass rates use the
validated records' cells (topic x difficulty in configs/math_problems.yaml). The answer spread is over the final
records' author answers as written (trimmed), so "1/2" and "0.5" count apart: it shows what a reader of the dataset
sees.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl

from polyculture.report.model import AnswerCount, Math
from polyculture.report.plots import plot_quality_scores
from polyculture.report.quality import by_cell, lookups, rate
from polyculture.spec import BuildSpec, MathAnswerCheck
from polyculture.stages.quality import QualityResult

TOP_ANSWERS = 10
SMALL_ANSWERS = {"0", "1", "2", "0.0", "1.0", "2.0"}


def math_figures(
    spec: BuildSpec, result: QualityResult, validated: pl.DataFrame, final: pl.DataFrame, plots_dir: Path
) -> Math | None:
    """The section, or None when the spec has no math_answer check."""
    check = next((c for c in spec.quality if isinstance(c, MathAnswerCheck)), None)
    if check is None:
        return None
    rows = result.scores.filter(pl.col("check") == check.name)
    checked_ids = set(rows["record_id"].to_list())
    agreements = rows["score"].drop_nulls().to_list()
    rates = [r for rid, r in result.solve_rates.items() if r is not None and rid in checked_ids]
    final_ids = set(final["record_id"].to_list()) if final.height else set()
    final_rates = [r for rid, r in result.solve_rates.items() if r is not None and rid in final_ids]
    answers = _answers(final, check.answer_field)
    counted = Counter(answers)
    verified = int(rows["passed"].sum()) if rows.height else 0
    return Math(
        check=check.name, checked=rows.height, verified=verified, verified_rate=rate(verified, rows.height),
        by_cell=by_cell(rows, lookups(validated)[1]),
        mean_agreement=sum(agreements) / len(agreements) if agreements else None,
        mean_solve_rate=sum(rates) / len(rates) if rates else None,
        solve_rate_histogram=plot_quality_scores("solve_rate", rates, final_rates, None, plots_dir),
        final_answers=len(answers), distinct_answers=len(counted),
        small_answer_share=rate(sum(counted[a] for a in SMALL_ANSWERS), len(answers)),
        top_answers=tuple(AnswerCount(answer=a, records=n) for a, n in counted.most_common(TOP_ANSWERS)),
    )  # fmt: skip


def _answers(final: pl.DataFrame, field: str) -> list[str]:
    if not final.height or "record_json" not in final.columns:
        return []
    found = []
    for raw in final["record_json"].to_list():
        try:
            value = json.loads(raw).get(field) if raw else None
        except (json.JSONDecodeError, AttributeError):
            value = None
        if value is not None:
            found.append(str(value).strip())
    return found
