"""summary: a build's bookkeeping over its stage results: one row per generation round, why the rounds stopped, the
record counts stage by stage, and what generation cost. Pure functions over frames; the flow only calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from polyculture.spec import BuildSpec, RebalanceSpec
from polyculture.stages.decontaminate import DecontaminationResult
from polyculture.stages.dedup import DedupResult
from polyculture.stages.extract import ExtractResult
from polyculture.stages.quality import QualityResult
from polyculture.stages.rebalance import RebalanceResult
from polyculture.stages.validate import ValidationResult, salvaged_records

EXACT_DUPLICATE_REASONS = ("exact_duplicate", "exact_in_reference")


@dataclass(frozen=True)
class Pool:
    """Everything generated so far and what one pass of validate -> embed -> dedup -> decontaminate -> quality ->
    extract -> rebalance made of it (`decontaminated` None: the stage is off; `quality` None: a build without quality
    checks, or one put together before the stage existed)."""

    completions: pl.DataFrame
    validated: ValidationResult
    embeddings: np.ndarray  # rows aligned with validated.records
    deduped: DedupResult
    extracted: ExtractResult
    balanced: RebalanceResult
    quality: QualityResult | None = None
    decontaminated: DecontaminationResult | None = None

    @property
    def short_records(self) -> int:
        """Records still missing: the cells' deficits, or (marginal targets, where cells may trade and carry no
        deficit) the marginals' largest one."""
        cells, marginals = self.balanced.cells, self.balanced.marginals
        by_cell = int(cells["deficit"].sum()) if cells.height else 0
        by_marginal = int(marginals.group_by("attribute").agg(pl.col("deficit").sum())["deficit"].max() or 0) if (
            marginals.height and "attribute" in marginals.columns) else 0  # fmt: skip
        return max(by_cell, by_marginal)


def round_row(round_no: int, cells: pl.DataFrame, new: pl.DataFrame, pool: Pool) -> dict[str, Any]:
    """What one round sent (its plan `cells`), generated (`new` completions) and what the pool held after it."""
    balanced_cells = pool.balanced.cells
    return {
        "round": round_no,
        "cells": cells.height,
        "prompts": int(cells["n_prompts"].sum()) if cells.height else 0,
        "completions": new.height,
        "generated_tokens": int(new["completion_tokens"].sum()) if new.height else 0,
        # Shard-level timing is repeated on each of a shard's rows: sum it once per shard.
        "generation_seconds": round(float(new.unique("shard")["batch_seconds"].sum()), 2) if new.height else 0.0,
        "unique_valid": pool.deduped.kept.height,
        "final": pool.balanced.kept.height,
        "short_cells": balanced_cells.filter(pl.col("deficit") > 0).height if balanced_cells.height else 0,
        "missing": int(balanced_cells["deficit"].sum()) if balanced_cells.height else 0,
        **(_quality_cost(pool.quality.counts) if pool.quality is not None else {}),
    }


def _quality_cost(counts: Sequence[Any]) -> dict[str, Any]:
    """Engine tokens and seconds the round's quality pass spent scoring: math_answer's solutions (the other checks
    do not count theirs yet). Records scored in an earlier round or run are cached and cost nothing."""
    return {
        "quality_tokens": int(sum(c.tokens for c in counts)),
        "quality_seconds": round(float(sum(c.seconds for c in counts)), 2),
    }


def top_up_tokens_spent(rounds: Sequence[dict[str, Any]]) -> int:
    """Generated tokens of the top-up rounds so far (round 0 is the first round, outside the top-up budget)."""
    return sum(r["generated_tokens"] for r in rounds[1:])


def budget_stop_reason(settings: RebalanceSpec, spent: int) -> str:
    return f"stopped: the top-up token budget is spent ({spent:,} of {settings.top_up_max_tokens or 0:,} tokens)"


def stop_reason(settings: RebalanceSpec, short: bool, budget_stop: str | None = None) -> str:
    """Why generation stopped: the budget (when it stopped the rounds), every cell full, or the rounds ran out."""
    if budget_stop is not None:
        return budget_stop
    if not short:
        return "every cell is full"
    if settings.top_up_rounds == 0:
        return "stopped: top-up rounds are off (rebalance.top_up_rounds: 0)"
    return f"stopped: all {settings.top_up_rounds} top-up rounds used"


def build_counts(spec: BuildSpec, plans: Sequence[pl.DataFrame], pool: Pool) -> dict[str, int]:
    """Records after each stage, from the prompts sent to the records published; then `salvaged`: the valid records
    read from answers cut short (a part of `valid`, not a stage)."""
    records = pool.validated.records
    rejects = pool.validated.rejects
    exact_dups = pool.deduped.rejects.filter(pl.col("reason").is_in(EXACT_DUPLICATE_REASONS)).height
    return {
        "target": spec.target_size,
        "prompts": sum(int(p["n_prompts"].sum()) for p in plans),
        "completions": pool.completions.height,
        "candidates": records.height + rejects.filter(pl.col("record_id").is_not_null()).height,
        "valid": records.height,
        "after_exact_dedup": records.height - exact_dups,
        "after_semantic_dedup": pool.deduped.kept.height,
        **({"after_decontaminate": pool.decontaminated.kept.height} if pool.decontaminated is not None else {}),
        **({"after_quality": pool.quality.records.height} if spec.quality and pool.quality is not None else {}),
        **({"after_extract": pool.extracted.records.height} if spec.extract_attributes else {}),
        "final": pool.balanced.kept.height,
        "salvaged": salvaged_records(pool.validated),
    }


def build_usage(
    rounds: Sequence[dict[str, Any]], completions: pl.DataFrame, shard_runs: pl.DataFrame, generation_wall: float
) -> dict[str, float]:
    """Tokens, engine time and workers of the whole build (`shard_runs`: the shards generated by this invocation)."""
    generation_seconds = sum(r["generation_seconds"] for r in rounds)
    generated_tokens = int(completions["completion_tokens"].sum()) if completions.height else 0
    loads = shard_runs["engine_load_seconds"].to_list() if shard_runs.height else []
    return {
        "prompt_tokens": int(completions["prompt_tokens"].sum()) if completions.height else 0,
        "generated_tokens": generated_tokens,
        "generation_seconds": round(generation_seconds, 2),
        "generated_tokens_per_second": round(generated_tokens / generation_seconds, 1) if generation_seconds else 0.0,
        # Wall time of the generation rounds: with several workers, less than the shards' summed engine time.
        "generation_wall_seconds": round(generation_wall, 2),
        "engine_load_seconds": round(max(loads, default=0.0), 2),
        "workers": shard_runs["worker"].n_unique() if shard_runs.height else 0,
        "engine_loads": sum(1 for seconds in loads if seconds > 0),
        **_summed_quality_cost(rounds),
    }


def _summed_quality_cost(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not any("quality_tokens" in r for r in rounds):
        return {}
    return {
        "quality_tokens": sum(int(r.get("quality_tokens") or 0) for r in rounds),
        "quality_seconds": round(sum(float(r.get("quality_seconds") or 0.0) for r in rounds), 2),
    }


def all_rejects(pool: Pool) -> pl.DataFrame:
    """Every stage's rejects, in stage order."""
    decontaminated = [pool.decontaminated.rejects] if pool.decontaminated is not None else []
    quality = [pool.quality.rejects] if pool.quality is not None else []
    parts = [pool.validated.rejects, pool.deduped.rejects, *decontaminated, *quality, pool.extracted.rejects,
             pool.balanced.rejects]  # fmt: skip
    return pl.concat(parts, how="vertical")
