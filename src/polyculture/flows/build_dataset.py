"""build_dataset: plan -> generate -> validate -> embed -> dedup -> rebalance -> report -> publish, as Prefect tasks.

The flow only wires stages and writes each stage's output into the run folder; all logic lives in the stages.
Generation shards already in the run folder are reused, so re-running with the same --run-id resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner

from polyculture import progress
from polyculture.engines.base import Engine
from polyculture.flows.common import close_shared_engines, embed_task, shared_engine
from polyculture.flows.runners import task_runner_for
from polyculture.hub.push import HubError, push_dataset
from polyculture.index.releases import Reference, load_reference, locate_reference, write_reference
from polyculture.methods import get_method
from polyculture.report.figures import write_report
from polyculture.report.reference_dataset import load_report_reference
from polyculture.runs.files import write_text_atomic
from polyculture.runs.folders import RESULT_FILE, hold_run, new_run_id, unfinished_runs
from polyculture.spec import BuildSpec, RunnerSpec, load_spec
from polyculture.stages.dedup import dedup
from polyculture.stages.extract import extract_attributes
from polyculture.stages.generate import Shard, concat_shards, plan_shards, read_shard, run_shard, write_shard
from polyculture.stages.plan import plan
from polyculture.stages.publish import dataset_folder_name, publish_local
from polyculture.stages.rebalance import rebalance
from polyculture.stages.top_up import RoundStats, explain_shortfalls, prompts_by_cell, top_up_cells
from polyculture.stages.validate import validate


@dataclass(frozen=True)
class BuildResult:
    run_id: str
    run_dir: str
    dataset_dir: str
    report_json: str
    report_md: str
    report_html: str
    plots: list[str]
    records: int
    target_size: int
    counts: dict[str, int]
    usage: dict[str, float]
    resumed: bool = False
    hub: dict[str, Any] | None = None  # the push (publish.hub.push_on_build): repo, commit, tag

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _round_row(round_no: int, cells: pl.DataFrame, new: pl.DataFrame, pool: _Pool) -> dict[str, Any]:
    cells_frame = pool.balanced.cells
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
        "short_cells": cells_frame.filter(pl.col("deficit") > 0).height if cells_frame.height else 0,
        "missing": int(cells_frame["deficit"].sum()) if cells_frame.height else 0,
    }


@task(name="plan", cache_policy=NONE)
def plan_task(spec: BuildSpec) -> pl.DataFrame:
    return plan(spec)


@dataclass(frozen=True)
class ShardRun:
    """What a shard task sends back: the completions (the build's process writes the shard file, so workers need
    no shared disk) and where and how it ran."""

    completions: pl.DataFrame
    worker: str  # host:pid of the process that ran it
    engine_load_seconds: float  # > 0 when this task loaded the worker's engine
    seconds: float  # the task's own time, engine load included


SHARD_RUN_SCHEMA = {
    "round": pl.Int64, "shard": pl.Int64, "prompts": pl.Int64, "worker": pl.String, "seconds": pl.Float64,
    "engine_load_seconds": pl.Float64, "completion_tokens": pl.Int64,
}  # fmt: skip


@task(name="generate-shard", cache_policy=NONE)
def generate_shard_task(spec: BuildSpec, shard: Shard) -> ShardRun:
    """One shard, on whichever worker the runner picks; the worker loads its engine once and keeps it."""
    started = time.perf_counter()
    shared, loaded = shared_engine(spec)
    with shared.lock:
        frame = run_shard(spec, shard, shared.engine, get_method(spec.method))
    return ShardRun(
        completions=frame,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        engine_load_seconds=shared.load_seconds if loaded else 0.0,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _Generated:
    """One round's generation: completions in shard order, one row per shard generated now (worker, seconds,
    engine load), and the round's wall time (less than the shards' summed time when several workers ran them)."""

    completions: pl.DataFrame
    shard_runs: list[dict[str, Any]]
    wall_seconds: float


def _generate_round(
    spec: BuildSpec, cells: pl.DataFrame, runner: TaskRunner, shard_dir: Path, label: str, round_no: int
) -> _Generated:
    """Every shard of a round: finished ones read back, the rest submitted as tasks to the runner."""
    started = time.perf_counter()
    method = get_method(spec.method)
    shards = plan_shards(spec, cells, method, shard_dir, seed_key=f"round-{round_no:02d}")
    total = sum(s.prompts for s in shards)
    frames = {s.index: frame for s in shards if (frame := read_shard(spec, s, method)) is not None}
    done = sum(s.prompts for s in shards if s.index in frames)
    progress.report(label, done, total, "prompts")
    futures = {
        runner.submit(generate_shard_task, parameters={"spec": spec, "shard": s}): s
        for s in shards
        if s.index not in frames
    }
    runs: list[dict[str, Any]] = []
    for future in as_completed(list(futures)):
        shard = futures[future]
        ran: ShardRun = future.result()
        write_shard(ran.completions, shard)
        frames[shard.index] = ran.completions
        runs.append({
            "round": round_no, "shard": shard.index, "prompts": shard.prompts, "worker": ran.worker,
            "seconds": round(ran.seconds, 3), "engine_load_seconds": round(ran.engine_load_seconds, 3),
            "completion_tokens": int(ran.completions["completion_tokens"].sum()) if ran.completions.height else 0,
        })  # fmt: skip
        done += shard.prompts
        progress.report(label, done, total, "prompts")
    return _Generated(
        completions=concat_shards(spec, [frames[s.index] for s in shards]),
        shard_runs=sorted(runs, key=lambda r: r["shard"]),
        wall_seconds=time.perf_counter() - started,
    )


@task(name="validate", cache_policy=NONE)
def validate_task(spec: BuildSpec, completions: pl.DataFrame) -> Any:
    return validate(spec, completions, get_method(spec.method))


@task(name="dedup", cache_policy=NONE)
def dedup_task(spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray, references: list[Reference]) -> Any:
    return dedup(
        records, embeddings, spec.dedup.threshold, keep=spec.dedup.keep, index=spec.dedup.index,
        device=spec.dedup.device, references=references,
    )  # fmt: skip


@task(name="extract", cache_policy=NONE)
def extract_task(
    spec: BuildSpec,
    records: pl.DataFrame,
    embeddings: np.ndarray,
    engine: Engine | None,
    known: dict[tuple[str, str], Any],
) -> Any:
    return extract_attributes(spec, records, embeddings, engine=engine, known=known)


@task(name="rebalance", cache_policy=NONE)
def rebalance_task(spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray) -> Any:
    rb = spec.rebalance
    return rebalance(
        records, embeddings, spec.attributes, spec.target_size, targets=rb.targets, table=rb.table,
        surplus=rb.surplus, mmr_lambda=rb.mmr_lambda,
    )  # fmt: skip


@dataclass
class _Pool:
    """Everything generated so far and what it became after one pass of validate -> dedup -> extract -> rebalance."""

    completions: pl.DataFrame
    validated: Any = None
    embeddings: np.ndarray | None = None
    deduped: Any = None
    extracted: Any = None
    balanced: Any = None


def _process(
    spec: BuildSpec, pool: _Pool, engine: Engine | None, references: list[Reference], known: dict[tuple[str, str], Any]
) -> _Pool:
    pool.validated = validate_task(spec, pool.completions)
    records = pool.validated.records
    progress.report("validate", 1, 1, f"{records.height} valid, {pool.validated.rejects.height} rejected")
    pool.embeddings = embed_task(spec, records["text"].to_list())
    pool.deduped = dedup_task(spec, records, pool.embeddings, references)
    progress.report("dedup", 1, 1, f"{pool.deduped.kept.height} unique of {records.height}")
    pool.extracted = extract_task(spec, pool.deduped.kept, pool.deduped.kept_embeddings, engine, known)
    pool.balanced = rebalance_task(spec, pool.extracted.records, pool.extracted.embeddings)
    short = int(pool.balanced.cells["deficit"].sum()) if pool.balanced.cells.height else 0
    progress.report("rebalance", 1, 1, f"{pool.balanced.kept.height} of target {spec.target_size}, {short} short")
    return pool


def _round_stats(spec: BuildSpec, plans: list[pl.DataFrame], pool: _Pool) -> RoundStats:
    cells = pool.balanced.cells
    return RoundStats(
        prompts_by_cell=prompts_by_cell(spec, plans, cells),
        records_by_cell={row["cell_key"]: int(row["available"]) for row in cells.iter_rows(named=True)},
        prompts=sum(int(p["n_prompts"].sum()) for p in plans),
        generated_tokens=int(pool.completions["completion_tokens"].sum()) if pool.completions.height else 0,
    )


@flow(name="build_dataset", log_prints=False)
def build_dataset(
    spec_path: str,
    run_id: str | None = None,
    output_root: str | None = None,
    resume: bool = True,
    runner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the dataset a spec describes; returns where the dataset and report are (a BuildResult as a dict).

    Generation shards run as tasks on the spec's runner (threads, Dask, Ray; `runner` overrides spec.runner, e.g.
    {"kind": "dask", "workers": 2}); every other stage runs here, over all shards.

    Without a run id, the newest unfinished run of this very spec (same fingerprint, its build dead) is resumed when
    `resume`, else a new run starts. Finished shards are never regenerated, and each shard samples from its own seed,
    so a resumed run publishes what an uninterrupted one would have.
    After the first round, cells still short of their quota get top-up rounds (bounded by rebalance.top_up_rounds
    and rebalance.top_up_max_tokens); each round's shards live in generate/topup-NN/, so a re-run resumes.
    """
    wall_started = time.perf_counter()
    spec = load_spec(spec_path)
    runner_spec = spec.runner if runner is None else RunnerSpec.model_validate(runner)
    dataset_root = Path(output_root or spec.publish.dir) / spec.name
    if run_id is None:
        unfinished = unfinished_runs(dataset_root, spec) if resume else []
        run_id = unfinished[0] if unfinished else new_run_id(spec)
    run_dir = dataset_root / run_id
    with hold_run(run_dir, spec) as resumed:
        if resumed:
            shards = len(list(run_dir.glob("generate/**/*.parquet")))
            progress.report("resume", 1, 1, f"run {run_id}: {shards} finished shard(s) reused")
        try:
            with task_runner_for(runner_spec) as task_runner:
                return _build(spec, spec_path, run_id, run_dir, wall_started, resumed, task_runner)
        finally:
            close_shared_engines()  # this process's (threads); workers of a cluster keep theirs for later builds


