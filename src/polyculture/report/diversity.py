"""One stage's diversity figures (validated, after dedup, final).

- rows; distinct_1 / distinct_2 (metrics.lexical) over every record; compression_ratio over a seeded sample of
  COMPRESSION_MAX_TEXTS texts;
- self_bleu (metrics.self_bleu) and vendi_score (metrics.vendi) over a seeded sample of `report.sample` records;
- semantic_diversity and mean_pairwise_similarity (metrics.semantic, over at most 2,000 records);
- mean_nearest_neighbour_similarity and near_duplicate_share (share of sampled records whose nearest other record is
  at or above dedup.threshold) over the same sample;
- conceptual (metrics.conceptual): internal vs population variability, prompts as individuals, over every record;
- calibration (metrics.calibration, VS methods only, else None): keyed by the first field attribute's value (matched
  to its allowed values) or by the normalised text.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl

from polyculture.index.text import normalize_text
from polyculture.metrics.answers import canonical_answers
from polyculture.metrics.calibration import calibration
from polyculture.metrics.conceptual import conceptual_diversity, individual_keys
from polyculture.metrics.lexical import compression_ratio, distinct_ns, distinct_ns_of_subsets
from polyculture.metrics.self_bleu import self_bleu
from polyculture.metrics.semantic import mean_pairwise_similarity, nearest_neighbour_similarity, semantic_diversity
from polyculture.metrics.vendi import vendi_score
from polyculture.report.model import Calibration, Conceptual, StageFigures
from polyculture.spec import BuildSpec

CALIBRATION_VALUES = 20  # per-value calibration rows kept in the report (totals use every value)
# gzip -9 runs at ~2 MB/s here, so 100k texts took 8 s per stage. DEFLATE only looks 32 KB back, so the ratio of a
# big corpus is an average over windows, and a seeded sample of 10k texts (~1.5 MB) gives it within about 1%
# (tests/test_report_scale.py).
COMPRESSION_MAX_TEXTS = 10_000
SEMANTIC_MAX_ROWS = 2000  # rows of the pairwise matrix for semantic diversity and mean pairwise similarity

Frames = Mapping[str, tuple[pl.DataFrame, np.ndarray | None]]  # stage key -> (records, embeddings), measured stages


def stage_figures(
    spec: BuildSpec,
    frame: pl.DataFrame,
    embeddings: np.ndarray | None,
    label: str,
    distinct: Mapping[int, float] | None = None,
) -> tuple[StageFigures, np.ndarray]:
    """One stage's figures (see the module docstring) and its sampled nearest-neighbour similarities (for the plot).
    `distinct`: its distinct-1 and -2 when already computed (`stages_distinct`)."""
    if frame.height and "text" not in frame.columns:
        raise ValueError(f"the {label} records frame has no 'text' column (columns: {frame.columns})")
    x = embedding_rows(frame, embeddings, label)
    text_column = frame["text"].cast(pl.String).fill_null("") if frame.height else pl.Series("text", [], pl.String)
    if distinct is None:
        distinct = distinct_ns(text_column, (1, 2))  # polars over every record: exact, and seconds at a million
    sample, seed = spec.report.sample, spec.seed
    has_rows, semantic_rows = x.shape[0] > 0, SEMANTIC_MAX_ROWS
    nearest = nearest_neighbour_similarity(x, max_rows=sample, seed=seed) if has_rows else np.zeros(0)
    figures = StageFigures(
        rows=frame.height,
        distinct_1=distinct[1],
        distinct_2=distinct[2],
        compression_ratio=compression_ratio(text_column, max_texts=COMPRESSION_MAX_TEXTS, seed=seed),
        self_bleu=self_bleu(text_column, max_texts=sample, seed=seed),
        semantic_diversity=semantic_diversity(x, max_rows=semantic_rows, seed=seed) if has_rows else 0.0,
        mean_pairwise_similarity=mean_pairwise_similarity(x, max_rows=semantic_rows, seed=seed) if has_rows else 0.0,
        vendi_score=vendi_score(x, max_rows=sample, seed=seed) if has_rows else None,
        mean_nearest_neighbour_similarity=float(nearest.mean()) if len(nearest) else None,
        near_duplicate_share=float((nearest >= spec.dedup.threshold).mean()) if len(nearest) else None,
        conceptual=_conceptual(frame, x),
        calibration=_calibration(spec, frame, text_column),
    )
    return figures, nearest


def stages_distinct(frames: Frames) -> dict[str, dict[int, float]]:
    """Distinct-1 and -2 of every stage. The validated texts are tokenised once and a later stage whose records are
    among them (same record_id, same text) is measured as that subset; any other stage is tokenised on its own."""
    validated = frames["before"][0]
    subsets: dict[str, np.ndarray | None] = {"before": None}
    for key, (frame, _) in frames.items():
        if key != "before" and (rows := _rows_within(validated, frame)) is not None:
            subsets[key] = rows
    out = distinct_ns_of_subsets(_texts(validated), (1, 2), subsets) if validated.height else {}
    for key, (frame, _) in frames.items():
        if key not in out:
            out[key] = distinct_ns(_texts(frame), (1, 2))
    return out


def _texts(frame: pl.DataFrame) -> pl.Series:
    if "text" not in frame.columns:
        return pl.Series("text", [], dtype=pl.String)
    return frame["text"].cast(pl.String).fill_null("")


def _rows_within(validated: pl.DataFrame, frame: pl.DataFrame) -> np.ndarray | None:
    """Sorted row numbers of `frame`'s records in `validated`, or None when some record is not there unchanged."""
    if frame.height == 0 or not {"record_id", "text"} <= set(frame.columns) & set(validated.columns):
        return None
    lookup = validated.select(
        pl.col("record_id").cast(pl.String),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
        _texts(validated).alias("_text"),
    )
    joined = frame.select(pl.col("record_id").cast(pl.String), _texts(frame)).join(
        lookup, on="record_id", how="left", maintain_order="left"
    )
    if joined.height != frame.height or joined["_row"].null_count() or not (joined["text"] == joined["_text"]).all():
        return None
    rows = np.sort(joined["_row"].to_numpy())
    return rows if len(rows) < 2 or bool((np.diff(rows) > 0).all()) else None  # a record twice: not a subset


