"""generate: render prompts per cell, call the engine in batches, write each batch as a parquet shard."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import polars as pl

from polyculture.engines.base import Conversation, Engine, SamplingParams
from polyculture.methods.base import Method
from polyculture.spec import BuildSpec

COMPLETION_COLUMNS = [  # plus shard (i64) and batch_seconds (f64): timing per engine call

    "call_id", "cell_id", "cell_key", "prompt_index", "sample_index", "system", "user", "completion",
    "prompt_tokens", "completion_tokens", "finish_reason", "method", "model", "engine",
]  # fmt: skip


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
        for index in range(cell["n_prompts"]):
            variables = {**values, "k": method.items_per_call, "index": index}
            requests.append(
                PromptRequest(
                    cell_id=cell["cell_id"],
                    cell_key=cell["cell_key"],
                    attributes=values,
                    prompt_index=index,
                    system=system_template.render(variables).strip() if system_template else None,
                    user=user_template.render(variables).strip(),
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


def _batches(items: list[PromptRequest], size: int) -> Iterator[tuple[int, list[PromptRequest]]]:
    for shard, start in enumerate(range(0, len(items), size)):
        yield shard, items[start : start + size]


def generate(
    spec: BuildSpec,
    cells: pl.DataFrame,
    engine: Engine,
    method: Method,
    shard_dir: Path,
    on_batch: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """All completions of the plan. A shard already on disk is read back, not regenerated (resume after a crash).

    `on_batch(done_prompts, total_prompts)` is called after each batch, for progress displays.
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    requests = render_prompts(spec, cells, method)
    response_schema = method.response_schema(generation_schema(spec))
    params = SamplingParams(
        temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p,
        max_tokens=spec.sampling.max_tokens,
        n=spec.sampling.n,
    )
    frames = []
    done = 0
    for shard, batch in _batches(requests, spec.model.batch_size):
        path = shard_dir / f"shard-{shard:05d}.parquet"
        if path.is_file():
            frames.append(pl.read_parquet(path))
        else:
            conversations: list[Conversation] = [method.conversation(r.user, r.system) for r in batch]
            started = time.perf_counter()
            outputs = engine.generate(conversations, params, json_schema=response_schema)
            frame = _completions_frame(spec, batch, outputs, engine, method)
            # Shard-level timing, repeated on each of the shard's rows: sum it once per shard.
            frame = frame.with_columns(
                pl.lit(shard, dtype=pl.Int64).alias("shard"),
                pl.lit(time.perf_counter() - started).alias("batch_seconds"),
            )
            _write_atomic(frame, path)
            frames.append(frame)
        done += len(batch)
        if on_batch is not None:
            on_batch(done, len(requests))
    if not frames:
        return pl.DataFrame(schema={c: pl.String for c in COMPLETION_COLUMNS})
    return pl.concat(frames, how="vertical")


def _completions_frame(
    spec: BuildSpec, batch: list[PromptRequest], outputs: list[list[Any]], engine: Engine, method: Method
) -> pl.DataFrame:
    rows = []
    for request, completions in zip(batch, outputs, strict=True):
        for sample_index, completion in enumerate(completions):
            rows.append(
                {
                    "call_id": f"c{request.cell_id}-p{request.prompt_index}-s{sample_index}",
                    "cell_id": request.cell_id,
                    "cell_key": request.cell_key,
                    **request.attributes,
                    "prompt_index": request.prompt_index,
                    "sample_index": sample_index,
                    "system": request.system,
                    "user": request.user,
                    "completion": completion.text,
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "finish_reason": completion.finish_reason,
                    "method": method.name,
                    "model": spec.model.name,
                    "engine": engine.name,
                }
            )
    return pl.DataFrame(rows, infer_schema_length=None, schema_overrides={"system": pl.String, "completion": pl.String})


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
