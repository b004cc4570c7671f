"""Attribute targets against what each stage holds: the validated records, the pool rebalancing chose from, the final
records (metrics.attribute over each)."""

from __future__ import annotations

import polars as pl

from polyculture.metrics.attribute import attribute_summary
from polyculture.report.model import AttributeFigures, AttributeSummary
from polyculture.spec import Attribute, BuildSpec
from polyculture.stages.plan import largest_remainder


def attribute_figures(
    spec: BuildSpec, validated: pl.DataFrame, pool: pl.DataFrame, final: pl.DataFrame, cells: pl.DataFrame
) -> dict[str, AttributeFigures]:
    """Per attribute of the spec: its exact target counts and its spread at each stage. `pool` is what rebalancing
    chose from (validated, deduplicated, attributes extracted)."""
    attributes: dict[str, AttributeFigures] = {}
    for attr in spec.attributes:
        target_counts = _target_counts(attr, cells, spec.target_size)
        total = sum(target_counts.values())
        # A joint table sets the marginals itself; otherwise they are the attribute's own weights.
        from_table = spec.rebalance.targets == "table" and total
        target = {v: c / total for v, c in target_counts.items()} if from_table else attr.target_distribution()
        # An extracted attribute does not exist before extraction: its "validated" column is the pool's.
        before_frame = pool if attr.source == "extract" else validated

        def summary(frame: pl.DataFrame, label: str) -> AttributeSummary:
            return AttributeSummary.from_dict(attribute_summary(_column(frame, attr.name, label), target))

        attributes[attr.name] = AttributeFigures(
            source=attr.source,
            field=attr.record_field if attr.source != "extract" else None,
            target_counts=target_counts,
            before=summary(before_frame, "validated"),
            before_rebalance=summary(pool, "pool"),
            after=summary(final, "final"),
        )
    return attributes


def _column(frame: pl.DataFrame, name: str, label: str) -> pl.Series:
    if name not in frame.columns:
        if frame.height == 0:
            return pl.Series(name, [], dtype=pl.String)  # an empty stage has no columns to speak of
        raise ValueError(f"the {label} records frame has no column for attribute '{name}' (columns: {frame.columns})")
    return frame[name].cast(pl.String)


def _target_counts(attr: Attribute, cells: pl.DataFrame, target_size: int) -> dict[str, int]:
    """Exact target counts per value: the rebalance cells' targets summed (prompt attributes), else the marginal."""
    if attr.name in cells.columns and "target" in cells.columns and cells.height:
        sums = cells.group_by(attr.name).agg(pl.col("target").sum())
        by_value = dict(zip(sums[attr.name].to_list(), sums["target"].to_list(), strict=True))
        return {v: int(by_value.get(v) or 0) for v in attr.values}
    weights = attr.weights or [1.0] * len(attr.values)
    return dict(zip(attr.values, largest_remainder(target_size, weights), strict=True))