def embedding_rows(frame: pl.DataFrame, embeddings: np.ndarray | None, label: str) -> np.ndarray:
    """The stage's embeddings as a rows x dims array (0 rows when the frame is empty or none were given)."""
    if embeddings is None:
        if frame.height:
            raise ValueError(f"{label}: {frame.height} records but no embeddings")
        return np.zeros((0, 1))
    x = np.asarray(embeddings)
    if frame.height and (x.ndim != 2 or x.shape[0] != frame.height):
        # Misaligned rows would silently measure the wrong records.
        raise ValueError(f"{label}: {frame.height} records but embeddings of shape {x.shape}")
    return x if x.ndim == 2 and frame.height else np.zeros((0, x.shape[1] if x.ndim == 2 else 1))


def _conceptual(frame: pl.DataFrame, x: np.ndarray) -> Conceptual:
    if frame.height and "call_id" not in frame.columns:
        return Conceptual(internal_variability=None, population_variability=None, ratio=None, homogeneous=None,
                          reason="the records have no call_id, so records cannot be grouped by prompt")  # fmt: skip
    keys = individual_keys(frame["call_id"]) if frame.height else []
    return Conceptual.from_dict(conceptual_diversity(keys, x))


def _calibration(spec: BuildSpec, frame: pl.DataFrame, texts: pl.Series) -> Calibration | None:
    """Verbalized vs observed shares (VS methods); None for other methods or records without probabilities."""
    if not spec.method.name.startswith("vs_") or not frame.height:
        return None
    if "call_id" not in frame.columns or "verbalized_probability" not in frame.columns:
        return None
    field_attrs = [a for a in spec.field_attributes if a.name in frame.columns]
    column = frame[field_attrs[0].name].cast(pl.String) if field_attrs else texts
    # Each distinct value is normalised once (a million records hold far fewer distinct answers).
    distinct = column.unique().to_list()
    if field_attrs:
        canonical = canonical_answers(distinct, field_attrs[0].values)  # as compare-methods keys
    else:
        canonical = [None if t is None else normalize_text(t) for t in distinct]
    lookup = {v: "(missing)" if k is None else k for v, k in zip(distinct, canonical, strict=True)}
    result = calibration(
        frame["call_id"],
        [lookup[v] for v in column.to_list()],
        frame["verbalized_probability"],
        max_values=CALIBRATION_VALUES,
    )
    if result is None:
        return None
    return Calibration.from_dict({**result, "keyed_by": field_attrs[0].name if field_attrs else "text"})
