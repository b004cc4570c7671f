"""The diversity report as typed values: what report.json holds, and what the Markdown, HTML and dataset-card
renderers read.

Every class is a frozen dataclass whose fields are report.json's keys, in its order (report.values.Model: numbers
cleaned as a value is built, `to_dict` / `from_dict`). `Report.to_dict()` is the JSON content and `Report.to_json()`
its text; `Report.from_dict(data)` reads it back.

Stages: `before` is the validated records, `after_dedup` the deduplicated pool rebalancing chose from (None when the
report was given no pool), `after` the final records (`STAGES` holds their labels). `Report.quality` is present only
when the spec has quality checks.

Size: one module holds every type of report.json, so the file's whole shape reads in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from polyculture.report.values import OMIT_NONE, Model

# (key, label) of the measured stages, in pipeline order.
STAGES: tuple[tuple[str, str], ...] = (("before", "validated"), ("after_dedup", "after dedup"), ("after", "final"))
# Keys of `Report.counts` that count a part of a stage rather than the records after one (shown beside the funnel):
# salvaged = valid records read from answers cut short.
SIDE_COUNTS = ("salvaged",)
# (key, label, decimals) of the per-stage diversity table, in report.md and report.html.
DIVERSITY_ROWS: tuple[tuple[str, str, int], ...] = (
    ("rows", "records", 0),
    ("semantic_diversity", "semantic diversity (0-100, higher is more diverse)", 1),
    ("vendi_score", "Vendi score (effective number of distinct records in the sample)", 1),
    ("mean_pairwise_similarity", "mean pairwise cosine similarity", 3),
    ("mean_nearest_neighbour_similarity", "mean nearest-neighbour similarity", 3),
    ("near_duplicate_share", "share with a neighbour at or above the dedup threshold", 3),
    ("distinct_1", "distinct-1", 3),
    ("distinct_2", "distinct-2", 3),
    ("compression_ratio", "gzip compression ratio (lower is more diverse)", 2),
    ("self_bleu", "self-BLEU (lower is more diverse)", 3),
)

# ---- per-stage figures --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Conceptual(Model):
    """Conceptual diversity (metrics.conceptual); the counts are absent when the records name no prompt."""

    records: int | None = field(default=None, metadata=OMIT_NONE)
    individuals: int | None = field(default=None, metadata=OMIT_NONE)
    individuals_with_repeats: int | None = field(default=None, metadata=OMIT_NONE)
    internal_variability: float | None
    population_variability: float | None
    ratio: float | None
    homogeneous: bool | None
    reason: str | None


@dataclass(frozen=True, kw_only=True)
class RawSum(Model):
    mean: float
    median: float
    min: float
    max: float
    share_summing_to_1: float


@dataclass(frozen=True, kw_only=True)
class CalibrationValue(Model):
    value: str
    count: int
    observed_share: float
    verbalized_share: float
    mean_probability: float
    mean_raw_probability: float


@dataclass(frozen=True, kw_only=True)
class Calibration(Model):
    """Verbalized vs observed shares (metrics.calibration), keyed by an attribute's value or by the text."""

    calls: int
    items: int
    values: int
    total_variation: float
    spearman: float | None
    raw_sum: RawSum
    per_value: tuple[CalibrationValue, ...]
    keyed_by: str


@dataclass(frozen=True, kw_only=True)
class StageFigures(Model):
    """One stage's diversity figures; a figure is None where too few records make it undefined."""

    rows: int
    distinct_1: float | None
    distinct_2: float | None
    compression_ratio: float | None
    self_bleu: float | None
    semantic_diversity: float | None
    mean_pairwise_similarity: float | None
    vendi_score: float | None
    mean_nearest_neighbour_similarity: float | None
    near_duplicate_share: float | None
    conceptual: Conceptual
    calibration: Calibration | None


class _ByStage(Model):
    """Something measured at each stage: `before`, `after_dedup` (None without a pool) and `after`."""

    def get(self, key: str) -> Any:
        """The stage named by its key ("before", "after_dedup", "after")."""
        if key not in dict(STAGES):
            raise KeyError(key)
        return getattr(self, key)

    def measured(self) -> list[tuple[str, str, Any]]:
        """(key, label, value) of each stage that was measured, in pipeline order."""
        return [(key, label, getattr(self, key)) for key, label in STAGES if getattr(self, key) is not None]


