"""The report's Quality section: what the quality stage's last pass found, per check and per stage.

Read from the stage's result (stages.quality.QualityResult): its `scores` frame (one row per checked record and check:
record_id, score, passed) and its per-check `counts` (the threshold each check used, a quantile resolved). Records
are matched to each stage by record_id. "Checked" records are the validated records that reached the stage (after
dedup); a check's pass rate is passed / checked, a record it could not score counting as failed (as the stage treats
it). "Passing" means passing every check, gated or not (the `_quality` column); each stage's diversity figures are
also given over its passing records (the final records all pass when every check is gated: their figures are
reused, not computed twice).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl

from polyculture.index.text import clip
from polyculture.report.diversity import Frames, stage_figures
from polyculture.report.model import (
    STAGES,
    CellQuality,
    Diversity,
    Quality,
    QualityCheckFigures,
    QualityDiversity,
    ScoredExample,
    ScoreSummaries,
    ScoreSummary,
)
from polyculture.report.plots import plot_quality_scores
from polyculture.spec import BuildSpec, FluencyCheck
from polyculture.stages.quality import QualityResult

EXAMPLES = 5  # lowest- and highest-scored records shown per check
EXAMPLE_CHARS = 200
NO_CELL = "(no cell)"


def quality_figures(
    spec: BuildSpec, result: QualityResult, frames: Frames, diversity: Diversity, plots_dir: Path
) -> Quality:
    """The section for `result` (the last quality pass); `frames` are the measured stages (report.write), whose
    figures over all records `diversity` already holds."""
    scores = result.scores
    missing = {"record_id", "check", "score", "passed"} - set(scores.columns)
    if missing:
        raise ValueError(f"quality scores: missing columns {sorted(missing)} (columns: {scores.columns})")
    validated = frames["before"][0]
    texts, cells = lookups(validated)
    thresholds = {c.name: c.threshold for c in result.counts}
    passing = _passing(scores)
    final = frames["after"][0]
    final_ids = final["record_id"].to_list() if final.height else []
    checks = []
    for check in spec.quality:
        rows = scores.filter(pl.col("check") == check.name)
        checked, passed = rows.height, int(rows["passed"].sum())
        scored = rows.filter(pl.col("score").is_not_null()).sort(["score", "record_id"])
        quantile = check.quantile if isinstance(check, FluencyCheck) else None
        threshold = thresholds.get(check.name, getattr(check, "threshold", None))
        checks.append(
            QualityCheckFigures(
                name=check.name, kind=check.kind, gate=check.gate, quantile=quantile, threshold=threshold,
                checked=checked, scored=scored.height, passed=passed, pass_rate=rate(passed, checked),
                stages=_by_stage(rows, frames),
                by_cell=by_cell(rows, cells),
                lowest=_examples(scored.head(EXAMPLES), texts, cells),
                highest=_examples(scored.reverse().head(EXAMPLES), texts, cells),
                histogram=plot_quality_scores(
                    check.name, scored["score"].to_list(),
                    scored.filter(pl.col("record_id").is_in(final_ids))["score"].to_list(),
                    threshold, plots_dir,
                ),
            )
        )  # fmt: skip
    checked_ids = scores["record_id"].unique()
    return Quality(
        checked=checked_ids.len(),
        passed=len(passing),
        pass_rate=rate(len(passing), checked_ids.len()),
        checks=tuple(checks),
        diversity=_passing_diversity(spec, frames, diversity, passing),
    )


def passing_share(frame: pl.DataFrame, result: QualityResult) -> float | None:
    """The share of `frame`'s records that passed every check (None for no records)."""
    if not frame.height:
        return None
    return frame["record_id"].is_in(list(_passing(result.scores))).mean()  # type: ignore[return-value]


def _passing(scores: pl.DataFrame) -> set[str]:
    per_record = scores.group_by("record_id").agg(pl.col("passed").all())
    return set(per_record.filter(pl.col("passed"))["record_id"].to_list())


def lookups(validated: pl.DataFrame) -> tuple[dict[str, str], dict[str, str]]:
    """Each validated record's text and cell, by record id."""
    if not validated.height:
        return {}, {}
    ids = validated["record_id"].cast(pl.String).to_list()
    texts = validated["text"].to_list() if "text" in validated.columns else [""] * len(ids)
    cells = validated["cell_key"].to_list() if "cell_key" in validated.columns else [None] * len(ids)
    return dict(zip(ids, texts, strict=True)), {i: c or NO_CELL for i, c in zip(ids, cells, strict=True)}


def _by_stage(rows: pl.DataFrame, frames: Frames) -> ScoreSummaries:
    summaries = {}
    for key, _ in STAGES:
        if key in frames:
            ids = frames[key][0]["record_id"].to_list() if frames[key][0].height else []
            summaries[key] = _summary(rows.filter(pl.col("record_id").is_in(ids)))
    before, after = summaries["before"], summaries["after"]
    return ScoreSummaries(before=before, after_dedup=summaries.get("after_dedup"), after=after)


def _summary(rows: pl.DataFrame) -> ScoreSummary:
    passed = int(rows["passed"].sum()) if rows.height else 0
    scores = rows["score"].drop_nulls()
    return ScoreSummary(
        checked=rows.height, passed=passed, pass_rate=rate(passed, rows.height),
        mean_score=float(scores.mean()) if scores.len() else None,  # type: ignore[arg-type]
    )  # fmt: skip


def by_cell(rows: pl.DataFrame, cells: Mapping[str, str]) -> dict[str, CellQuality]:
    tally: dict[str, list[int]] = {}
    for record_id, passed in zip(rows["record_id"].to_list(), rows["passed"].to_list(), strict=True):
        counts = tally.setdefault(cells.get(record_id, NO_CELL), [0, 0])
        counts[0] += 1
        counts[1] += bool(passed)
    return {
        cell: CellQuality(checked=checked, passed=passed, pass_rate=rate(passed, checked))
        for cell, (checked, passed) in sorted(tally.items())
    }


def _examples(rows: pl.DataFrame, texts: Mapping[str, str], cells: Mapping[str, str]) -> tuple[ScoredExample, ...]:
    return tuple(
        ScoredExample(record_id=r["record_id"], cell_key=cells.get(r["record_id"]), score=r["score"],
                      passed=bool(r["passed"]), text=clip(" ".join((texts.get(r["record_id"]) or "").split()),
                                                          EXAMPLE_CHARS))  # fmt: skip
        for r in rows.iter_rows(named=True)
    )


def _passing_diversity(spec: BuildSpec, frames: Frames, diversity: Diversity, passing: set[str]) -> QualityDiversity:
    figures = {}
    for key, label in STAGES:
        if key not in frames:
            continue
        frame, embeddings = frames[key]
        keep = frame["record_id"].is_in(list(passing)).to_numpy() if frame.height else np.zeros(0, dtype=bool)
        if keep.all():  # every record passes (final records when every check is gated): the same figures
            figures[key] = diversity.get(key)
            continue
        subset = None if embeddings is None else np.asarray(embeddings)[keep]
        figures[key], _ = stage_figures(spec, frame.filter(pl.Series(keep)), subset, f"{label} passing quality")
    return QualityDiversity(before=figures["before"], after_dedup=figures.get("after_dedup"), after=figures["after"])


def rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None
