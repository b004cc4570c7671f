"""The embedding map's points: a seeded sample of the validated records (and of the reference dataset), each with
its fate (kept, cut by rebalancing, dropped by dedup) and its first attribute's final value; drawn by report.plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from polyculture.report.diversity import Frames, embedding_rows
from polyculture.report.plots import plot_embedding_map, project_2d
from polyculture.spec import BuildSpec


def embedding_map(
    spec: BuildSpec,
    frames: Frames,
    reference: pl.DataFrame | None,
    reference_embeddings: np.ndarray | None,
    plots_dir: Path,
) -> str | None:
    """A 2-D map of a seeded sample of the validated records (and of the reference), by fate and first attribute;
    its path relative to the report folder, or None when there are too few records to draw."""
    validated, embeddings = frames["before"]
    x = embedding_rows(validated, embeddings, "validated")
    if x.shape[0] < 3 or "record_id" not in validated.columns:
        return None
    sample, seed = spec.report.sample, spec.seed
    rng = np.random.default_rng(seed)
    rows = np.arange(x.shape[0])
    if len(rows) > sample:
        rows = np.sort(rng.choice(len(rows), size=sample, replace=False))
    # Only the sampled records' fates are looked up (polars is_in), never a set of a million ids.
    ids = validated["record_id"].cast(pl.String).gather(rows)
    kept = ids.is_in(_ids(frames["after"][0]).implode()).to_list()
    in_pool = ids.is_in(_ids(frames["after_dedup"][0]).implode()).to_list() if "after_dedup" in frames else None
    fates = []
    for i, is_kept in enumerate(kept):
        if is_kept:
            fates.append("kept")
        elif in_pool is None:
            fates.append("not kept")  # without the pool, dedup and rebalancing cannot be told apart
        elif not in_pool[i]:
            fates.append("dropped by dedup")
        else:
            fates.append("cut by rebalancing")
    vectors = [x[rows]]
    if reference is not None and reference_embeddings is not None and reference.height:
        ref_x = embedding_rows(reference, reference_embeddings, "reference")
        ref_rows = np.arange(ref_x.shape[0])
        if len(ref_rows) > sample:
            ref_rows = np.sort(rng.choice(len(ref_rows), size=sample, replace=False))
        if ref_x.shape[1] == x.shape[1]:
            vectors.append(ref_x[ref_rows])
            fates += ["reference"] * len(ref_rows)
    coords = project_2d(np.vstack(vectors), spec.report.map, seed)
    if coords is None:
        return None
    # The right panel colours the kept records by the first attribute, as the final frame has it (an extracted
    # attribute does not exist in the validated frame).
    attribute = spec.attributes[0].name if spec.attributes else None
    final = frames["after"][0]
    values = None
    if attribute is not None and attribute in final.columns and "record_id" in final.columns:
        sampled = pl.DataFrame({"record_id": ids})
        by_id = final.select(pl.col("record_id").cast(pl.String), pl.col(attribute).cast(pl.String).alias("value"))
        # A left join keeps the sample's order; record ids are unique in the final frame.
        values = sampled.join(by_id, on="record_id", how="left", maintain_order="left")["value"].to_list()
        values += [None] * (len(fates) - len(rows))
    return plot_embedding_map(coords, fates, values, plots_dir, method=spec.report.map, attribute=attribute)


def _ids(frame: pl.DataFrame) -> pl.Series:
    if "record_id" not in frame.columns:
        return pl.Series("record_id", [], dtype=pl.String)
    return frame["record_id"].cast(pl.String)
