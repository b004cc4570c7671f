"""One stage's diversity figures (validated, after dedup, final).

- rows; distinct_1 / distinct_2 (metrics.lexical) over every record; compression_ratio over every record up to
  100,000 (a seeded sample beyond);
- self_bleu (metrics.self_bleu) and vendi_score (metrics.vendi) over a seeded sample of `report.sample` records;
- semantic_diversity and mean_pairwise_similarity (metrics.semantic, over at most 2,000 records);
- mean_nearest_neighbour_similarity and near_duplicate_share (share of sampled records whose nearest other record is
  at or above dedup.threshold) over the same sample;
- conceptual (metrics.conceptual): internal vs population variability, prompts as individuals;
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
from polyculture.metrics.conceptual import conceptual_diversity, individual_key
from polyculture.metrics.lexical import compression_ratio, distinct_n
from polyculture.metrics.self_bleu import self_bleu
from polyculture.metrics.semantic import mean_pairwise_similarity, nearest_neighbour_similarity, semantic_diversity
from polyculture.metrics.vendi import vendi_score
from polyculture.report.model import Calibration, Conceptual, StageFigures
from polyculture.spec import BuildSpec

CALIBRATION_VALUES = 20  # per-value calibration rows kept in the report (totals use every value)
# gzip of a larger set takes minutes; a seeded sample this size gives about the same figure.
COMPRESSION_MAX_TEXTS = 100_000

Frames = Mapping[str, tuple[pl.DataFrame, np.ndarray | None]]  # stage key -> (records, embeddings), measured stages


def stage_figures(
    spec: BuildSpec, frame: pl.DataFrame, embeddings: np.ndarray | None, label: str
) -> tuple[StageFigures, np.ndarray]:
    """One stage's figures (see the module docstring) and its sampled nearest-neighbour similarities (for the plot)."""
    if frame.height and "text" not in frame.columns:
        raise ValueError(f"the {label} records frame has no 'text' column (columns: {frame.columns})")
    x = embedding_rows(frame, embeddings, label)
    texts = [t or "" for t in frame["text"].to_list()] if frame.height else []
    sample, seed = spec.report.sample, spec.seed
    has_rows = x.shape[0] > 0
    nearest = nearest_neighbour_similarity(x, max_rows=sample, seed=seed) if has_rows else np.zeros(0)
    figures = StageFigures(
        rows=frame.height,
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        compression_ratio=compression_ratio(texts, max_texts=COMPRESSION_MAX_TEXTS, seed=seed),
        self_bleu=self_bleu(texts, max_texts=sample, seed=seed),
        semantic_diversity=semantic_diversity(x, seed=seed) if has_rows else 0.0,
        mean_pairwise_similarity=mean_pairwise_similarity(x, seed=seed) if has_rows else 0.0,
        vendi_score=vendi_score(x, max_rows=sample, seed=seed) if has_rows else None,
        mean_nearest_neighbour_similarity=float(nearest.mean()) if len(nearest) else None,
        near_duplicate_share=float((nearest >= spec.dedup.threshold).mean()) if len(nearest) else None,
        conceptual=_conceptual(frame, x, sample, seed),
        calibration=_calibration(spec, frame, texts),
    )
    return figures, nearest


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


def _conceptual(frame: pl.DataFrame, x: np.ndarray, sample: int, seed: int) -> Conceptual:
    if frame.height and "call_id" not in frame.columns:
        return Conceptual(internal_variability=None, population_variability=None, ratio=None, homogeneous=None,
                          reason="the records have no call_id, so records cannot be grouped by prompt")  # fmt: skip
    keys = [individual_key(c) for c in frame["call_id"].to_list()] if frame.height else []
    return Conceptual.from_dict(conceptual_diversity(keys, x, max_rows=sample, seed=seed))


def _calibration(spec: BuildSpec, frame: pl.DataFrame, texts: list[str]) -> Calibration | None:
    """Verbalized vs observed shares (VS methods); None for other methods or records without probabilities."""
    if not spec.method.name.startswith("vs_") or not frame.height:
        return None
    if "call_id" not in frame.columns or "verbalized_probability" not in frame.columns:
        return None
    field_attrs = [a for a in spec.field_attributes if a.name in frame.columns]
    if field_attrs:
        attr = field_attrs[0]
        keys = canonical_answers(frame[attr.name].cast(pl.String).to_list(), attr.values)  # as compare-methods keys
    else:
        keys = [normalize_text(t) for t in texts]
    result = calibration(
        frame["call_id"].to_list(),
        ["(missing)" if k is None else k for k in keys],
        frame["verbalized_probability"].to_list(),
        max_values=CALIBRATION_VALUES,
    )
    if result is None:
        return None
    return Calibration.from_dict({**result, "keyed_by": field_attrs[0].name if field_attrs else "text"})
