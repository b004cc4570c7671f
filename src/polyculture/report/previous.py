"""Since the previous release: release-over-release drift of an ordinary build (`report.previous`).

`runs.previous.locate_previous_run(spec, dataset_root, current)` finds the run folder to compare with: `auto` takes the newest
finished run of the same dataset (run ids start with their UTC start time, so the newest sorts last), a path must
be a finished run folder; a bad path is a SpecError naming `report.previous`, raised before any model time.
`load_previous_release` reads its report.json and its published records (record ids from the published parquet,
texts from its validated.parquet: the exact texts that run embedded). The build embeds those texts with its own
embedder and `since_previous` puts each diversity and attribute figure then and now side by side, with the share of
the new final records that have a previous record at or above the dedup threshold (cosine): a scheduled build shows
drift, and how much of a release repeats the last one, without running the generations loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FIELD", "PreviousRelease", "load_previous_release", "locate_previous_run", "since_previous"]

import numpy as np
import polars as pl

from polyculture.index.similarity import SimilarityIndex, choose_index
from polyculture.index.vectors import normalise_rows
from polyculture.report.model import DIVERSITY_ROWS, AttributeFigures, DriftRow, SincePrevious, StageFigures
from polyculture.runs.previous import FIELD, locate_previous_run
from polyculture.spec import BuildSpec, SpecError
from polyculture.stages.publish import dataset_folder_name

# (key, label, decimals) of each attribute's figures compared (AttributeSummary keys, final records).
ATTRIBUTE_ROWS: tuple[tuple[str, str, int], ...] = (
    ("entropy_bits", "entropy (bits)", 3),
    ("normalized_entropy", "normalised entropy", 3),
    ("coverage", "coverage of its values", 3),
    ("total_variation", "total variation from target", 3),
)


@dataclass(frozen=True)
class PreviousRelease:
    run_dir: Path
    report: dict[str, Any]  # its report.json
    records: pl.DataFrame  # record_id, text: its published records


def load_previous_release(run_dir: Path) -> PreviousRelease:
    """Its report.json and published records (record_id, text); a damaged folder is a SpecError naming the field."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
        dataset = run_dir / dataset_folder_name(str(report["dataset"]), run_dir.name)
        # publish writes the record id as `_record_id` (stages.publish.METADATA_COLUMNS)
        published = pl.read_parquet(sorted((dataset / "data").glob("*.parquet")), columns=["_record_id"])
        published = published.rename({"_record_id": "record_id"})
        texts = pl.read_parquet(run_dir / "validated.parquet", columns=["record_id", "text"])
    except (OSError, ValueError, KeyError, pl.exceptions.PolarsError) as exc:
        raise SpecError(f"{FIELD}: cannot read the previous release in '{run_dir}': {exc}") from None
    records = published.join(texts.unique("record_id"), on="record_id", how="left").filter(pl.col("text").is_not_null())
    return PreviousRelease(run_dir, report, records)


def since_previous(
    spec: BuildSpec,
    previous: PreviousRelease,
    previous_embeddings: np.ndarray,
    final: StageFigures,
    attributes: dict[str, AttributeFigures],
    final_embeddings: np.ndarray | None,
) -> SincePrevious:
    """Then-and-now rows (final records of each release) and the share of new records near a previous one."""
    then = previous.report
    then_final = (then.get("diversity") or {}).get("after") or {}
    rows = [_row(label, then_final.get(key), getattr(final, key), digits) for key, label, digits in DIVERSITY_ROWS]
    then_attributes = then.get("attributes") or {}
    for name, figures in attributes.items():
        then_after = (then_attributes.get(name) or {}).get("after") or {}
        now_after = figures.after.to_dict()
        rows += [
            _row(f"{name}: {label}", then_after.get(key), now_after.get(key), digits)
            for key, label, digits in ATTRIBUTE_ROWS
        ]
    near = None
    if final_embeddings is not None and len(final_embeddings) and len(previous_embeddings):
        old = normalise_rows(np.asarray(previous_embeddings, dtype=np.float32))
        index = SimilarityIndex.build(old, choose_index(len(old), spec.dedup.index, "cpu"), seed=spec.seed)
        found = index.neighbors(normalise_rows(np.asarray(final_embeddings, dtype=np.float32)), spec.dedup.threshold)
        near = int((np.diff(found.lims) > 0).sum())
    rows_now = 0 if final_embeddings is None else len(final_embeddings)
    return SincePrevious(
        run_id=previous.run_dir.name,
        path=str(previous.run_dir),
        records_then=int(previous.records.height),
        records_now=int(final.rows),
        threshold=spec.dedup.threshold,
        near_previous=near,
        near_previous_share=near / rows_now if near is not None and rows_now else None,
        rows=tuple(rows),
    )


def _row(figure: str, then: Any, now: Any, digits: int) -> DriftRow:
    previous, current = _number(then), _number(now)
    change = current - previous if previous is not None and current is not None else None
    return DriftRow(figure=figure, digits=digits, previous=previous, current=current, change=change)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
