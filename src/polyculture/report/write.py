"""write_report: the diversity report of one build, as a typed `Report` and as files.

Computes diversity at each stage (validated -> after dedup -> final; report.diversity), attribute targets against what
was kept (report.attributes), a reference dataset's dispersion (report.monoculture), rejects and short cells
(report.rejects), what the quality checks found when the spec has any (report.quality), then writes under the run
folder:
- report.json: `Report.to_json()` (strict JSON: no NaN/inf);
- report.md: for people, embedded in the dataset card (report.markdown);
- report.html: the same, self-contained: inline CSS, figures as data URIs, nothing fetched (report.html);
- plots/*.png (report.plots).
Metric definitions live in polyculture.metrics.*; the README's "Diversity report" lists them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from polyculture.report.attributes import attribute_figures
from polyculture.report.diversity import (
    COMPRESSION_MAX_TEXTS,
    SEMANTIC_MAX_ROWS,
    Frames,
    stage_figures,
    stages_distinct,
)
from polyculture.report.embedding_map import embedding_map
from polyculture.report.html import render_html
from polyculture.report.markdown import render_markdown
from polyculture.report.math import math_figures
from polyculture.report.model import (
    STAGES,
    BenchmarkContamination,
    Contamination,
    Diversity,
    Figures,
    Generation,
    Headline,
    Marginal,
    Quality,
    Rebalance,
    Report,
    Round,
    Sample,
)
from polyculture.report.monoculture import monoculture
from polyculture.report.plots import plot_attribute, plot_similarity
from polyculture.report.previous import PreviousRelease, since_previous
from polyculture.report.quality import passing_share, quality_figures
from polyculture.report.rejects import failed_calls, reject_groups, rejects_or_empty, short_cells
from polyculture.runs.files import write_text_atomic
from polyculture.spec import BuildSpec
from polyculture.stages.quality import QualityResult


@dataclass(frozen=True)
class RecordSet:
    """A records frame and its embeddings, rows aligned (None only where there are no records to embed)."""

    records: pl.DataFrame
    embeddings: np.ndarray | None


@dataclass(frozen=True, kw_only=True)
class ReportInputs:
    """What one build hands the report: its records at each stage, what was rejected, the rebalance cells, the
    generation rounds and what they cost.

    - validated: every valid record; pool: the deduplicated records with attributes extracted, which rebalancing
      chose from (None: the report shows no after-dedup stage); final: the published records.
    - rejects: the rejects frame (stages/rejects.py contract); cells: the rebalance cells (target, available, kept,
      deficit, reason); marginals: one row per attribute value (rebalance.MARGINALS_SCHEMA).
    - counts: records after each stage, in pipeline order; usage: tokens, seconds and workers.
    - reference: `report.reference_dataset.load_report_reference(spec)` (a `text` column plus attribute columns) with
      its texts embedded by the build's embedder (embeddings may be None: then only attributes are compared).
    - contamination: the decontaminate stage's table (`DecontaminationResult.table()`); None when the stage is off.
    - quality: the quality stage's last pass (its `scores` and `counts` are read), when the spec has checks.
    - previous: the previous release (`report.previous`, report.previous.load_previous_release) and its records'
      texts embedded by the build's embedder, rows aligned; None: no "since the previous release" section.
    """

    run_id: str
    counts: Mapping[str, int]
    validated: RecordSet
    final: RecordSet
    rejects: pl.DataFrame
    cells: pl.DataFrame
    usage: Mapping[str, float]
    pool: RecordSet | None = None
    marginals: pl.DataFrame | None = None
    rounds: Sequence[Round] = ()
    stop_reason: str | None = None
    reference: RecordSet | None = None
    contamination: Sequence[Mapping[str, Any]] | None = None
    quality: QualityResult | None = None
    previous: tuple[PreviousRelease, np.ndarray] | None = None


def write_report(spec: BuildSpec, inputs: ReportInputs, out_dir: Path) -> Report:
    """Compute the report; write report.json, report.md, report.html and plots/*.png under out_dir; return it."""
    out_dir = Path(out_dir)
    frames: dict[str, tuple[pl.DataFrame, np.ndarray | None]] = {"before": _pair(inputs.validated)}
    if inputs.pool is not None:
        frames["after_dedup"] = _pair(inputs.pool)
    frames["after"] = _pair(inputs.final)
    diversity, nearest = _diversity(spec, frames)

    validated, final = inputs.validated.records, inputs.final.records
    # The pool is what rebalancing chose from: validated, deduplicated, attributes extracted.
    pool = validated if inputs.pool is None else inputs.pool.records
    attributes = attribute_figures(spec, validated, pool, final, inputs.cells)

    reference, reference_embeddings = _pair(inputs.reference) if inputs.reference is not None else (None, None)
    mono, reference_nearest = monoculture(spec, frames, diversity, reference, reference_embeddings)
    if reference_nearest is not None:
        nearest["reference"] = reference_nearest

    rejects = rejects_or_empty(inputs.rejects)
    short = short_cells(inputs.cells)
    completions = int(inputs.counts.get("completions", 0))
    plots_dir = out_dir / "plots"
    pool_label = "after dedup" if diversity.after_dedup is not None else "before rebalancing"
    plots = {name: plot_attribute(name, entry, plots_dir, pool_label=pool_label) for name, entry in attributes.items()}
    figures = Figures(
        similarity=plot_similarity(nearest, plots_dir, threshold=spec.dedup.threshold),
        embedding_map=embedding_map(spec, frames, reference, reference_embeddings, plots_dir),
    )
    quality = math = None
    if spec.quality:
        if inputs.quality is None:
            raise ValueError("ReportInputs.quality: the spec has quality checks but the report was given no scores")
        quality = quality_figures(spec, inputs.quality, frames, diversity, plots_dir)
        math = math_figures(spec, inputs.quality, frames["before"][0], final, plots_dir)
    before, after = diversity.before, diversity.after
    report = Report(
        dataset=spec.name,
        run_id=inputs.run_id,
        spec_fingerprint=spec.fingerprint(),
        generation=Generation(
            model=spec.model.label,
            engine=spec.model.engine,
            method=spec.method.model_dump(mode="json"),
            sampling=spec.sampling.model_dump(mode="json"),
            dedup=spec.dedup.model_dump(mode="json"),
            seed=spec.seed,
        ),
        headline=Headline(
            records=final.height,
            target_size=spec.target_size,
            semantic_diversity_before=before.semantic_diversity,
            semantic_diversity_after=after.semantic_diversity,
            distinct_2_before=before.distinct_2,
            distinct_2_after=after.distinct_2,
            vendi_score_before=before.vendi_score,
            vendi_score_after=after.vendi_score,
            self_bleu_before=before.self_bleu,
            self_bleu_after=after.self_bleu,
            rejects=int(rejects.height),
            short_cells=len(short),
            parse_failure_rate=failed_calls(rejects) / completions if completions else 0.0,
            **(_quality_headline(quality, final, inputs.quality) if quality and inputs.quality else {}),
        ),
        counts={str(k): int(v) for k, v in inputs.counts.items()},
        diversity=diversity,
        sample=Sample(
            records=spec.report.sample,
            map=spec.report.map,
            seed=spec.seed,
            semantic_rows=SEMANTIC_MAX_ROWS,
            compression_texts=COMPRESSION_MAX_TEXTS,
        ),
        attributes=attributes,
        monoculture=mono,
        quality=quality,
        rejects=reject_groups(rejects),
        short_cells=short,
        rebalance=_rebalance(spec, inputs),
        usage=dict(inputs.usage),
        plots=plots,
        figures=figures,
        contamination=_contamination(spec, inputs, rejects),
        math=math,
        previous=(
            since_previous(spec, *inputs.previous, diversity.after, attributes, inputs.final.embeddings)
            if inputs.previous is not None
            else None
        ),
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.json", report.to_json())
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    write_text_atomic(out_dir / "report.html", render_html(report, out_dir))
    return report


def _contamination(spec: BuildSpec, inputs: ReportInputs, rejects: pl.DataFrame) -> Contamination | None:
    settings = spec.decontaminate
    if settings is None or inputs.contamination is None:
        return None
    return Contamination(
        ngram=settings.ngram,
        embedding_threshold=settings.embedding_threshold,
        fields=tuple(settings.fields) if settings.fields else None,
        rejected=int(rejects.filter(pl.col("stage") == "decontaminate").height),
        benchmarks=tuple(BenchmarkContamination.from_dict(row) for row in inputs.contamination),
    )


def _quality_headline(quality: Quality, final: pl.DataFrame, result: QualityResult) -> dict[str, Any]:
    return {
        "quality_pass_rate": quality.pass_rate,
        "quality_pass_rate_after": passing_share(final, result),
        "quality_mean_score_before": {c.name: c.stages.before.mean_score for c in quality.checks},
        "quality_mean_score_after": {c.name: c.stages.after.mean_score for c in quality.checks},
    }


def _pair(records: RecordSet) -> tuple[pl.DataFrame, np.ndarray | None]:
    return records.records, records.embeddings


def _diversity(spec: BuildSpec, frames: Frames) -> tuple[Diversity, dict[str, np.ndarray]]:
    """Each measured stage's figures, and its sampled nearest-neighbour similarities by stage label (for the plot)."""
    figures, nearest = {}, {}
    distinct = stages_distinct(frames)  # the validated texts tokenised once for every stage
    for key, label in STAGES:
        if key in frames:
            figures[key], nearest[label] = stage_figures(spec, *frames[key], label, distinct[key])
    return Diversity(before=figures["before"], after_dedup=figures.get("after_dedup"), after=figures["after"]), nearest


def _rebalance(spec: BuildSpec, inputs: ReportInputs) -> Rebalance:
    cells, marginals = inputs.cells, inputs.marginals
    return Rebalance(
        targets=spec.rebalance.targets,
        surplus=spec.rebalance.surplus,
        rounds=tuple(inputs.rounds),
        stop_reason=inputs.stop_reason,
        cells=int(cells.height),
        cells_on_target=int(cells.filter(pl.col("deficit") == 0).height) if "deficit" in cells.columns else 0,
        marginals=tuple(Marginal(**row) for row in marginals.iter_rows(named=True)) if marginals is not None else (),
    )