@dataclass(frozen=True, kw_only=True)
class Diversity(_ByStage):
    before: StageFigures
    after_dedup: StageFigures | None
    after: StageFigures


# ---- attributes ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ValueCount(Model):
    value: str | None
    count: int


@dataclass(frozen=True, kw_only=True)
class AttributeSummary(Model):
    """An attribute's spread against its target at one stage (metrics.attribute)."""

    n: int
    counts: dict[str, int]
    other: int
    other_examples: tuple[ValueCount, ...]
    observed_share: dict[str, float]
    other_share: float
    target_share: dict[str, float]
    entropy_bits: float
    normalized_entropy: float
    kl_bits: float | None
    kl_infinite: bool
    total_variation: float | None
    js_bits: float | None
    coverage: float


@dataclass(frozen=True, kw_only=True)
class AttributeFigures(Model):
    source: str
    field: str | None  # the record field a field attribute is read from
    target_counts: dict[str, int]
    before: AttributeSummary  # validated (for an extracted attribute: the pool, the first stage that has it)
    before_rebalance: AttributeSummary  # the pool rebalancing chose from
    after: AttributeSummary  # final


# ---- monoculture (against a reference dataset) ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TextDispersion(Model):
    """Semantic spread of a set of texts (None below 2 records)."""

    rows: int
    semantic_diversity: float | None
    mean_pairwise_similarity: float | None
    vendi_score: float | None


@dataclass(frozen=True, kw_only=True)
class StageTextDispersion(TextDispersion):
    semantic_diversity_ratio: float | None  # stage / reference
    narrower: bool | None


@dataclass(frozen=True, kw_only=True)
class ValueDispersion(Model):
    """One side's value dispersion (metrics.monoculture)."""

    n: int
    distinct: int
    entropy_bits: float | None
    top_value: str | None
    top_share: float | None


@dataclass(frozen=True, kw_only=True)
class DispersionComparison(Model):
    generated: ValueDispersion
    reference: ValueDispersion
    entropy_ratio: float | None
    js_divergence_bits: float | None
    narrower: bool | None


@dataclass(frozen=True, kw_only=True)
class MonocultureStage(Model):
    text: StageTextDispersion | None
    attributes: dict[str, DispersionComparison]


@dataclass(frozen=True, kw_only=True)
class MonocultureStages(_ByStage):
    before: MonocultureStage
    after_dedup: MonocultureStage | None
    after: MonocultureStage


@dataclass(frozen=True, kw_only=True)
class ReferenceFigures(Model):
    path: str | None
    rows: int
    text: TextDispersion | None  # None when the reference was given without embeddings
    attributes: dict[str, ValueDispersion]


@dataclass(frozen=True, kw_only=True)
class Monoculture(Model):
    reference: ReferenceFigures
    stages: MonocultureStages


# ---- rejects, cells, rounds ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RejectGroup(Model):
    stage: str
    reason: str
    count: int
    examples: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Rejects(Model):
    total: int
    by_reason: tuple[RejectGroup, ...]


@dataclass(frozen=True, kw_only=True)
class ShortCell(Model):
    """A rebalance cell short of its target (the columns the cells frame has)."""

    cell_key: str | None = field(default=None, metadata=OMIT_NONE)
    target: int | None = field(default=None, metadata=OMIT_NONE)
    available: int | None = field(default=None, metadata=OMIT_NONE)
    kept: int | None = field(default=None, metadata=OMIT_NONE)
    deficit: int
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class Round(Model):
    """One generation round: what it sent and generated, and what the pool held after it."""

    round: int
    cells: int
    prompts: int
    completions: int
    generated_tokens: int
    generation_seconds: float | None = field(default=None, metadata=OMIT_NONE)
    unique_valid: int
    final: int
    short_cells: int
    missing: int
    # Engine cost of the round's quality checks (solving, judging); absent without quality checks.
    quality_tokens: int | None = field(default=None, metadata=OMIT_NONE)
    quality_seconds: float | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Marginal(Model):
    """One attribute value's target and what rebalancing kept of it."""

    attribute: str
    value: str
    target: int
    available: int
    kept: int
    deficit: int


