"""Generation shards as Prefect tasks: a ShardRunner that submits each engine call (consecutive shards sampled
together: stages.generate.plan_calls) to the build's task runner (threads, Dask or Ray), where a worker loads its
engine once and keeps it for every call it runs.

When a shard fails, the loop stops and the build with it; shards of that loop still waiting for this process's engine
then give up at once instead of each spending its own retries and timeouts on a server already known to fail (with
threads, the task runner waits for every started task before the build can exit).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from prefect import task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner

from polyculture.flows.common import shared_engine
from polyculture.methods import get_method
from polyculture.spec import BuildSpec
from polyculture.stages.generate import Shard, ShardRun, ShardRunner, run_shards, shard_runs

_stopped_loops: set[str] = set()  # shard loops of this process that ended (a failure, or all done)


@task(name="generate-shard", cache_policy=NONE)
def generate_shard_task(spec: BuildSpec, shards: list[Shard], loop_id: str = "") -> list[ShardRun] | None:
    """One engine call's shards, on whichever worker the runner picks; None when its loop stopped before the engine
    was free."""
    started = time.perf_counter()
    if loop_id in _stopped_loops:
        return None
    shared, loaded = shared_engine(spec)
    with shared.lock:
        if loop_id in _stopped_loops:
            return None
        try:
            frames = run_shards(spec, shards, shared.engine, get_method(spec.method))
        except BaseException:
            _stopped_loops.add(loop_id)  # before the lock goes: the next shard waiting for it must not start
            raise
    load = shared.load_seconds if loaded else 0.0
    return [ran for _, ran in shard_runs(shards, frames, time.perf_counter() - started, load)]


def prefect_shards(spec: BuildSpec, task_runner: TaskRunner) -> ShardRunner:
    """A ShardRunner that submits every engine call at once to `task_runner` and yields each call's shards as it
    completes."""

    def run(calls: list[list[Shard]]) -> Iterator[tuple[Shard, ShardRun]]:
        loop_id = uuid.uuid4().hex
        futures = {
            task_runner.submit(generate_shard_task, parameters={"spec": spec, "shards": c, "loop_id": loop_id}): c
            for c in calls
        }
        try:
            for future in as_completed(list(futures)):
                runs = future.result()
                if runs is not None:  # None: a call of this loop failed first, and the build fails with it
                    yield from zip(futures[future], runs, strict=True)
        finally:
            _stopped_loops.add(loop_id)

    return run
