"""Scale-out bench: the same build on 1, 2 and 4 workers (Dask local clusters, and the thread runner as baseline).

Prints per-shard throughput and the overheads around it, so build time on W workers can be estimated as

    engine load (once per worker, in parallel) + shards / W x (shard seconds + task overhead) + driver stages

where the driver stages (validate, embed, dedup, rebalance, report, publish) run in the build's own process.

    .venv/bin/python bench/scale_out.py                     # 1, 2, 4 Dask workers + threads, 24 prompts
    .venv/bin/python bench/scale_out.py --workers 1,2 --prompts 12 --json

On this 2-core machine, more than 2 workers only share the same cores: the figures show the overheads, not a
speed-up. Run it on a machine (or a cluster, --address) with one core or GPU per worker to see the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_LOGGING_LEVEL": "ERROR",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))

import polars as pl  # noqa: E402
import yaml  # noqa: E402

RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 40},
        "occupation": {"type": "string"},
        "bio": {"type": "string", "minLength": 10, "maxLength": 200},
    },
    "required": ["name", "occupation", "bio"],
    "additionalProperties": False,
}


def write_spec(folder: Path, prompts: int, batch_size: int, max_tokens: int, engine: str) -> Path:
    (folder / "record.schema.json").write_text(json.dumps(RECORD_SCHEMA))
    spec = {
        "name": "scale-out",
        "prompt": {"template": "Write a short biography of a fictional {{ occupation }}."},
        "record": {"schema": "record.schema.json", "text_field": "bio"},
        "attributes": [{"name": "occupation", "values": ["doctor", "farmer", "teacher", "pilot"]}],
        # n=2 samples per prompt and oversample 2: target = prompts records gives `prompts` prompts.
        "target_size": prompts,
        "method": {"name": "direct"},
        "model": {"name": "smollm2-135m-instruct", "engine": engine, "batch_size": batch_size},
        "sampling": {"temperature": 1.0, "max_tokens": max_tokens, "n": 2},
        "generation": {"oversample": 2.0},
        "rebalance": {"top_up_rounds": 0},
        "seed": 7,
    }
    path = folder / "scale-out.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def task_overhead(runner: dict[str, Any], tasks: int) -> float:
    """Seconds per no-op task submitted through the runner (scheduling, serialisation, Prefect task-run records)."""
    from prefect import flow, task
    from prefect.futures import wait

    from polyculture.flows.runners import task_runner_for
    from polyculture.spec import RunnerSpec

    @task
    def noop(i: int) -> int:
        return i

    @flow
    def probe() -> float:
        with task_runner_for(RunnerSpec.model_validate(runner)) as pool:
            # Warm-up: workers started and Prefect's client ready before timing.
            wait([pool.submit(noop, parameters={"i": i}) for i in range(4)])
            started = time.perf_counter()
            wait([pool.submit(noop, parameters={"i": i}) for i in range(tasks)])
            return (time.perf_counter() - started) / tasks

    return probe()


def run_one(spec_path: Path, out: Path, label: str, runner: dict[str, Any]) -> dict[str, Any]:
    from polyculture.flows.build_dataset import build_dataset

    started = time.perf_counter()
    result = build_dataset(str(spec_path), run_id=label, output_root=str(out), runner=runner)
    wall = time.perf_counter() - started
    shards = pl.read_parquet(Path(result["run_dir"]) / "shard_runs.parquet")
    warm = shards.filter(pl.col("engine_load_seconds") == 0)
    loads = shards.filter(pl.col("engine_load_seconds") > 0)["engine_load_seconds"].to_list()
    usage = result["usage"]
    gen_wall = usage["generation_wall_seconds"]
    tokens = int(shards["completion_tokens"].sum())
    # A shard's own engine time (the task's seconds minus any engine load inside it).
    shard_seconds = [s - load for s, load in zip(shards["seconds"], shards["engine_load_seconds"], strict=True)]
    return {
        "runner": label,
        "workers_used": usage["workers"],
        "engine_loads": len(loads),
        "engine_load_s_median": statistics.median(loads) if loads else 0.0,
        "shards": shards.height,
        "shard_s_median": statistics.median(shard_seconds),
        "shard_tok_per_s_median": statistics.median(
            (t / s) for t, s in zip(shards["completion_tokens"], shard_seconds, strict=True) if s > 0
        ),
        "warm_shards": warm.height,
        "generation_wall_s": gen_wall,
        "aggregate_tok_per_s": tokens / gen_wall if gen_wall else 0.0,
        "build_wall_s": wall,
        "driver_stages_s": wall - gen_wall,
        "records": result["records"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts for Dask local clusters")
    parser.add_argument("--prompts", type=int, default=24, help="prompts in the build (n=2 samples each)")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per shard")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--overhead-tasks", type=int, default=40, help="no-op tasks per runner for task overhead")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    spec_path = write_spec(work, args.prompts, args.batch_size, args.max_tokens, args.engine)
    rows = []
    runners = [("threads", {"kind": "threads", "workers": 1})] + [
        (f"dask-{w}", {"kind": "dask", "workers": w}) for w in counts
    ]
    for label, runner in runners:
        print(f"... {label}", file=sys.stderr, flush=True)
        row = run_one(spec_path, work / "out", label, runner)
        row["task_overhead_ms"] = 1000 * task_overhead(runner, args.overhead_tasks)
        rows.append(row)
    base = next((r for r in rows if r["runner"] == f"dask-{counts[0]}"), rows[0])
    for row in rows:
        row["speedup_vs_first_dask"] = base["generation_wall_s"] / row["generation_wall_s"]

    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.prompts} prompts x n=2, {args.batch_size} prompts per shard, max_tokens {args.max_tokens}, "
          f"{args.engine}, {os.cpu_count()} CPU cores")  # fmt: skip
    header = ["runner", "workers", "loads", "load s", "shards", "shard s", "shard tok/s", "gen wall s",
              "agg tok/s", "speed-up", "task ms", "driver s"]  # fmt: skip
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([
            r["runner"], str(r["workers_used"]), str(r["engine_loads"]), f"{r['engine_load_s_median']:.1f}",
            str(r["shards"]), f"{r['shard_s_median']:.2f}", f"{r['shard_tok_per_s_median']:.0f}",
            f"{r['generation_wall_s']:.1f}", f"{r['aggregate_tok_per_s']:.0f}", f"{r['speedup_vs_first_dask']:.2f}x",
            f"{r['task_overhead_ms']:.0f}", f"{r['driver_stages_s']:.1f}",
        ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