def _build(
    spec: BuildSpec,
    spec_path: str,
    run_id: str,
    run_dir: Path,
    wall_started: float,
    resumed: bool,
    task_runner: TaskRunner,
) -> dict[str, Any]:
    shutil.copyfile(spec_path, run_dir / "spec.yaml")
    references = [
        load_reference(locate_reference(folder, spec.base_dir), embedding_model=spec.dedup.embedding_model)
        for folder in spec.dedup.reference
    ]

    # Read now, so a bad report.reference path or column fails before any model time is spent.
    report_reference = load_report_reference(spec)
    cells = plan_task(spec)
    cells.write_parquet(run_dir / "plan.parquet")
    # The engine extractor reads records with the build's chat model, here in the build's process.
    reads_with_engine = any(a.extractor is not None and a.extractor.method == "engine" for a in spec.extract_attributes)
    engine = shared_engine(spec)[0].engine if reads_with_engine else None
    known: dict[tuple[str, str], Any] = {}  # extracted labels by (attribute, record id): later rounds ask only anew
    plans = [cells]
    rounds: list[dict[str, Any]] = []
    generated = _generate_round(spec, cells, task_runner, run_dir / "generate", "generate", 0)
    shard_runs, generation_wall = generated.shard_runs, generated.wall_seconds
    pool = _process(spec, _Pool(completions=generated.completions), engine, references, known)
    rounds.append(_round_row(0, cells, pool.completions, pool))
    stop_reason: str | None = None  # set where a bound stops the rounds; otherwise derived below
    for round_no in range(1, spec.rebalance.top_up_rounds + 1):
        shortfalls = pool.balanced.shortfalls()
        if not shortfalls:
            break
        spent = sum(r["generated_tokens"] for r in rounds[1:])
        budget = spec.rebalance.top_up_max_tokens
        top_up = top_up_cells(
            spec, shortfalls, _round_stats(spec, plans, pool),
            first_cell_id=int(max(int(p["cell_id"].max() or 0) for p in plans)) + 1,
            token_budget_left=None if budget is None else budget - spent,
        )  # fmt: skip
        if top_up.height == 0:  # only a spent budget can leave a shortfall without prompts
            stop_reason = f"stopped: the top-up token budget is spent ({spent:,} of {budget or 0:,} tokens)"
            break
        top_up.write_parquet(run_dir / f"plan-topup-{round_no:02d}.parquet")
        plans.append(top_up)
        label = f"top-up {round_no}/{spec.rebalance.top_up_rounds}"
        generated = _generate_round(
            spec, top_up, task_runner, run_dir / "generate" / f"topup-{round_no:02d}", label, round_no
        )
        shard_runs += generated.shard_runs
        generation_wall += generated.wall_seconds
        new = generated.completions
        pool = _process(spec, _Pool(completions=pl.concat([pool.completions, new])), engine, references, known)
        rounds.append(_round_row(round_no, top_up, new, pool))
    if stop_reason is None:
        if not pool.balanced.shortfalls():
            stop_reason = "every cell is full"
        elif spec.rebalance.top_up_rounds == 0:
            stop_reason = "stopped: top-up rounds are off (rebalance.top_up_rounds: 0)"
        else:
            stop_reason = f"stopped: all {spec.rebalance.top_up_rounds} top-up rounds used"

    completions, validated, deduped, balanced = pool.completions, pool.validated, pool.deduped, pool.balanced
    records = validated.records
    cells_out = explain_shortfalls(
        balanced.cells, prompts_by_cell(spec, plans, balanced.cells), len(rounds), stop_reason
    )
    cells_out.write_parquet(run_dir / "cells.parquet")
    balanced.marginals.write_parquet(run_dir / "marginals.parquet")
    deduped.clusters.write_parquet(run_dir / "dedup_clusters.parquet")
    records.write_parquet(run_dir / "validated.parquet")
    rejects = pl.concat([validated.rejects, deduped.rejects, pool.extracted.rejects, balanced.rejects], how="vertical")
    rejects.write_parquet(run_dir / "rejects.parquet")
    exact_dups = deduped.rejects.filter(pl.col("reason").is_in(["exact_duplicate", "exact_in_reference"])).height
    counts = {
        "target": spec.target_size,
        "prompts": sum(int(p["n_prompts"].sum()) for p in plans),
        "completions": completions.height,
        "candidates": records.height + validated.rejects.filter(pl.col("record_id").is_not_null()).height,
        "valid": records.height,
        "after_exact_dedup": records.height - exact_dups,
        "after_semantic_dedup": deduped.kept.height,
        **({"after_extract": pool.extracted.records.height} if spec.extract_attributes else {}),
        "final": balanced.kept.height,
    }
    generation_seconds = sum(r["generation_seconds"] for r in rounds)
    generated_tokens = int(completions["completion_tokens"].sum()) if completions.height else 0
    usage = {
        "prompt_tokens": int(completions["prompt_tokens"].sum()) if completions.height else 0,
        "generated_tokens": generated_tokens,
        "generation_seconds": round(generation_seconds, 2),
        "generated_tokens_per_second": round(generated_tokens / generation_seconds, 1) if generation_seconds else 0.0,
        # Wall time of the generation rounds: with several workers, less than the shards' summed engine time.
        "generation_wall_seconds": round(generation_wall, 2),
        "engine_load_seconds": round(max((r["engine_load_seconds"] for r in shard_runs), default=0.0), 2),
        "workers": len({r["worker"] for r in shard_runs}),
        "engine_loads": sum(1 for r in shard_runs if r["engine_load_seconds"] > 0),
    }
    # One row per shard generated by this invocation (a resumed run lists only what it generated).
    pl.DataFrame(shard_runs, schema=SHARD_RUN_SCHEMA).write_parquet(run_dir / "shard_runs.parquet")
    reference_embeddings = (
        embed_task(spec, report_reference["text"].to_list()) if report_reference is not None else None
    )
    report_task = task(name="report", cache_policy=NONE)(write_report)
    report = report_task(
        spec,
        run_id=run_id,
        counts=counts,
        validated=records,
        validated_embeddings=pool.embeddings,
        pool=pool.extracted.records,
        pool_embeddings=pool.extracted.embeddings,
        marginals=balanced.marginals,
        rounds=rounds,
        stop_reason=stop_reason,
        final=balanced.kept,
        final_embeddings=balanced.kept_embeddings,
        rejects=rejects,
        cells=cells_out,
        usage=usage | {"wall_seconds": round(time.perf_counter() - wall_started, 2)},
        out_dir=run_dir,
        reference=report_reference,
        reference_embeddings=reference_embeddings,
    )
    progress.report("report", 1, 1, str(run_dir / "report.md"))
    publish_task = task(name="publish", cache_policy=NONE)(publish_local)
    dataset_dir = run_dir / dataset_folder_name(spec.name, run_id)
    if resumed and dataset_dir.is_dir():
        # Published whole (atomic rename) by this same run before it died, but never marked finished: the rows
        # now are the same (per-shard seeds), so publish them again in its place.
        shutil.rmtree(dataset_dir)
    dataset_dir = publish_task(spec, balanced.kept, report, run_dir, dataset_dir)
    progress.report("publish", 1, 1, str(dataset_dir))
    write_reference(
        run_dir / "reference", balanced.kept["record_id"].to_list(), balanced.kept["text"].to_list(),
        balanced.kept_embeddings, embedding_model=spec.dedup.embedding_model, source=f"{spec.name}/{run_id}",
    )  # fmt: skip
    usage["wall_seconds"] = round(time.perf_counter() - wall_started, 2)
    result = BuildResult(
        run_id=run_id,
        run_dir=str(run_dir),
        dataset_dir=str(dataset_dir),
        report_json=str(run_dir / "report.json"),
        report_md=str(run_dir / "report.md"),
        report_html=str(run_dir / "report.html"),
        plots=sorted(str(p) for p in (run_dir / "plots").glob("*.png")),
        records=balanced.kept.height,
        target_size=spec.target_size,
        counts=counts,
        usage=usage,
        resumed=resumed,
    )
    write_text_atomic(run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))  # marks the run finished
    hub = spec.publish.hub
    if hub is not None and hub.push_on_build:
        # After result.json: a failed push leaves a finished run that `polyculture publish RUN_DIR` retries.
        # The token is resolved inside push_dataset, never passed as a task parameter (Prefect records those).
        try:
            pushed = task(name="push", cache_policy=NONE, retries=0)(push_dataset)(dataset_dir, hub, run_id=run_id)
        except HubError as exc:
            raise type(exc)(
                f"the dataset was built in {run_dir}, but the push failed: {exc}\n"
                f"retry with `polyculture publish {run_dir}`"
            ) from None
        result = replace(result, hub=pushed.to_dict())
        write_text_atomic(run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))
    return result.to_dict()
