"""Each stage's dispersion against a reference dataset's (generative monoculture): the texts' semantic spread
(embeddings) and the spread of the attributes the reference names (metrics.monoculture)."""

from __future__ import annotations

import numpy as np
import polars as pl

from polyculture.metrics.monoculture import compare_dispersion, value_dispersion
from polyculture.metrics.semantic import mean_pairwise_similarity, nearest_neighbour_similarity, semantic_diversity
from polyculture.metrics.vendi import vendi_score
from polyculture.report.diversity import Frames, embedding_rows
from polyculture.report.model import (
    STAGES,
    DispersionComparison,
    Diversity,
    Monoculture,
    MonocultureStage,
    MonocultureStages,
    ReferenceFigures,
    StageFigures,
    StageTextDispersion,
    TextDispersion,
    ValueDispersion,
)
from polyculture.spec import BuildSpec


def monoculture(
    spec: BuildSpec,
    frames: Frames,
    diversity: Diversity,
    reference: pl.DataFrame | None,
    reference_embeddings: np.ndarray | None,
) -> tuple[Monoculture | None, np.ndarray | None]:
    """The comparison (None without a reference) and the reference's sampled nearest-neighbour similarities.
    A stage's text figures are the ones its diversity table already holds (same sample, same seed)."""
    if reference is None:
        return None, None
    if reference.height and "text" not in reference.columns:
        raise ValueError(f"the reference frame has no 'text' column (columns: {reference.columns})")
    sample, seed = spec.report.sample, spec.seed
    ref_x = embedding_rows(reference, reference_embeddings, "reference") if reference_embeddings is not None else None
    names = [a.name for a in spec.attributes if a.name in reference.columns]
    ref_text = _text_dispersion(ref_x, sample, seed) if ref_x is not None else None
    ref_nearest = None
    if ref_x is not None and len(ref_x):
        ref_nearest = nearest_neighbour_similarity(ref_x, max_rows=sample, seed=seed)
    stages: dict[str, MonocultureStage | None] = {}
    for key, label in STAGES:
        if key not in frames:
            stages[key] = None
            continue
        frame, embeddings = frames[key]
        x = embedding_rows(frame, embeddings, label)
        if ref_x is not None and len(x) and len(ref_x) and x.shape[1] != ref_x.shape[1]:
            raise ValueError(f"reference embeddings have {ref_x.shape[1]} dims but the {label} ones {x.shape[1]}")
        text = _stage_dispersion(diversity.get(key), ref_text) if ref_text is not None else None
        stages[key] = MonocultureStage(
            text=text,
            attributes={
                name: DispersionComparison.from_dict(
                    compare_dispersion(
                        frame[name].cast(pl.String).to_list() if name in frame.columns else [],
                        reference[name].to_list(),
                    )
                )
                for name in names
            },
        )
    reference_figures = ReferenceFigures(
        path=spec.report.reference.path if spec.report.reference else None,
        rows=reference.height,
        text=ref_text,
        attributes={name: ValueDispersion.from_dict(value_dispersion(reference[name].to_list())) for name in names},
    )
    return Monoculture(reference=reference_figures, stages=MonocultureStages(**stages)), ref_nearest


def _stage_dispersion(figures: StageFigures, reference: TextDispersion) -> StageTextDispersion:
    """A stage's semantic spread, taken from its diversity figures (None below 2 records, as for the reference), and
    how it compares with the reference's."""
    enough = figures.rows >= 2
    gen_div, ref_div = figures.semantic_diversity if enough else None, reference.semantic_diversity
    both = gen_div is not None and ref_div is not None
    return StageTextDispersion(
        rows=figures.rows,
        semantic_diversity=gen_div,
        mean_pairwise_similarity=figures.mean_pairwise_similarity if enough else None,
        vendi_score=figures.vendi_score if enough else None,
        semantic_diversity_ratio=gen_div / ref_div if both and ref_div else None,
        narrower=bool(gen_div < ref_div) if both else None,
    )


def _text_dispersion(x: np.ndarray, sample: int, seed: int) -> TextDispersion:
    """The reference's semantic spread, computed as a stage's diversity figures are (same sample size and seed)."""
    if x.shape[0] < 2:
        return TextDispersion(
            rows=int(x.shape[0]), semantic_diversity=None, mean_pairwise_similarity=None, vendi_score=None
        )
    return TextDispersion(
        rows=int(x.shape[0]),
        semantic_diversity=semantic_diversity(x, seed=seed),
        mean_pairwise_similarity=mean_pairwise_similarity(x, seed=seed),
        vendi_score=vendi_score(x, max_rows=sample, seed=seed),
    )
