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

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
from polyculture.stages.generate import Shard, ShardRun, ShardRunner, run_shards_as_finished, this_worker
from polyculture.stages.validate import validate

_stopped_loops: set[str] = set()  # shard loops of this process that ended (a failure, or all done)
_streams: dict[str, queue.Queue[tuple[str, Any]]] = {}  # a running loop's finished shards and calls, by loop id
_SHARD, _CALL, _FAILED = "shard", "call", "failed"


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
    was free. In the driver's own process (threads) each shard goes to the loop's stream as soon as it is done, and
    the list is empty; elsewhere the call's shards come back together, with their embeddings."""
    started = time.perf_counter()
    if loop_id in _stopped_loops:
        return None
    shared, loaded = shared_engine(spec)
    load = shared.load_seconds if loaded else 0.0
    stream = _driver_stream(loop_id, driver)
    runs: dict[int, ShardRun] = {}
    with shared.lock:
        if loop_id in _stopped_loops:
            return None
        waited = time.perf_counter() - started  # engine load and the wait for the engine: counted on the first shard
        try:
            for position, (shard, frame, seconds) in enumerate(
                run_shards_as_finished(spec, shards, shared.engine, get_method(spec.method))
            ):
                first = position == 0
                ran = ShardRun(frame, this_worker(), load if first else 0.0, seconds + (waited if first else 0.0))
                if stream is not None:
                    stream.put((_SHARD, (shard, ran)))
                else:
                    runs[shard.index] = ran
        except BaseException:
            _stopped_loops.add(loop_id)  # before the lock goes: the next shard waiting for it must not start
            raise
    ordered = [runs[shard.index] for shard in shards if shard.index in runs]
    if not ordered or ordered[0].worker == driver:
        return ordered
    embedded: list[ShardRun] = []
    for ran in ordered:  # the engine is free: the next call generates while this one's texts are embedded
        keys, vectors = embed_shard(spec, ran.completions)
        embedded.append(EmbeddedShardRun(**vars(ran), keys=keys, vectors=vectors))
    return embedded


def _driver_stream(loop_id: str, driver: str) -> queue.Queue[tuple[str, Any]] | None:
    """The loop's queue when this task runs in the driver's own process, else None. A function of its own: Dask
    pickles the task's function by value with the globals it names, and a queue (its lock) cannot be pickled."""
    return _streams.get(loop_id) if driver == this_worker() else None


def prefect_shards(spec: BuildSpec, task_runner: TaskRunner) -> ShardRunner:
    """A ShardRunner that submits every engine call at once to `task_runner` and yields each shard as it is done: as
    soon as its own requests finish when the call runs on a thread of this process, else when its call comes back."""

    def run(calls: list[list[Shard]]) -> Iterator[tuple[Shard, ShardRun]]:
        loop_id, driver = uuid.uuid4().hex, this_worker()
        stream: queue.Queue[tuple[str, Any]] = queue.Queue()
        _streams[loop_id] = stream
        futures = {
            task_runner.submit(
                generate_shard_task, parameters={"spec": spec, "shards": c, "loop_id": loop_id, "driver": driver}
            ): c
            for c in calls
        }

        def watch() -> None:  # a call's shards are in the stream before its future completes: FIFO keeps that order
            try:
                for future in as_completed(list(futures)):
                    stream.put((_CALL, future))
            except BaseException as exc:  # e.g. a runner that lost its workers: the loop fails with it
                stream.put((_FAILED, exc))

        threading.Thread(target=watch, name=f"shards-{loop_id[:8]}", daemon=True).start()
        try:
            calls_done = 0
            while calls_done < len(futures):
                kind, item = stream.get()
                if kind == _SHARD:
                    yield item
                elif kind == _FAILED:
                    raise item
                else:
                    calls_done += 1
                    runs = item.result()  # a failed call raises here, and the build fails with it
                    for shard, ran in zip(futures[item], runs or [], strict=False):
                        if isinstance(ran, EmbeddedShardRun) and ran.vectors is not None:
                            load_embedder(spec.dedup.embedding_model, spec.base_dir).remember(ran.keys, ran.vectors)
                        yield shard, ran
        finally:
            _stopped_loops.add(loop_id)
            _streams.pop(loop_id, None)

    return run
