"""Generation shards as Prefect tasks: a ShardRunner that submits each shard to the build's task runner (threads,
Dask or Ray), where a worker loads its engine once and keeps it for every shard it runs."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prefect import task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner

from polyculture.flows.common import shared_engine
from polyculture.methods import get_method
from polyculture.spec import BuildSpec
from polyculture.stages.generate import Shard, ShardRun, ShardRunner, run_shard, this_worker


@task(name="generate-shard", cache_policy=NONE)
def generate_shard_task(spec: BuildSpec, shard: Shard) -> ShardRun:
    """One shard, on whichever worker the runner picks."""
    started = time.perf_counter()
    shared, loaded = shared_engine(spec)
    with shared.lock:
        frame = run_shard(spec, shard, shared.engine, get_method(spec.method))
    return ShardRun(
        completions=frame,
        worker=this_worker(),
        engine_load_seconds=shared.load_seconds if loaded else 0.0,
        seconds=time.perf_counter() - started,
    )


def prefect_shards(spec: BuildSpec, task_runner: TaskRunner) -> ShardRunner:
    """A ShardRunner that submits every shard at once to `task_runner` and yields them as they complete."""

    def run(shards: list[Shard]) -> Iterator[tuple[Shard, ShardRun]]:
        futures = {task_runner.submit(generate_shard_task, parameters={"spec": spec, "shard": s}): s for s in shards}
        for future in as_completed(list(futures)):
            yield futures[future], future.result()

    return run
