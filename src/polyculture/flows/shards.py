"""Generation shards as Prefect tasks: a ShardRunner that submits each engine call (consecutive shards sampled
together: stages.generate.plan_calls) to the build's task runner (threads, Dask or Ray), where a worker loads its
engine once and keeps it for every call it runs.

A worker process (Dask, Ray) also embeds its shard's candidate texts (its embedder loaded once, like the engine),
after the engine is free for the next shard, and returns the vectors by text key with the completions; the loop puts
them in the flow's embedder cache, so the flow's embed stage only looks them up. Shards on threads of the flow's own
process leave embedding to the flow: torch in two threads at once oversubscribes the cores (STACK.md).

When a shard fails, the loop stops and the build with it; shards of that loop still waiting for this process's engine
then give up at once instead of each spending its own retries and timeouts on a server already known to fail (with
threads, the task runner waits for every started task before the build can exit).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner

from polyculture.flows.common import shared_engine
from polyculture.methods import get_method
from polyculture.spec import BuildSpec
from polyculture.stages.embed import load_embedder, text_key
from polyculture.stages.generate import Shard, ShardRun, ShardRunner, run_shards, shard_runs, this_worker
from polyculture.stages.validate import validate

_stopped_loops: set[str] = set()  # shard loops of this process that ended (a failure, or all done)


@dataclass(frozen=True)
class EmbeddedShardRun(ShardRun):
    """A ShardRun with the embeddings of its valid candidates' texts: `keys` (text_key of each text) and `vectors`."""

    keys: tuple[bytes, ...] = ()
    vectors: np.ndarray | None = None


def embed_shard(spec: BuildSpec, completions: pl.DataFrame) -> tuple[tuple[bytes, ...], np.ndarray]:
    """The texts the flow will embed for these completions (validate is per completion: the same records), embedded
    here by the build's embedder."""
    texts = list(dict.fromkeys(validate(completions, spec, get_method(spec.method)).records["text"].to_list()))
    vectors = load_embedder(spec.dedup.embedding_model, spec.base_dir).encode(texts)
    return tuple(text_key(t) for t in texts), vectors


@task(name="generate-shard", cache_policy=NONE)
def generate_shard_task(
    spec: BuildSpec, shards: list[Shard], loop_id: str = "", driver: str = ""
) -> list[ShardRun] | None:
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
    runs = [ran for _, ran in shard_runs(shards, frames, time.perf_counter() - started, load)]
    if not runs or runs[0].worker == driver:
        return runs
    embedded: list[ShardRun] = []
    for ran in runs:  # the engine is free: the next call generates while this one's texts are embedded
        keys, vectors = embed_shard(spec, ran.completions)
        embedded.append(EmbeddedShardRun(**vars(ran), keys=keys, vectors=vectors))
    return embedded


def prefect_shards(spec: BuildSpec, task_runner: TaskRunner) -> ShardRunner:
    """A ShardRunner that submits every engine call at once to `task_runner` and yields each call's shards as it
    completes."""

    def run(calls: list[list[Shard]]) -> Iterator[tuple[Shard, ShardRun]]:
        loop_id, driver = uuid.uuid4().hex, this_worker()
        futures = {
            task_runner.submit(
                generate_shard_task, parameters={"spec": spec, "shards": c, "loop_id": loop_id, "driver": driver}
            ): c
            for c in calls
        }
        try:
            for future in as_completed(list(futures)):
                runs = future.result()
                if runs is None:  # a call of this loop failed first, and the build fails with it
                    continue
                for shard, ran in zip(futures[future], runs, strict=True):
                    if isinstance(ran, EmbeddedShardRun) and ran.vectors is not None:
                        load_embedder(spec.dedup.embedding_model, spec.base_dir).remember(ran.keys, ran.vectors)
                    yield shard, ran
        finally:
            _stopped_loops.add(loop_id)

    return run
