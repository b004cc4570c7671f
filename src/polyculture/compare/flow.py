"""compare_methods: run several prompting methods on one spec under the same generated-token budget, as Prefect tasks.

One engine is loaded once and shared by every method. Per method: generate in rounds until the budget is spent ->
validate -> embed -> the spec's quality checks (compare.quality: the same engine scores fluency, a quantile is
resolved once over all methods) -> metrics (compare.budget, compare.metrics and the stages they use); then
comparison.json, comparison.md and comparison.png under <output root or publish.dir>/<dataset>/compare-<run-id>/. A method that cannot run (not
implemented, options that do not fit it, an error while it ran) is reported as failed; the others still run.
Generation shards already in the folder are reused, so re-running with the same run id resumes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import flow, task
from prefect.cache_policies import NONE

from polyculture import progress
from polyculture.compare.budget import (
    ALL_METHODS,
    BudgetedGeneration,
    generate_within_budget,
    method_spec,
    parse_methods,
    validate_rounds,
)
from polyculture.compare.metrics import comparison_report, failed_method, method_metrics
from polyculture.compare.quality import check_entries, shared_checks
from polyculture.compare.render import write_comparison
from polyculture.engines.base import Engine
from polyculture.flows.common import close_shared_engines, embed_task, judge_engines, load_engine
from polyculture.methods import Method, get_method
from polyculture.preflight import load_spec
from polyculture.runs.folders import new_run_id
from polyculture.spec import BuildSpec
from polyculture.stages.plan import plan
from polyculture.stages.quality import ScoreCache, quality
from polyculture.stages.validate import ValidationResult

DEFAULT_BUDGET_TOKENS = 2000


@task(name="generate-within-budget", cache_policy=NONE)
def generate_task(
    spec: BuildSpec, cells: pl.DataFrame, engine: Engine, method: Method, budget_tokens: int, shard_dir: Path
) -> BudgetedGeneration:
    stage = f"gen {spec.method.name}"
    progress.report(stage, 0, budget_tokens, "tokens")

    def on_round(number: int, used: int, prompts: int) -> None:
        progress.report(stage, min(used, budget_tokens), budget_tokens, f"{used:,} tokens, {prompts} prompts, round {number + 1}")

    return generate_within_budget(spec, cells, engine, method, budget_tokens, shard_dir, on_round=on_round)


@task(name="validate-rounds", cache_policy=NONE)
def validate_task(spec: BuildSpec, generation: BudgetedGeneration, method: Method) -> ValidationResult:
    return validate_rounds(spec, generation.rounds, method)


@task(name="quality-scores", cache_policy=NONE)
def score_task(
    spec: BuildSpec, validated: ValidationResult, embeddings: np.ndarray, engine: Engine, known: ScoreCache
) -> None:
    """Fill `known` with every check's score of the method's valid records (verdicts wait for the shared thresholds)."""
    quality(
        validated.records, embeddings, spec.quality, engine=engine, judge_engines=judge_engines(spec),
        base_dir=spec.base_dir, known=known,
    )  # fmt: skip


@task(name="method-metrics", cache_policy=NONE)
def metrics_task(
    spec: BuildSpec,
    generation: BudgetedGeneration,
    validated: ValidationResult,
    embeddings: np.ndarray,
    quality_scores: pl.DataFrame | None = None,
) -> dict[str, Any]:
    completions = generation.completions
    result = method_metrics(
        spec,
        method=spec.method.name,
        completions=completions,
        records=validated.records,
        rejects=validated.rejects,
        embeddings=embeddings,
        budget_tokens=generation.budget_tokens,
        rounds=len(generation.rounds),
        seed=spec.seed,
        quality_scores=quality_scores,
    )
    return result | {"stop_reason": generation.stop_reason, "prompts": generation.prompts}


@flow(name="compare_methods", log_prints=False)
def compare_methods(
    spec_path: str,
    methods: list[str] | str | None = None,
    budget_tokens: int = DEFAULT_BUDGET_TOKENS,
    run_id: str | None = None,
    output_root: str | None = None,
) -> dict[str, Any]:
    """Compare `methods` (default: all seven) on the spec at `spec_path`; returns the comparison (as written to
    comparison.json, with a `files` entry naming comparison.json, comparison.md and the chart)."""
    wall_started = time.perf_counter()
    spec = load_spec(spec_path)
    names = parse_methods(methods if methods is not None else list(ALL_METHODS))
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
    run_id = run_id or new_run_id(spec)
    out_dir = Path(output_root or spec.publish.dir) / spec.name / f"compare-{run_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, out_dir / "spec.yaml")

    # Methods that cannot run at all are reported before the model is loaded.
    runnable: list[tuple[BuildSpec, Method]] = []
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            spec_m = method_spec(spec, name)
            runnable.append((spec_m, get_method(spec_m.method)))
        except ValueError as exc:
            results[name] = failed_method(name, str(exc))

    cells = plan(spec)
    load_seconds = 0.0
    # Per method that ran: what the metrics need, and its quality score cache (record ids repeat across methods).
    ran: dict[str, tuple[BuildSpec, BudgetedGeneration, ValidationResult, np.ndarray, ScoreCache]] = {}
    if runnable:
        engine, load_seconds = load_engine(spec)
        try:
            for spec_m, method in runnable:
                name = spec_m.method.name
                method_dir = out_dir / "methods" / name
                method_dir.mkdir(parents=True, exist_ok=True)
                try:
                    generation = generate_task(spec_m, cells, engine, method, budget_tokens, method_dir / "generate")
                    validated = validate_task(spec_m, generation, method)
                    validated.records.write_parquet(method_dir / "validated.parquet")
                    validated.rejects.write_parquet(method_dir / "rejects.parquet")
                    embeddings = embed_task(spec_m, validated.records["text"].to_list())
                    known: ScoreCache = {}
                    if spec.quality:
                        score_task(spec_m, validated, embeddings, engine, known)
                    ran[name] = (spec_m, generation, validated, embeddings, known)
                except Exception as exc:  # one method's failure must not cost the others' results
                    results[name] = failed_method(name, f"{type(exc).__name__}: {exc}")
                progress.report("methods", len(results) + len(ran), len(names), name)
        finally:
            engine.close()
            close_shared_engines()  # the judges' own models

    # Every method judged by the same thresholds, from its cached scores (no engine needed any more).
    checks = shared_checks(spec.quality, [known for *_, known in ran.values()])
    for name, (spec_m, generation, validated, embeddings, known) in ran.items():
        try:
            scores = None
            if checks:
                judged = quality(validated.records, embeddings, checks, base_dir=spec.base_dir, known=known)
                scores = judged.scores
            results[name] = metrics_task(spec_m, generation, validated, embeddings, scores)
        except Exception as exc:
            results[name] = failed_method(name, f"{type(exc).__name__}: {exc}")

    ordered = [results[name] for name in names]
    usage = {"engine_load_seconds": round(load_seconds, 2), "wall_seconds": round(time.perf_counter() - wall_started, 2)}
    report = comparison_report(
        spec, ordered, run_id=run_id, budget_tokens=budget_tokens, usage=usage,
        quality_checks=check_entries(spec.quality, checks),
    )  # fmt: skip
    report["run_dir"] = str(out_dir)
    write_comparison(report, out_dir)
    progress.report("report", 1, 1, str(out_dir / "comparison.md"))
    return report