@dataclass(frozen=True, kw_only=True)
class Rebalance(Model):
    targets: str
    surplus: str
    rounds: tuple[Round, ...]
    stop_reason: str | None
    cells: int
    cells_on_target: int
    marginals: tuple[Marginal, ...]


# ---- contamination (stages.decontaminate) --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ContaminationExample(Model):
    """A flagged record: the benchmark item it overlaps, by which test (ngram | embedding | both) and how much."""

    record_id: str
    field: str
    item_id: str
    item_text: str
    test: str
    shared_ngrams: int
    cosine: float | None


@dataclass(frozen=True, kw_only=True)
class BenchmarkContamination(Model):
    """One benchmark's row: records checked, flagged by each test, both, and in all (n-gram + embedding - both)."""

    benchmark: str
    source: str
    items: int
    records_checked: int
    flagged_ngram: int
    flagged_embedding: int
    flagged_both: int
    flagged: int
    examples: tuple[ContaminationExample, ...]


@dataclass(frozen=True, kw_only=True)
class Contamination(Model):
    """The decontaminate stage's settings and its table, one row per benchmark (the last round's pool)."""

    ngram: int
    embedding_threshold: float
    fields: tuple[str, ...] | None
    rejected: int  # records rejected by the stage (a record flagged by several benchmarks counts once)
    benchmarks: tuple[BenchmarkContamination, ...]
# ---- quality (stages.quality's checks) ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScoreSummary(Model):
    """One check over one stage's records that it checked (validated records dedup removed were never checked)."""

    checked: int
    passed: int
    pass_rate: float | None
    mean_score: float | None  # over the records it could score


@dataclass(frozen=True, kw_only=True)
class ScoreSummaries(_ByStage):
    before: ScoreSummary
    after_dedup: ScoreSummary | None
    after: ScoreSummary


@dataclass(frozen=True, kw_only=True)
class CellQuality(Model):
    checked: int
    passed: int
    pass_rate: float | None


@dataclass(frozen=True, kw_only=True)
class ScoredExample(Model):
    record_id: str
    cell_key: str | None
    score: float
    passed: bool
    text: str  # clipped


@dataclass(frozen=True, kw_only=True)
class QualityCheckFigures(Model):
    """One check over every record it checked: pass rate (a record it could not score failed), by cell and by stage,
    and its lowest- and highest-scored records."""

    name: str
    kind: str
    gate: bool
    quantile: float | None  # a relative fluency cut; `threshold` is then its value over this run's scores
    threshold: float | None  # the cut used (None: the check gives its own verdict)
    checked: int
    scored: int
    passed: int
    pass_rate: float | None
    stages: ScoreSummaries
    by_cell: dict[str, CellQuality]
    lowest: tuple[ScoredExample, ...]
    highest: tuple[ScoredExample, ...]
    histogram: str | None  # plot path, relative to the report's folder


@dataclass(frozen=True, kw_only=True)
class QualityDiversity(_ByStage):
    """Each stage's diversity figures over its records that passed every check."""

    before: StageFigures
    after_dedup: StageFigures | None
    after: StageFigures


@dataclass(frozen=True, kw_only=True)
class Quality(Model):
    checked: int  # records the checks ran on (validated and deduplicated)
    passed: int  # of those, passing every check (gated or not)
    pass_rate: float | None
    checks: tuple[QualityCheckFigures, ...]
    diversity: QualityDiversity

    def cells(self) -> list[str]:
        """Every cell some check counted, sorted (the rows of the pass-rate-by-cell table)."""
        return sorted({cell for check in self.checks for cell in check.by_cell})


# ---- math (a math_answer quality check) ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AnswerCount(Model):
    answer: str
    records: int


@dataclass(frozen=True, kw_only=True)
class Math(Model):
    """What the math_answer check found: problems verified (overall and per cell: topic x difficulty when those are
    the attributes), agreement and solve rates of the checked problems, and the final answers' spread (a set whose
    answers are mostly 0, 1 or 2 is collapsed too)."""

    check: str
    checked: int
    verified: int
    verified_rate: float | None
    by_cell: dict[str, CellQuality]
    mean_agreement: float | None
    mean_solve_rate: float | None
    solve_rate_histogram: str | None  # plot path, relative to the report's folder
    final_answers: int
    distinct_answers: int
    small_answer_share: float | None  # share of final answers equal to 0, 1 or 2
    top_answers: tuple[AnswerCount, ...]


