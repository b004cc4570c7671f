"""The build's bookkeeping (stages.summary): round rows, the stop reason, counts per stage and usage, from stage
results made by hand (no model, no Prefect)."""

from __future__ import annotations

import numpy as np
import polars as pl
from conftest import small_spec_dict

from polyculture.preflight import parse_spec
from polyculture.spec import RebalanceSpec
from polyculture.stages.dedup import DedupResult
from polyculture.stages.extract import ExtractResult
from polyculture.stages.generate import SHARD_RUNS_SCHEMA
from polyculture.stages.rebalance import RebalanceResult
from polyculture.stages.rejects import reject, rejects_frame
from polyculture.stages.summary import (
    Pool,
    all_rejects,
    budget_stop_reason,
    build_counts,
    build_usage,
    round_row,
    stop_reason,
    top_up_tokens_spent,
)
from polyculture.stages.validate import ValidationResult


def _records(ids: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"record_id": ids, "call_id": [i.rsplit("-", 1)[0] for i in ids], "text": ids})


def _completions(shards: list[int], tokens: list[int], seconds: list[float]) -> pl.DataFrame:
    return pl.DataFrame(
        {"shard": shards, "completion_tokens": tokens, "prompt_tokens": [10] * len(shards), "batch_seconds": seconds}
    )


def _pool(spec_extract: bool = False) -> Pool:
    completions = _completions([0, 0, 1], [30, 20, 50], [2.0, 2.0, 3.0])
    valid = _records(["c0-0", "c0-1", "c1-0", "c2-0"])
    validated = ValidationResult(
        records=valid,
        rejects=rejects_frame([
            reject("c2-1", "c2", "schema", "schema_violation", "x"),
            reject(None, "c3", "parse", "unparseable", "y"),
        ]),  # fmt: skip
    )
    deduped = DedupResult(
        kept=valid[:2],
        kept_embeddings=np.zeros((2, 4), dtype=np.float32),
        rejects=rejects_frame([
            reject("c1-0", "c1", "dedup", "exact_duplicate", "a"),
            reject("c2-0", "c2", "dedup", "near_duplicate", "b"),
        ]),  # fmt: skip
        clusters=pl.DataFrame(),
    )
    extracted = ExtractResult(records=valid[:2], embeddings=np.zeros((2, 4), dtype=np.float32), rejects=rejects_frame())
    cells = pl.DataFrame({"cell_key": ["a", "b"], "deficit": [0, 3], "available": [1, 1]})
    balanced = RebalanceResult(
        kept=valid[:1],
        kept_embeddings=np.zeros((1, 4), dtype=np.float32),
        rejects=rejects_frame([reject("c0-1", "c0", "rebalance", "surplus", "c")]),
        cells=cells,
        marginals=pl.DataFrame(),
    )
    return Pool(completions, validated, np.zeros((4, 4), dtype=np.float32), deduped, extracted, balanced)


def test_round_row_sums_shard_time_once_per_shard():
    pool = _pool()
    plan = pl.DataFrame({"n_prompts": [2, 1]})
    row = round_row(0, plan, pool.completions, pool)
    assert row == {
        "round": 0, "cells": 2, "prompts": 3, "completions": 3, "generated_tokens": 100,
        "generation_seconds": 5.0,  # shard 0 (2 s on both rows) + shard 1 (3 s)
        "unique_valid": 2, "final": 1, "short_cells": 1, "missing": 3,
    }  # fmt: skip
    assert pool.short_records == 3


def test_stop_reason_names_what_stopped_the_rounds():
    rounds_on = RebalanceSpec(top_up_rounds=2, top_up_max_tokens=500)
    assert stop_reason(rounds_on, short=False) == "every cell is full"
    assert stop_reason(rounds_on, short=True) == "stopped: all 2 top-up rounds used"
    assert stop_reason(RebalanceSpec(top_up_rounds=0), short=True) == (
        "stopped: top-up rounds are off (rebalance.top_up_rounds: 0)"
    )
    budget = budget_stop_reason(rounds_on, 1_234)
    assert budget == "stopped: the top-up token budget is spent (1,234 of 500 tokens)"
    assert stop_reason(rounds_on, short=True, budget_stop=budget) == budget
    # Round 0 is outside the top-up budget.
    assert top_up_tokens_spent([{"generated_tokens": 900}, {"generated_tokens": 40}, {"generated_tokens": 2}]) == 42


