"""top_up: the next generation round for the cells still short of their quota, and why a cell ended short.

A top-up cell is a joint cell that rebalancing could not fill. Its prompt-conditioned attributes are set as in the
first round; its field and extract attributes cannot be set by the pipeline, so the prompt carries a hint per
attribute (`rebalance.hint`) and the value is still read from the record afterwards. How many prompts a cell gets
comes from the yield observed so far (unique records landing in the cell per prompt sent for it), so a cell the
model rarely produces gets more prompts, bounded by the token budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from polyculture.spec import BuildSpec
from polyculture.stages.plan import cell_key, items_per_call
from polyculture.stages.prompts import HINTS_COLUMN

# A cell nothing has landed in yet is planned at this share of the overall yield, so it gets prompts without
# an unbounded request (the token budget and the round limit bound the rest).
MIN_YIELD_SHARE = 0.25


@dataclass(frozen=True)
class RoundStats:
    """What the rounds so far cost and produced, for sizing the next one."""

    prompts_by_cell: dict[str, int]  # joint cell key -> prompts sent that could land there
    records_by_cell: dict[str, int]  # joint cell key -> unique in-target records available
    prompts: int
    generated_tokens: int


def top_up_cells(
    spec: BuildSpec,
    shortfalls: Sequence[tuple[dict[str, str], int]],
    stats: RoundStats,
    *,
    first_cell_id: int,
    token_budget_left: int | None,
) -> pl.DataFrame:
    """A plan frame (the columns `plan` gives, plus `hints`) for one top-up round; empty when nothing is wanted or the
    budget cannot pay for a single prompt."""
    prompt_attrs = [a.name for a in spec.prompt_attributes]
    steered = [a.name for a in spec.attributes if a.source != "prompt"]
    per_prompt_items = spec.sampling.n * items_per_call(spec)
    overall = (sum(stats.records_by_cell.values()) / stats.prompts) if stats.prompts else per_prompt_items
    floor = max(overall * MIN_YIELD_SHARE, 1e-3)
    wanted_prompts = []
    for cell, missing in shortfalls:
        key = cell_key(cell)
        sent = stats.prompts_by_cell.get(key, 0)
        got = stats.records_by_cell.get(key, 0)
        cell_yield = max(got / sent if sent else overall, floor)
        wanted_prompts.append(math.ceil(missing * spec.rebalance.top_up_oversample / cell_yield))
    tokens_per_prompt = stats.generated_tokens / stats.prompts if stats.prompts else spec.sampling.max_tokens
    if token_budget_left is not None and wanted_prompts:
        affordable = int(token_budget_left // max(tokens_per_prompt, 1.0))
        total = sum(wanted_prompts)
        if affordable <= 0:
            return _empty(spec)
        if total > affordable:  # scale every cell down alike, keeping at least one prompt while the budget lasts
            wanted_prompts = [max(1, math.floor(w * affordable / total)) for w in wanted_prompts]
            while sum(wanted_prompts) > affordable:
                wanted_prompts[wanted_prompts.index(max(wanted_prompts))] -= 1
    rows = []
    for offset, ((cell, missing), n_prompts) in enumerate(zip(shortfalls, wanted_prompts, strict=True)):
        if n_prompts <= 0:
            continue
        rows.append(
            {
                "cell_id": first_cell_id + offset,
                "cell_key": cell_key(cell),
                **{name: cell[name] for name in prompt_attrs},
                "quota": missing,
                "n_prompts": n_prompts,
                HINTS_COLUMN: json.dumps({name: cell[name] for name in steered}, ensure_ascii=False),
            }
        )
    return pl.DataFrame(rows, schema=_schema(spec)) if rows else _empty(spec)


def prompts_by_cell(spec: BuildSpec, plans: Sequence[pl.DataFrame], cells: pl.DataFrame) -> dict[str, int]:
    """Prompts sent that could land in each joint cell: a first-round prompt counts for every joint cell sharing its
    prompt-attribute values; a top-up prompt counts for the one cell it was hinted at."""
    prompt_attrs = [a.name for a in spec.prompt_attributes]
    out: dict[str, int] = {}
    joint = [{a.name: row[a.name] for a in spec.attributes} for row in cells.iter_rows(named=True)]
    for frame in plans:
        hinted = HINTS_COLUMN in frame.columns
        for row in frame.iter_rows(named=True):
            if hinted:
                key = row["cell_key"]
                out[key] = out.get(key, 0) + int(row["n_prompts"])
                continue
            for cell in joint:
                if all(cell[name] == row[name] for name in prompt_attrs):
                    key = cell_key(cell)
                    out[key] = out.get(key, 0) + int(row["n_prompts"])
    return out


def explain_shortfalls(cells: pl.DataFrame, prompts: dict[str, int], rounds: int, stop_reason: str) -> pl.DataFrame:
    """Replace each short cell's reason by the whole story: prompts, what survived, and why generation stopped."""
    reasons = []
    for row in cells.iter_rows(named=True):
        if not row["deficit"]:
            reasons.append(row["reason"])
            continue
        sent = prompts.get(row["cell_key"], 0)
        reasons.append(
            f"short by {row['deficit']}: {sent} prompts over {rounds} round(s) left {row['available']} valid unique "
            f"records in this cell (target {row['target']}); {stop_reason}"
            + (f" [{row['reason']}]" if row["reason"] and not row["reason"].startswith("only ") else "")
        )
    return cells.with_columns(pl.Series("reason", reasons, dtype=pl.String))


def _schema(spec: BuildSpec) -> dict[str, pl.DataType]:
    schema: dict[str, pl.DataType] = {"cell_id": pl.Int64, "cell_key": pl.String}
    schema |= {a.name: pl.String for a in spec.prompt_attributes}
    return schema | {"quota": pl.Int64, "n_prompts": pl.Int64, HINTS_COLUMN: pl.String}


def _empty(spec: BuildSpec) -> pl.DataFrame:
    return pl.DataFrame(schema=_schema(spec))