# ---- since the previous release (report.previous) ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DriftRow(Model):
    """One figure of the final records, in the previous release and in this one."""

    figure: str
    digits: int  # decimals shown
    previous: float | None
    current: float | None
    change: float | None  # current - previous


@dataclass(frozen=True, kw_only=True)
class SincePrevious(Model):
    run_id: str
    path: str
    records_then: int
    records_now: int
    threshold: float  # the dedup threshold: a record at or above it to a previous record repeats that release
    near_previous: int | None  # final records with a previous record at or above the threshold (None: no vectors)
    near_previous_share: float | None
    rows: tuple[DriftRow, ...]


# ---- the report ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Generation(Model):
    """How the records were generated (the spec's sections as the spec dumps them)."""

    model: str
    engine: str
    method: dict[str, Any]
    sampling: dict[str, Any]
    dedup: dict[str, Any]
    seed: int


@dataclass(frozen=True, kw_only=True)
class Headline(Model):
    records: int
    target_size: int
    semantic_diversity_before: float | None
    semantic_diversity_after: float | None
    distinct_2_before: float | None
    distinct_2_after: float | None
    vendi_score_before: float | None
    vendi_score_after: float | None
    self_bleu_before: float | None
    self_bleu_after: float | None
    rejects: int
    short_cells: int
    parse_failure_rate: float
    # With quality checks only: the share of checked records passing every check, the share of final records that
    # do, and each check's mean score over the validated records it scored and over the final records.
    quality_pass_rate: float | None = field(default=None, metadata=OMIT_NONE)
    quality_pass_rate_after: float | None = field(default=None, metadata=OMIT_NONE)
    quality_mean_score_before: dict[str, float | None] | None = field(default=None, metadata=OMIT_NONE)
    quality_mean_score_after: dict[str, float | None] | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Sample(Model):
    """Which figures are seeded-sample estimates, and of how many records; every other figure (counts, distinct-n,
    attribute tables, conceptual diversity) uses every record."""

    records: int  # self-BLEU, Vendi, nearest neighbours
    map: str
    seed: int
    semantic_rows: int = 2000  # semantic diversity, mean pairwise similarity
    compression_texts: int = 10_000  # compression ratio


@dataclass(frozen=True, kw_only=True)
class Figures(Model):
    """Paths of the figures, relative to the report's folder (None when too few records to draw)."""

    similarity: str | None
    embedding_map: str | None


@dataclass(frozen=True, kw_only=True)
class Report(Model):
    dataset: str
    run_id: str
    spec_fingerprint: str
    generation: Generation
    headline: Headline
    counts: dict[str, int]  # records after each stage, in pipeline order, then the SIDE_COUNTS
    diversity: Diversity
    sample: Sample
    attributes: dict[str, AttributeFigures]
    monoculture: Monoculture | None
    quality: Quality | None = field(default=None, metadata=OMIT_NONE)
    rejects: Rejects
    short_cells: tuple[ShortCell, ...]
    rebalance: Rebalance
    usage: dict[str, float | int | None]
    plots: dict[str, str]  # attribute name -> its bar chart
    figures: Figures
    contamination: Contamination | None = field(default=None, metadata=OMIT_NONE)  # None: decontaminate is off
    math: Math | None = field(default=None, metadata=OMIT_NONE)  # None: no math_answer check
    previous: SincePrevious | None = field(default=None, metadata=OMIT_NONE)  # None: report.previous unset or no run

    def funnel(self) -> dict[str, int]:
        """The counts of records after each stage, without the side counts."""
        return {stage: n for stage, n in self.counts.items() if stage not in SIDE_COUNTS}

    @property
    def salvaged(self) -> int:
        """Valid records read from answers cut short (0 in a report written before they were counted)."""
        return self.counts.get("salvaged", 0)

    def to_json(self) -> str:
        """report.json's text: strict JSON (no NaN), indented, one trailing newline."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
