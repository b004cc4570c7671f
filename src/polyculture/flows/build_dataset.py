"""build_dataset: plan -> generate -> validate -> embed -> dedup -> decontaminate -> quality -> extract -> rebalance
(-> top-up rounds) -> report -> publish, as Prefect tasks.

The flow only wires stages and writes each stage's output into the run folder; the stages hold the logic and
`stages.summary` the bookkeeping. Generation shards already in the run folder are reused, so a re-run resumes.

Size: the flow and every way a run folder is resumed (shards, quality scores, a dead publish, a push still owed) read
together; the run-folder side of resuming belongs in runs/ next.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.task_runners import TaskRunner

from polyculture import progress
from polyculture.engines.base import Engine, EngineError
from polyculture.flows.common import (
    close_shared_engines,
    embed_task,
    judge_engines,
    needs_build_engine_for_quality,
    shared_engine,
)
from polyculture.flows.runners import task_runner_for
from polyculture.flows.shards import prefect_shards
from polyculture.hub.push import HubError, push_dataset, pushed_before
from polyculture.index.benchmarks import Benchmark
from polyculture.index.releases import ReleaseIndex, load_release_index, locate_release_index, write_release_index
from polyculture.methods import get_method
from polyculture.preflight import load_spec
from polyculture.report.card import render_card
from polyculture.report.model import Round
from polyculture.report.previous import load_previous_release, locate_previous_run
from polyculture.report.reference_dataset import load_report_reference
from polyculture.report.write import RecordSet, ReportInputs, write_report
from polyculture.runs.files import (
    DamagedFile,
    disk_full_as,
    read_parquet_checked,
    write_parquet_checked,
    write_text_atomic,
)
from polyculture.runs.folders import RESULT_FILE, hold_build_run
from polyculture.runs.resolved import write_run_spec
from polyculture.spec import BuildSpec, DecontaminateSpec, RunnerSpec
from polyculture.stages.decontaminate import (
    DecontaminationResult,
    decontaminate,
    load_benchmarks,
    merge_decontamination,
)
from polyculture.stages.dedup import DedupResult, dedup, dedup_more, extends
from polyculture.stages.embed import load_embedder
from polyculture.stages.extract import ExtractResult, extract_attributes
from polyculture.stages.generate import GeneratedRound, generate_round
from polyculture.stages.plan import plan
from polyculture.stages.publish import dataset_folder_name, publish_local, record_fields
from polyculture.stages.quality import (
    QualityResult,
    ScoreCache,
    cache_frame,
    cache_from_frame,
    quality,
    quality_checks_frame,
)
from polyculture.stages.rebalance import RebalanceResult, rebalance
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
from polyculture.stages.top_up import RoundStats, explain_shortfalls, prompts_by_cell, top_up_cells
from polyculture.stages.validate import ValidationResult, validate

# Extracted labels by (attribute, record id) -> (label, reject reason): later rounds only read new records.
ExtractedLabels = dict[tuple[str, str], tuple[str | None, str | None]]
# Quality scores by (check, record id), kept in the run folder: later rounds and a resumed run score new records only.
QUALITY_SCORES_FILE = "quality_scores.parquet"


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
    corrupt_shards: int = 0  # damaged shard files found, set aside and generated again
    contamination: list[dict[str, Any]] | None = None  # per benchmark (spec.decontaminate): items, records, flags

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@task(name="plan", cache_policy=NONE)
def plan_task(spec: BuildSpec) -> pl.DataFrame:
    return plan(spec)


@task(name="validate", cache_policy=NONE)
def validate_task(spec: BuildSpec, completions: pl.DataFrame) -> ValidationResult:
    return validate(completions, spec, get_method(spec.method))


@task(name="dedup", cache_policy=NONE)
def dedup_task(
    spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray, references: list[ReleaseIndex]
) -> DedupResult:
    return dedup(records, embeddings, spec.dedup, references)


@task(name="dedup", cache_policy=NONE)
def dedup_more_task(
    spec: BuildSpec,
    previous: DedupResult,
    previous_records: pl.DataFrame,
    records: pl.DataFrame,
    embeddings: np.ndarray,
    references: list[ReleaseIndex],
) -> DedupResult:
    return dedup_more(previous, previous_records, records, embeddings, spec.dedup, references)


@task(name="decontaminate", cache_policy=NONE)
def decontaminate_task(
    spec: BuildSpec,
    settings: DecontaminateSpec,
    records: pl.DataFrame,
    embeddings: np.ndarray,
    benchmarks: list[Benchmark],
) -> DecontaminationResult:
    embedder = load_embedder(spec.dedup.embedding_model, spec.base_dir)  # the build's embedder: vectors comparable
    return decontaminate(records, embeddings, settings, benchmarks, embedder)


@task(name="quality", cache_policy=NONE)
def quality_task(
    spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray, engine: Engine | None, known: ScoreCache
) -> QualityResult:
    return quality(
        records, embeddings, spec.quality, engine=engine, judge_engines=judge_engines(spec), base_dir=spec.base_dir,
        known=known,
    )  # fmt: skip


@task(name="extract", cache_policy=NONE)
def extract_task(
    spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray, engine: Engine | None, known: ExtractedLabels
) -> ExtractResult:
    return extract_attributes(records, embeddings, spec, engine=engine, known=known)


@task(name="rebalance", cache_policy=NONE)
def rebalance_task(spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray) -> RebalanceResult:
    return rebalance(records, embeddings, spec.rebalance, spec.attributes, spec.target_size)


def _generate(
    spec: BuildSpec, cells: pl.DataFrame, runner: TaskRunner, shard_dir: Path, label: str, round_no: int
) -> GeneratedRound:
    """One round's shards: finished ones read back, the rest run as Prefect tasks on the build's runner."""
    return generate_round(
        spec, cells, get_method(spec.method), shard_dir, prefect_shards(spec, runner),
        seed_key=f"round-{round_no:02d}", round_no=round_no,
        on_progress=lambda done, total: progress.report(label, done, total, "prompts"),
    )  # fmt: skip


def _process(
    spec: BuildSpec,
    completions: pl.DataFrame,
    engine: Engine | None,
    references: list[ReleaseIndex],
    known: ExtractedLabels,
    scores: ScoreCache,
    benchmarks: list[Benchmark],
) -> Pool:
    """One pass over everything generated so far: validate -> embed -> dedup -> decontaminate -> quality -> extract ->
    rebalance."""
    validated = validate_task(spec, completions)
    progress.report("validate", 1, 1, f"{validated.records.height} valid, {validated.rejects.height} rejected")
    embeddings = embed_task(spec, validated.records["text"].to_list())
    deduped = dedup_task(spec, validated.records, embeddings, references)
    clean = None
    if spec.decontaminate is not None:
        clean = decontaminate_task(spec, spec.decontaminate, deduped.kept, deduped.kept_embeddings, benchmarks)
    return _finish(spec, completions, validated, embeddings, deduped, clean, engine, known, scores)


def _process_more(
    spec: BuildSpec,
    pool: Pool,
    new: pl.DataFrame,
    engine: Engine | None,
    references: list[ReleaseIndex],
    known: ExtractedLabels,
    scores: ScoreCache,
    benchmarks: list[Benchmark],
) -> Pool:
    """A top-up round: validate, embed, dedup (against the kept records) and decontaminate only the `new`
    completions; quality (scores cached per record id; pass or fail decided over the pool, as a quantile moves),
    extract (labels cached) and rebalance over the whole pool. Equal to `_process` over everything
    (tests/test_incremental.py); a keep policy that re-ranks earlier records (dedup.extends) takes the whole pass."""
    completions = pl.concat([pool.completions, new])
    if not extends(spec.dedup):
        return _process(spec, completions, engine, references, known, scores, benchmarks)
    fresh = validate_task(spec, new)
    validated = ValidationResult(
        pl.concat([pool.validated.records, fresh.records]), pl.concat([pool.validated.rejects, fresh.rejects])
    )
    progress.report("validate", 1, 1, f"{fresh.records.height} new valid, {fresh.rejects.height} rejected")
    new_embeddings = embed_task(spec, fresh.records["text"].to_list())
    embeddings = np.vstack([pool.embeddings, new_embeddings]).astype(np.float32, copy=False)
    deduped = dedup_more_task(spec, pool.deduped, pool.validated.records, fresh.records, new_embeddings, references)
    clean = None
    if spec.decontaminate is not None and pool.decontaminated is not None:
        start = pool.deduped.kept.height  # the earlier kept rows come first and stay
        later = decontaminate_task(
            spec, spec.decontaminate, deduped.kept.slice(start), deduped.kept_embeddings[start:], benchmarks
        )
        clean = merge_decontamination(pool.decontaminated, later)
    return _finish(spec, completions, validated, embeddings, deduped, clean, engine, known, scores)


def _finish(
    spec: BuildSpec,
    completions: pl.DataFrame,
    validated: ValidationResult,
    embeddings: np.ndarray,
    deduped: DedupResult,
    clean: DecontaminationResult | None,
    engine: Engine | None,
    known: ExtractedLabels,
    scores: ScoreCache,
) -> Pool:
    """quality -> extract -> rebalance over the whole deduplicated pool (scores and labels cached per record id)."""
    records = validated.records
    progress.report("dedup", 1, 1, f"{deduped.kept.height} unique of {records.height}")
    kept, kept_embeddings = deduped.kept, deduped.kept_embeddings
    if clean is not None:
        kept, kept_embeddings = clean.kept, clean.kept_embeddings
        progress.report("decontaminate", 1, 1, f"{clean.rejects.height} of {deduped.kept.height} overlap a benchmark")
    checked = quality_task(spec, kept, kept_embeddings, engine, scores)
    if spec.quality:
        progress.report("quality", 1, 1, f"{checked.records.height} passed of {kept.height}")
    extracted = extract_task(spec, checked.records, checked.embeddings, engine, known)
    balanced = rebalance_task(spec, extracted.records, extracted.embeddings)
    pool = Pool(completions, validated, embeddings, deduped, extracted, balanced, checked, decontaminated=clean)
    progress.report(
        "rebalance", 1, 1, f"{balanced.kept.height} of target {spec.target_size}, {pool.short_records} short"
    )
    return pool


def _read_scores(path: Path) -> ScoreCache:
    """The quality scores a run folder kept (a resumed run); none when absent or damaged (they are computed again)."""
    if not path.is_file():
        return {}
    try:
        return cache_from_frame(read_parquet_checked(path))
    except DamagedFile:
        return {}


def _write_scores(spec: BuildSpec, path: Path, scores: ScoreCache) -> None:
    if spec.quality:
        write_parquet_checked(cache_frame(scores), path)


def _push_owed(spec: BuildSpec, run_dir: Path) -> BuildResult | None:
    """The result.json of a run that finished all but the push its spec asks for (unfinished_runs offers such a
    run), else None."""
    hub = spec.publish.hub
    if hub is None or not hub.push_on_build:
        return None
    try:
        result = BuildResult(**json.loads((run_dir / RESULT_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None  # no result (or not one this version wrote): the run is built again, shards reused
    return result if result.hub is None and Path(result.dataset_dir).is_dir() else None


def _clear_dead_build(run_dir: Path, dataset_dir: Path) -> None:
    """Before publishing again in a resumed run (its lock held, so no live build writes here): drop the staging
    folders a killed publish left, and the dataset folder this run published whole before it died (the rows now are
    the same: per-shard seeds). That folder is renamed away before it is deleted, so a kill during the deletion
    never leaves part of it under its published name."""
    for staging in [*run_dir.glob(f".{dataset_dir.name}.partial-*"), *run_dir.glob(".reference-*")]:
        shutil.rmtree(staging, ignore_errors=True)
    if dataset_dir.is_dir():
        aside = dataset_dir.with_name(f".{dataset_dir.name}.partial-old")
        os.rename(dataset_dir, aside)
        shutil.rmtree(aside)


def _round_stats(spec: BuildSpec, plans: list[pl.DataFrame], pool: Pool) -> RoundStats:
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
    `resume`, else a new run starts; while a live build of this spec holds an unfinished run, RunBusy (unless not
    `resume`): never two builds of one spec by accident. Finished shards are never regenerated, and each shard
    samples from its own seed, so a resumed run publishes what an uninterrupted one would have. An engine that fails
    (EngineError: servers gone, every retry spent) stops the build with a message saying how to resume.
    After the first round, cells still short of their quota get top-up rounds (bounded by rebalance.top_up_rounds
    and rebalance.top_up_max_tokens); each round's shards live in generate/topup-NN/, so a re-run resumes.
    """
    wall_started = time.perf_counter()
    spec = load_spec(spec_path)
    runner_spec = spec.runner if runner is None else RunnerSpec.model_validate(runner)
    dataset_root = Path(output_root or spec.publish.dir) / spec.name
    with hold_build_run(dataset_root, spec, run_id=run_id, resume=resume, build=_this_build()) as (run_dir, resumed):
        run_id = run_dir.name
        if resumed:
            progress.report("resume", 1, 1, f"run {run_id}: {_finished_shards(run_dir)} finished shard(s) reused")
        finished = _push_owed(spec, run_dir) if resumed else None
        if finished is not None:  # built and published before the build died: only its push is owed
            progress.report("resume", 1, 1, f"run {run_id}: built, pushing")
            return _push(spec, run_dir, replace(finished, resumed=True), pushed_already=True).to_dict()
        try:
            # Any write that runs out of space (ours, or one inside polars, matplotlib, FAISS) is reported as such.
            with task_runner_for(runner_spec) as task_runner, disk_full_as(run_dir):
                try:
                    return _build(spec, spec_path, run_id, run_dir, wall_started, resumed, task_runner)
                except EngineError as exc:
                    raise EngineError(f"{exc}\n{resume_hint(run_dir)}") from None
        finally:
            close_shared_engines()  # this process's (threads); workers of a cluster keep theirs for later builds


