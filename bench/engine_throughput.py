"""Generated tokens per second of each engine on the same work (the biographies VS prompt), median of repeats; and
figure 1: the pipeline's generate stage against raw vLLM on the same prompts and sampling settings.

Usage:
  .venv/bin/python bench/engine_throughput.py [--engines vllm,transformers] [--prompts 16] [--repeats 3]
  .venv/bin/python bench/engine_throughput.py --stage [--scale 1] [--modes raw,pipeline:32,pipeline]
Prints one JSON line per engine (or per mode). Numbers from one run only are comparable: the machines are shared and
noisy.

--stage: the demo spec's own plan (configs/biographies.yaml: 68 prompts, n=2, max_tokens 900, T=0.7, top_p 0.9) with
target_size x --scale, on one vLLM engine loaded once. Modes, each run once, in the order given:
- raw: every conversation in one `vllm.LLM.chat` call (vLLM's scheduler batches them continuously);
- raw:S: the same conversations in the calls pipeline:S makes (whole shards up to S sequences), one after another;
- each raw call is seeded and prefix-cache-reset exactly as the pipeline's call (seed of its first shard), so raw:S and
  pipeline:S sample the same tokens (equal `texts_sha`), and raw equals pipeline:all: the difference in seconds is
  the pipeline's own cost (parsing, frames, checksummed parquet writes), not sampling luck;
- pipeline[:S|:all]: `stages.generate.generate_round` with the in-process runner into a fresh shard folder (shards of
  model.batch_size prompts, shards joined into engine calls of up to S sequences; S unset: the spec's default),
  parsing and parquet writes included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from polyculture.engines.base import SamplingParams
from polyculture.engines.factory import create_engine
from polyculture.methods import get_method
from polyculture.preflight import load_spec
from polyculture.stages.plan import plan
from polyculture.stages.prompts import generation_schema, render_prompts


def engines_figure(args: argparse.Namespace) -> None:
    spec = load_spec(args.spec)
    method = get_method(spec.method)
    requests = render_prompts(spec, plan(spec), method)[: args.prompts]
    conversations = [method.conversation(r.user, r.system) for r in requests]
    schema = method.response_schema(generation_schema(spec))
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, n=args.n)
    for name in args.engines.split(","):
        started = time.perf_counter()
        engine = create_engine(spec.model.model_copy(update={"engine": name}), seed=spec.seed)
        load_seconds = time.perf_counter() - started
        rates, parsed, calls = [], 0, 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            outputs = engine.generate(conversations, params, json_schema=schema)
            seconds = time.perf_counter() - started
            tokens = sum(c.completion_tokens for row in outputs for c in row)
            rates.append(tokens / seconds)
            for row in outputs:
                for completion in row:
                    calls += 1
                    parsed += method.parse(completion.text).error is None
        engine.close()
        print(json.dumps({
            "engine": name, "load_seconds": round(load_seconds, 1), "prompts": len(conversations), "n": args.n,
            "median_tokens_per_second": round(statistics.median(rates), 1),
            "runs_tokens_per_second": [round(r, 1) for r in rates], "parsed_calls": f"{parsed}/{calls}",
        }), flush=True)  # fmt: skip


def stage_figure(args: argparse.Namespace) -> None:
    """Raw vLLM (all requests in one call) vs the generate stage, same engine, prompts and sampling settings."""
    from polyculture.stages.generate import generate_round, in_process

    base = load_spec(args.spec)
    spec = base.model_copy(update={"target_size": base.target_size * args.scale})
    method = get_method(spec.method)
    cells = plan(spec)
    requests = render_prompts(spec, cells, method)
    conversations = [method.conversation(r.user, r.system) for r in requests]
    schema = method.response_schema(generation_schema(spec))
    params = SamplingParams(
        temperature=spec.sampling.temperature, top_p=spec.sampling.top_p, max_tokens=spec.sampling.max_tokens,
        n=spec.sampling.n, seed=spec.seed,
    )  # fmt: skip
    started = time.perf_counter()
    engine = create_engine(spec.model, seed=spec.seed)
    load_seconds = time.perf_counter() - started
    common = {"scale": args.scale, "prompts": len(requests), "n": spec.sampling.n,
              "max_tokens": spec.sampling.max_tokens, "load_seconds": round(load_seconds, 1)}  # fmt: skip
    try:
        for mode in args.modes.split(","):
            load = os.getloadavg()[0]
            started = time.perf_counter()
            if mode.startswith("raw"):
                sampling = engine._params(params, schema)  # the engine's own translation of the same settings
                per_call = _per_call(mode, len(conversations) * spec.sampling.n)
                outputs = []
                # The pipeline's calls at this size (the prompts and first-shard seed of each), so raw:S samples
                # exactly what pipeline:S samples: the same tokens, and the time difference is the pipeline's own.
                at = 0
                for size, seed in _pipeline_calls(spec, cells, method, per_call):
                    engine.llm.reset_prefix_cache()
                    engine.llm.collective_rpc("polyculture_reseed", args=(seed,))
                    outputs += engine.llm.chat(conversations[at : at + size], sampling, use_tqdm=False)
                    at += size
                seconds = time.perf_counter() - started
                tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
                texts = [o.text for out in outputs for o in out.outputs]
                extra: dict[str, object] = {"engine_calls": len(_pipeline_calls(spec, cells, method, per_call)),
                                            "texts_sha": _digest(texts)}  # fmt: skip
            else:
                per_call = _per_call(mode, len(conversations) * spec.sampling.n)
                run = spec
                if per_call:
                    run = spec.model_copy(
                        update={"model": spec.model.model_copy(update={"sequences_per_call": per_call})}
                    )
                with tempfile.TemporaryDirectory() as folder:
                    result = generate_round(run, cells, method, Path(folder), in_process(run, engine, method))
                seconds = time.perf_counter() - started
                tokens = int(result.completions["completion_tokens"].sum())
                extra = {"shards": result.shard_runs.height,
                         "sequences_per_call": getattr(run.model, "sequences_per_call", None),
                         "texts_sha": _digest(result.completions["completion"].to_list())}  # fmt: skip
            print(json.dumps({
                "mode": mode, **common, **extra, "seconds": round(seconds, 1), "completion_tokens": tokens,
                "tokens_per_second": round(tokens / seconds, 1), "load_average_at_start": round(load, 2),
                "load_average_at_end": round(os.getloadavg()[0], 2),
            }), flush=True)  # fmt: skip
    finally:
        engine.close()


def _per_call(mode: str, total_sequences: int) -> int | None:
    """S of `raw:S` / `pipeline:S` (`all`: every sequence of the plan), None when the mode names none."""
    _, _, per_call = mode.partition(":")
    if not per_call:
        return None
    return total_sequences if per_call == "all" else int(per_call)


def _pipeline_calls(spec, cells, method, sequences_per_call: int | None) -> list[tuple[int, int]]:  # noqa: ANN001
    """(prompts, seed) of each engine call the generate stage makes for this plan (None: the spec's default), or one
    call for everything with the first shard's seed when the mode asks for all at once."""
    from polyculture.stages.generate import plan_calls, plan_shards

    run = spec
    if sequences_per_call is not None:
        model = spec.model.model_copy(update={"sequences_per_call": sequences_per_call})
        run = spec.model_copy(update={"model": model})
    with tempfile.TemporaryDirectory() as folder:
        calls = plan_calls(run, plan_shards(run, cells, method, Path(folder)))
    if sequences_per_call is None:  # raw: every conversation in one call, seeded like the pipeline's first call
        return [(sum(s.prompts for call in calls for s in call), calls[0][0].seeds[0])]
    return [(sum(s.prompts for s in call), call[0].seeds[0]) for call in calls]


def _digest(texts: list[str]) -> str:
    """A short checksum of the completions in order: equal in two modes means they sampled the same tokens."""
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(Path(__file__).parent.parent / "configs" / "biographies.yaml"))
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage", action="store_true", help="figure 1: generate stage vs raw vLLM")
    parser.add_argument("--scale", type=int, default=1, help="--stage: target_size x this (1: the demo's 68 prompts)")
    parser.add_argument(
        "--modes", default="raw,pipeline", help="--stage: raw[:S], pipeline[:S] (S: sequences per call, or all)"
    )
    args = parser.parse_args()
    if args.stage:
        stage_figure(args)
    else:
        engines_figure(args)


if __name__ == "__main__":
    main()
