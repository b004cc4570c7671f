"""What did not make it: rejected records grouped by stage and reason, and rebalance cells short of their target."""

from __future__ import annotations

import polars as pl

from polyculture.index.text import clip
from polyculture.report.model import RejectGroup, Rejects, ShortCell

REJECT_EXAMPLES = 3
EXAMPLE_CHARS = 200  # reject details can hold whole completions; the report only needs a glimpse
REJECT_COLUMNS = ("record_id", "call_id", "stage", "reason", "detail")
SHORT_CELL_COLUMNS = ("cell_key", "target", "available", "kept", "deficit", "reason")


def rejects_or_empty(rejects: pl.DataFrame) -> pl.DataFrame:
    """The rejects frame, or an empty one with the contract's columns when none (or a column-less frame) is given."""
    if rejects.height == 0 and not set(REJECT_COLUMNS) <= set(rejects.columns):
        return pl.DataFrame(schema={c: pl.String for c in REJECT_COLUMNS})
    return rejects


def failed_calls(rejects: pl.DataFrame) -> int:
    """Calls whose whole answer could not be read (as opposed to single bad items inside a readable answer)."""
    return rejects.filter((pl.col("stage") == "parse") & pl.col("record_id").is_null()).height


def reject_groups(rejects: pl.DataFrame) -> Rejects:
    """Rejects by (stage, reason), most frequent first, each with a few distinct clipped details."""
    if rejects.height == 0:
        return Rejects(total=0, by_reason=())
    grouped = (
        rejects.group_by("stage", "reason", maintain_order=True)
        .agg(
            pl.len().alias("count"),
            pl.col("detail").drop_nulls().unique(maintain_order=True).head(REJECT_EXAMPLES).alias("examples"),
        )
        .sort(["count", "stage", "reason"], descending=[True, False, False])
    )
    groups = tuple(
        RejectGroup(
            stage=row["stage"],
            reason=row["reason"],
            count=int(row["count"]),
            examples=tuple(clip(d, EXAMPLE_CHARS) for d in row["examples"]),
        )
        for row in grouped.iter_rows(named=True)
    )
    return Rejects(total=int(rejects.height), by_reason=groups)


def short_cells(cells: pl.DataFrame) -> tuple[ShortCell, ...]:
    """Cells with a deficit, largest first (the cells frame's columns among SHORT_CELL_COLUMNS)."""
    if cells.height == 0 or "deficit" not in cells.columns:
        return ()
    wanted = [c for c in SHORT_CELL_COLUMNS if c in cells.columns]
    short = cells.filter(pl.col("deficit") > 0).sort(["deficit", "cell_key"], descending=[True, False])
    return tuple(ShortCell(**row) for row in short.select(wanted).iter_rows(named=True))