def resume_hint(run_dir: Path) -> str:
    """How to go on from a build that stopped in run_dir."""
    return (
        f"run folder {run_dir} keeps {_finished_shards(run_dir)} finished shard(s); run the build again (the same "
        f"command, or --run-id {run_dir.name}) to resume: finished shards are not generated again"
    )


def _finished_shards(run_dir: Path) -> int:
    return len(list(run_dir.glob("generate/**/*.parquet")))


def _this_build() -> str:
    """Which build holds a run folder, for the message a second build gets: the Prefect flow run (and deployment)."""
    from prefect.runtime import deployment, flow_run

    if deployment.name:
        return f"Prefect flow run '{flow_run.name}' of deployment '{deployment.name}'"
    return f"Prefect flow run '{flow_run.name}'"


def _build(
    spec: BuildSpec,
    spec_path: str,
    run_id: str,
    run_dir: Path,
    wall_started: float,
    resumed: bool,
    task_runner: TaskRunner,
) -> dict[str, Any]:
    write_run_spec(spec, Path(spec_path), run_dir)
    references = [
        load_release_index(locate_release_index(folder, spec.base_dir), embedding_model=spec.dedup.embedding_model)
        for folder in spec.dedup.reference
    ]

    # Read now, so a bad report.reference path or column fails before any model time is spent.
    report_reference = load_report_reference(spec)
    previous_run = locate_previous_run(spec, run_dir.parent, run_dir)
    previous = load_previous_release(previous_run) if previous_run is not None else None
    benchmarks = load_benchmarks(spec.decontaminate, spec.base_dir) if spec.decontaminate is not None else []
    cells = plan_task(spec)
    cells.write_parquet(run_dir / "plan.parquet")
    # The engine extractor, the fluency check and a judge without its own model read records with the build's chat
    # model, here in the build's process.
    reads_with_engine = any(a.extractor is not None and a.extractor.method == "engine" for a in spec.extract_attributes)
    scores_with_engine = needs_build_engine_for_quality(spec)
    engine = shared_engine(spec)[0].engine if reads_with_engine or scores_with_engine else None
    known: ExtractedLabels = {}
    scores = _read_scores(run_dir / QUALITY_SCORES_FILE)
    plans = [cells]
    generated = _generate(spec, cells, task_runner, run_dir / "generate", "generate", 0)
    generations = [generated]
    pool = _process(spec, generated.completions, engine, references, known, scores, benchmarks)
    _write_scores(spec, run_dir / QUALITY_SCORES_FILE, scores)
    rounds = [round_row(0, cells, pool.completions, pool)]
    budget_stop: str | None = None
    for round_no in range(1, spec.rebalance.top_up_rounds + 1):
        shortfalls = pool.balanced.shortfalls()
        if not shortfalls:
            break
        spent = top_up_tokens_spent(rounds)
        budget = spec.rebalance.top_up_max_tokens
        top_up = top_up_cells(
            spec, shortfalls, _round_stats(spec, plans, pool),
            first_cell_id=int(max(int(p["cell_id"].max() or 0) for p in plans)) + 1,
            token_budget_left=None if budget is None else budget - spent,
        )  # fmt: skip
        if top_up.height == 0:  # only a spent budget can leave a shortfall without prompts
            budget_stop = budget_stop_reason(spec.rebalance, spent)
            break
        top_up.write_parquet(run_dir / f"plan-topup-{round_no:02d}.parquet")
        plans.append(top_up)
        label = f"top-up {round_no}/{spec.rebalance.top_up_rounds}"
        shard_dir = run_dir / "generate" / f"topup-{round_no:02d}"
        generated = _generate(spec, top_up, task_runner, shard_dir, label, round_no)
        generations.append(generated)
        pool = _process_more(spec, pool, generated.completions, engine, references, known, scores, benchmarks)
        _write_scores(spec, run_dir / QUALITY_SCORES_FILE, scores)
        rounds.append(round_row(round_no, top_up, generated.completions, pool))
    stopped = stop_reason(spec.rebalance, bool(pool.balanced.shortfalls()), budget_stop)

    completions, validated, deduped, balanced = pool.completions, pool.validated, pool.deduped, pool.balanced
    records = validated.records
    cells_out = explain_shortfalls(balanced.cells, prompts_by_cell(spec, plans, balanced.cells), len(rounds), stopped)
    cells_out.write_parquet(run_dir / "cells.parquet")
    balanced.marginals.write_parquet(run_dir / "marginals.parquet")
    deduped.clusters.write_parquet(run_dir / "dedup_clusters.parquet")
    records.write_parquet(run_dir / "validated.parquet")
    rejects = all_rejects(pool)
    rejects.write_parquet(run_dir / "rejects.parquet")
    if pool.quality is not None and spec.quality:  # per check: counts and the threshold of the last pass
        quality_checks_frame(pool.quality.counts).write_parquet(run_dir / "quality_checks.parquet")
    counts = build_counts(spec, plans, pool)
    # One row per shard generated by this invocation (a resumed run lists only what it generated).
    shard_runs = pl.concat([g.shard_runs for g in generations], how="vertical")
    shard_runs.write_parquet(run_dir / "shard_runs.parquet")
    usage = build_usage(rounds, completions, shard_runs, sum(g.wall_seconds for g in generations))
    reference_embeddings = (
        embed_task(spec, report_reference["text"].to_list()) if report_reference is not None else None
    )
    report_task = task(name="report", cache_policy=NONE)(write_report)
    report = report_task(
        spec,
        ReportInputs(
            run_id=run_id,
            counts=counts,
            validated=RecordSet(records, pool.embeddings),
            pool=RecordSet(pool.extracted.records, pool.extracted.embeddings),
            final=RecordSet(balanced.kept, balanced.kept_embeddings),
            rejects=rejects,
            cells=cells_out,
            marginals=balanced.marginals,
            rounds=tuple(Round.from_dict(r) for r in rounds),
            stop_reason=stopped,
            usage=usage | {"wall_seconds": round(time.perf_counter() - wall_started, 2)},
            reference=RecordSet(report_reference, reference_embeddings) if report_reference is not None else None,
            contamination=pool.decontaminated.table() if pool.decontaminated is not None else None,
            quality=pool.quality if spec.quality else None,
            previous=(previous, embed_task(spec, previous.records["text"].to_list())) if previous else None,
        ),
        run_dir,
    )
    progress.report("report", 1, 1, str(run_dir / "report.md"))
    publish_task = task(name="publish", cache_policy=NONE)(publish_local)
    dataset_dir = run_dir / dataset_folder_name(spec.name, run_id)
    if resumed:
        _clear_dead_build(run_dir, dataset_dir)
    card = render_card(report, spec, record_fields(spec, balanced.kept), balanced.kept.height)
    dataset_dir = publish_task(spec, balanced.kept, card, run_dir, dataset_dir)
    progress.report("publish", 1, 1, str(dataset_dir))
    write_release_index(
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
        corrupt_shards=sum(len(g.corrupt_shards) for g in generations),
        contamination=pool.decontaminated.table() if pool.decontaminated is not None else None,
    )
    write_text_atomic(run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))  # marks the run finished
    return _push(spec, run_dir, result, pushed_already=False).to_dict()


def _push(spec: BuildSpec, run_dir: Path, result: BuildResult, pushed_already: bool) -> BuildResult:
    """The push a spec with publish.hub.push_on_build asks for, recorded in result.json (the run's result as is
    otherwise). `pushed_already`: the run may have pushed before it died, unrecorded; a second push would be refused."""
    hub = spec.publish.hub
    if hub is None or not hub.push_on_build:
        return result
    dataset_dir = Path(result.dataset_dir)
    # After result.json: a failed push leaves a finished run that `polyculture publish RUN_DIR` retries, as does
    # the same build command. The token is resolved inside push_dataset, never passed as a task parameter (Prefect
    # records those).
    try:
        pushed = pushed_before(dataset_dir, hub, run_id=result.run_id) if pushed_already else None
        if pushed is None:
            pushed = task(name="push", cache_policy=NONE, retries=0)(push_dataset)(
                dataset_dir, hub, run_id=result.run_id
            )
    except HubError as exc:
        raise type(exc)(
            f"the dataset was built in {run_dir}, but the push failed: {exc}\n"
            f"retry with `polyculture publish {run_dir}`"
        ) from None
    result = replace(result, hub=pushed.to_dict())
    write_text_atomic(run_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2))
    return result
