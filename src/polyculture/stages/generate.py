"""generate: render prompts per cell, call the engine in batches, write each batch as a parquet shard.

Multi-turn methods (multi_turn, vs_multi) run turn by turn inside a batch: the first turn samples n completions per
prompt, each of which becomes its own thread (conversation) that later turns continue with n=1, appending the
model's previous answer and the method's follow-up message. Every turn's completion is a row of its own (`turn`),
and all turns of a batch go into the batch's one shard, so resume stays per batch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2
import polars as pl

from polyculture.engines.base import Conversation, Engine, SamplingParams
from polyculture.methods.base import Method
from polyculture.spec import BuildSpec
from polyculture.stages.top_up import HINTS_COLUMN, hint_lines

COMPLETION_COLUMNS = [  # plus one column per prompt attribute after cell_key
    "call_id", "cell_id", "cell_key", "prompt_index", "sample_index", "turn", "system", "user", "messages",
    "completion", "prompt_tokens", "completion_tokens", "finish_reason", "method", "model", "engine", "shard",
    "batch_seconds",
]  # fmt: skip
_INT_COLUMNS = {"cell_id", "prompt_index", "sample_index", "turn", "prompt_tokens", "completion_tokens", "shard"}


@dataclass(frozen=True)
class PromptRequest:
    cell_id: int
    cell_key: str
    attributes: dict[str, str]
    prompt_index: int
    system: str | None
    user: str


def render_prompts(spec: BuildSpec, cells: pl.DataFrame, method: Method) -> list[PromptRequest]:
    """Every prompt of the plan, in cell order. Templates are strict: an undefined variable is an error."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    user_template = env.from_string(spec.prompt.template)
    system_template = env.from_string(spec.prompt.system) if spec.prompt.system else None
    names = [a.name for a in spec.prompt_attributes]
    requests = []
    for cell in cells.iter_rows(named=True):
        values = {name: cell[name] for name in names}
        # Top-up cells of field/extract attributes steer the model with a hint line per attribute (stages/top_up).
        hints = json.loads(cell.get(HINTS_COLUMN) or "{}")
        hint = hint_lines(spec, hints) if hints else ""
        for index in range(cell["n_prompts"]):
            variables = {**values, "k": method.k, "index": index}
            user = user_template.render(variables).strip()
            requests.append(
                PromptRequest(
                    cell_id=cell["cell_id"],
                    cell_key=cell["cell_key"],
                    attributes=values,
                    prompt_index=index,
                    system=system_template.render(variables).strip() if system_template else None,
                    user=f"{user}\n{hint}" if hint else user,
                )
            )
    return requests


def generation_schema(spec: BuildSpec) -> dict[str, Any]:
    """The record schema without the prompt-conditioned fields: the pipeline sets those, the model does not."""
    schema = spec.record_schema
    conditioned = {a.record_field for a in spec.prompt_attributes}
    return {
        **schema,
        "properties": {k: v for k, v in schema["properties"].items() if k not in conditioned},
        "required": [f for f in schema.get("required", []) if f not in conditioned],
    }


def shard_seed(seed: int, seed_key: str, shard: int, turn: int) -> int:
    """The sampling seed of one shard's turn: a hash, so neighbouring shards get unrelated streams."""
    digest = hashlib.sha256(f"{seed}|{seed_key}|{shard}|{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # < 2**63: fits every engine's seed type


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


def response_schemas(spec: BuildSpec, method: Method) -> list[dict[str, Any]]:
    """The JSON Schema of the model's whole answer, per turn."""
    item_schema = generation_schema(spec)
    return [method.response_schema(item_schema, turn=t) for t in range(method.turns)]


def read_shard(spec: BuildSpec, shard: Shard, method: Method) -> pl.DataFrame | None:
    """A finished shard's completions, or None when it has not been written yet."""
    if not shard.path.is_file():
        return None
    return _upgrade(pl.read_parquet(shard.path), method).select(_column_order(spec))


def generate_shard(spec: BuildSpec, shard: Shard, engine: Engine, method: Method) -> pl.DataFrame:
    """Generate one shard (or read it back when already written) and write it atomically; its completions."""
    done = read_shard(spec, shard, method)
    if done is not None:
        return done
    frame = run_shard(spec, shard, engine, method)
    write_shard(frame, shard)
    return frame


def write_shard(frame: pl.DataFrame, shard: Shard) -> None:
    """Write a shard's completions atomically (a crash never leaves a half-written shard that resume would trust)."""
    shard.path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(frame, shard.path)


def run_shard(spec: BuildSpec, shard: Shard, engine: Engine, method: Method) -> pl.DataFrame:
    """One shard's completions from the engine; writes nothing (a remote worker needs no shared disk)."""
    params = SamplingParams(
        temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p,
        max_tokens=spec.sampling.max_tokens,
        n=spec.sampling.n,
    )
    started = time.perf_counter()
    rows = _run_batch(spec, shard.requests, engine, method, response_schemas(spec, method), params, shard.seeds)
    frame = _completions_frame(rows, spec)
    # Shard-level timing (all turns), repeated on each of the shard's rows: sum it once per shard.
    frame = frame.with_columns(
        pl.lit(shard.index, dtype=pl.Int64).alias("shard"),
        pl.lit(time.perf_counter() - started, dtype=pl.Float64).alias("batch_seconds"),
    ).select(_column_order(spec))
    return frame


def concat_shards(spec: BuildSpec, frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Shards' completions in shard order, as one frame (an empty frame of the right columns when none)."""
    if not frames:
        return pl.DataFrame(schema=_empty_schema(spec))
    return pl.concat(frames, how="vertical")


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
    """All completions of the plan, shard after shard in this process, one row per completion and turn. A shard
    already on disk is read back, not regenerated (resume after a crash). The build flow runs the same shards as
    Prefect tasks instead (in threads, or on Dask/Ray workers).

    `on_batch(done_prompts, total_prompts)` is called after each shard (all its turns), for progress displays.
    """
    shards = plan_shards(spec, cells, method, shard_dir, seed_key=seed_key)
    Path(shard_dir).mkdir(parents=True, exist_ok=True)
    total = sum(s.prompts for s in shards)
    frames = []
    done = 0
    for shard in shards:
        frames.append(generate_shard(spec, shard, engine, method))
        done += shard.prompts
        if on_batch is not None:
            on_batch(done, total)
    return concat_shards(spec, frames)


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
    call_id = f"c{request.cell_id}-p{request.prompt_index}-s{thread.sample_index}"
    return {
        # Unique per completion: multi-turn methods name the turn.
        "call_id": f"{call_id}-t{turn}" if turns > 1 else call_id,
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
    if "messages" not in frame.columns:
        messages = [
            json.dumps(method.conversation(user, system), ensure_ascii=False)
            for user, system in zip(frame["user"].to_list(), frame["system"].to_list(), strict=True)
        ]
        frame = frame.with_columns(pl.Series("messages", messages, dtype=pl.String))
    return frame


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
