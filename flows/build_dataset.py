"""build_dataset: plan -> generate -> validate -> embed -> dedup -> rebalance -> report -> publish, as Prefect tasks.

The flow only wires stages and writes each stage's output into the run folder; all logic lives in the stages.
Generation shards already in the run folder are reused, so re-running with the same --run-id resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from polyculture.flows.common import embed_task, load_engine
from prefect import flow, task
from prefect.cache_policies import NONE

from polyculture import progress
from polyculture.methods import get_method
from polyculture.spec import BuildSpec, load_spec
from polyculture.stages.dedup import dedup
from polyculture.stages.generate import generate
from polyculture.stages.plan import plan
from polyculture.stages.publish import dataset_folder_name, publish_local
from polyculture.stages.rebalance import rebalance
from polyculture.stages.report import write_report
from polyculture.stages.validate import validate


@dataclass(frozen=True)
class BuildResult:
    run_id: str
    run_dir: str
    dataset_dir: str
    report_json: str
    report_md: str
    plots: list[str]
    records: int
    target_size: int
    counts: dict[str, int]
    usage: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_run_id(spec: BuildSpec) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{spec.fingerprint()[:8]}"


@task(name="plan", cache_policy=NONE)
def plan_task(spec: BuildSpec) -> pl.DataFrame:
    return plan(spec)


@task(name="generate", cache_policy=NONE)
def generate_task(spec: BuildSpec, cells: pl.DataFrame, shard_dir: Path) -> tuple[pl.DataFrame, float]:
    method = get_method(spec.method)
    total = int(cells["n_prompts"].sum())
    engine, load_seconds = load_engine(spec)
    try:
        progress.report("generate", 0, total, "prompts")
        completions = generate(
            spec, cells, engine, method, shard_dir, on_batch=lambda done, n: progress.report("generate", done, n, "prompts")
        )
    finally:
        engine.close()
    return completions, load_seconds


@task(name="validate", cache_policy=NONE)
def validate_task(spec: BuildSpec, completions: pl.DataFrame) -> Any:
    method = get_method(spec.method)
    return validate(spec, completions, method)


@task(name="dedup", cache_policy=NONE)
def dedup_task(spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray) -> Any:
    return dedup(records, embeddings, spec.dedup.threshold)


@task(name="rebalance", cache_policy=NONE)
def rebalance_task(spec: BuildSpec, records: pl.DataFrame, embeddings: np.ndarray) -> Any:
    return rebalance(records, embeddings, spec.attributes, spec.target_size)


@flow(name="build_dataset", log_prints=False)
def build_dataset(spec_path: str, run_id: str | None = None, output_root: str | None = None) -> dict[str, Any]:
    """Build the dataset a spec describes; returns where the dataset and report are (a BuildResult as a dict)."""
    wall_started = time.perf_counter()
    spec = load_spec(spec_path)
    run_id = run_id or new_run_id(spec)
    run_dir = Path(output_root or spec.publish.dir) / spec.name / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, run_dir / "spec.yaml")

    cells = plan_task(spec)
    cells.write_parquet(run_dir / "plan.parquet")
    completions, load_seconds = generate_task(spec, cells, run_dir / "generate")

    validated = validate_task(spec, completions)
    records = validated.records
    records.write_parquet(run_dir / "validated.parquet")
    progress.report("validate", 1, 1, f"{records.height} valid, {validated.rejects.height} rejected")

    embeddings = embed_task(spec, records["text"].to_list())
    deduped = dedup_task(spec, records, embeddings)
    deduped.clusters.write_parquet(run_dir / "dedup_clusters.parquet")
    progress.report("dedup", 1, 1, f"{deduped.kept.height} unique of {records.height}")

    balanced = rebalance_task(spec, deduped.kept, deduped.kept_embeddings)
    balanced.cells.write_parquet(run_dir / "cells.parquet")
    progress.report("rebalance", 1, 1, f"{balanced.kept.height} of target {spec.target_size}")

    rejects = pl.concat([validated.rejects, deduped.rejects, balanced.rejects], how="vertical")
    rejects.write_parquet(run_dir / "rejects.parquet")
    exact_dups = deduped.rejects.filter(pl.col("reason") == "exact_duplicate").height
    counts = {
        "target": spec.target_size,
        "prompts": int(cells["n_prompts"].sum()),
        "completions": completions.height,
        "candidates": records.height + validated.rejects.filter(pl.col("record_id").is_not_null()).height,
        "valid": records.height,
        "after_exact_dedup": records.height - exact_dups,
        "after_semantic_dedup": deduped.kept.height,
        "final": balanced.kept.height,
    }
    generation_seconds = (
        float(completions.unique("shard")["batch_seconds"].sum()) if completions.height else 0.0
    )
    generated_tokens = int(completions["completion_tokens"].sum()) if completions.height else 0
    usage = {
        "prompt_tokens": int(completions["prompt_tokens"].sum()) if completions.height else 0,
        "generated_tokens": generated_tokens,
        "generation_seconds": round(generation_seconds, 2),
        "generated_tokens_per_second": round(generated_tokens / generation_seconds, 1) if generation_seconds else 0.0,
        "engine_load_seconds": round(load_seconds, 2),
    }
    report_task = task(name="report", cache_policy=NONE)(write_report)
    report = report_task(
        spec,
        run_id=run_id,
        counts=counts,
        validated=records,
        validated_embeddings=embeddings,
        final=balanced.kept,
        final_embeddings=balanced.kept_embeddings,
        rejects=rejects,
        cells=balanced.cells,
        usage=usage | {"wall_seconds": round(time.perf_counter() - wall_started, 2)},
        out_dir=run_dir,
    )
    progress.report("report", 1, 1, str(run_dir / "report.md"))
    publish_task = task(name="publish", cache_policy=NONE)(publish_local)
    dataset_dir = publish_task(spec, balanced.kept, report, run_dir, run_dir / dataset_folder_name(spec.name, run_id))
    progress.report("publish", 1, 1, str(dataset_dir))
    usage["wall_seconds"] = round(time.perf_counter() - wall_started, 2)
    result = BuildResult(
        run_id=run_id,
        run_dir=str(run_dir),
        dataset_dir=str(dataset_dir),
        report_json=str(run_dir / "report.json"),
        report_md=str(run_dir / "report.md"),
        plots=sorted(str(p) for p in (run_dir / "plots").glob("*.png")),
        records=balanced.kept.height,
        target_size=spec.target_size,
        counts=counts,
        usage=usage,
    )
    (run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result.to_dict()