def test_counts_follow_the_records_stage_by_stage(spec_dir):
    spec = parse_spec(small_spec_dict(), spec_dir)
    pool = _pool()
    plans = [pl.DataFrame({"n_prompts": [2, 1]}), pl.DataFrame({"n_prompts": [4]})]
    assert build_counts(spec, plans, pool) == {
        "target": spec.target_size,
        "prompts": 7,
        "completions": 3,
        "candidates": 5,  # 4 valid + 1 schema reject with a record id (the unparseable call has none)
        "valid": 4,
        "after_exact_dedup": 3,
        "after_semantic_dedup": 2,
        "final": 1,
        "salvaged": 0,  # valid records read from answers cut short
    }
    stages = all_rejects(pool)["stage"].to_list()
    assert stages == ["schema", "parse", "dedup", "dedup", "rebalance"]


def test_usage_counts_workers_and_engine_loads():
    pool = _pool()
    runs = pl.DataFrame(
        [
            {"round": 0, "shard": 0, "prompts": 2, "worker": "h:1", "seconds": 4.0, "engine_load_seconds": 1.5,
             "completion_tokens": 50},
            {"round": 0, "shard": 1, "prompts": 1, "worker": "h:2", "seconds": 3.0, "engine_load_seconds": 2.25,
             "completion_tokens": 50},
            {"round": 1, "shard": 0, "prompts": 1, "worker": "h:1", "seconds": 1.0, "engine_load_seconds": 0.0,
             "completion_tokens": 0},
        ],
        schema=SHARD_RUNS_SCHEMA,
    )  # fmt: skip
    rounds = [{"generation_seconds": 5.0}, {"generation_seconds": 0.0}]
    usage = build_usage(rounds, pool.completions, runs, generation_wall=4.567)
    assert usage == {
        "prompt_tokens": 30,
        "generated_tokens": 100,
        "generation_seconds": 5.0,
        "generated_tokens_per_second": 20.0,
        "generation_wall_seconds": 4.57,
        "engine_load_seconds": 2.25,
        "workers": 2,
        "engine_loads": 2,
    }
    empty = build_usage([], pool.completions.clear(), pl.DataFrame(schema=SHARD_RUNS_SCHEMA), 0.0)
    assert empty["workers"] == 0 and empty["generated_tokens_per_second"] == 0.0
    assert "quality_tokens" not in usage  # no quality checks: no cost line


def test_quality_cost_is_per_round_and_summed_in_usage():
    from dataclasses import replace

    from polyculture.stages.quality import CheckCounts, QualityResult

    pool = _pool()
    counts = [CheckCounts("verified", "math_answer", True, 4, 1, 3, 0, None, tokens=1200, seconds=3.5),
              CheckCounts("short", "expression", True, 4, 4, 0, 0, None)]  # fmt: skip
    empty = pl.DataFrame()
    scored = replace(pool, quality=QualityResult(empty, np.zeros((0, 4)), empty, empty, tuple(counts)))
    row = round_row(0, pl.DataFrame({"n_prompts": [1]}), pool.completions, scored)
    assert (row["quality_tokens"], row["quality_seconds"]) == (1200, 3.5)
    rounds = [{**row, "generation_seconds": 1.0}, {"generation_seconds": 1.0, "quality_tokens": 300,
                                                   "quality_seconds": 1.25}]  # fmt: skip
    usage = build_usage(rounds, pool.completions, pl.DataFrame(schema=SHARD_RUNS_SCHEMA), 0.0)
    assert (usage["quality_tokens"], usage["quality_seconds"]) == (1500, 4.75)



def test_short_records_count_marginal_shortfalls_too():
    pool = _pool()
    assert pool.short_records == 3  # joint cells: their deficits
    marginals = pl.DataFrame({"attribute": ["topic", "topic", "level"], "value": ["a", "b", "x"],
                              "deficit": [4, 5, 2]})  # fmt: skip
    cells = pl.DataFrame({"cell_key": ["a", "b"], "deficit": [0, 0], "available": [1, 1]})
    balanced = RebalanceResult(kept=pool.balanced.kept, kept_embeddings=pool.balanced.kept_embeddings,
                               rejects=pool.balanced.rejects, cells=cells, marginals=marginals)  # fmt: skip
    marginal_pool = Pool(pool.completions, pool.validated, pool.embeddings, pool.deduped, pool.extracted, balanced)
    assert marginal_pool.short_records == 9  # marginal targets: cells carry no deficit; topic is 9 short
