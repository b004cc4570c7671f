"""Does a vLLM shard give the same completions whatever ran on the engine before it?

Resume and any shard order rely on it: a shard is a pure function of (its requests, its seed). This runs two shards
of the demo spec on one engine in the order A, B, A, B and prints, per shard, how many completions the second run
reproduced. Run it on the engine as it is, then with --no-isolation to see what the engine's isolation buys
(grammars compiled synchronously, an empty prefix cache at the start of every seeded call). Run two at once to see it
hold on a busy machine (background grammar compilation made the outcome depend on thread timing).

    .venv/bin/python bench/vllm_reproducibility.py --max-tokens 120 --json
"""

from __future__ import annotations

import argparse
import json
import os
import time

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="configs/biographies.yaml")
    parser.add_argument("--max-tokens", type=int, default=120, help="per completion (the demo uses 900)")
    parser.add_argument("--no-isolation", action="store_true", help="skip the engine's per-call isolation")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from polyculture.engines import vllm_engine
    from polyculture.engines.factory import create_engine
    from polyculture.methods import get_method
    from polyculture.preflight import load_spec
    from polyculture.stages.generate import plan_shards, run_shard
    from polyculture.stages.plan import plan

    spec = load_spec(args.spec)
    spec = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"max_tokens": args.max_tokens})})
    method = get_method(spec.method)
    shards = plan_shards(spec, plan(spec), method, "/tmp/unused-shards")[:2]
    if args.no_isolation:
        vllm_engine.VLLMEngine._isolate_call = lambda self, schema: None  # type: ignore[method-assign]
        vllm_engine._compile_grammars_synchronously = lambda llm: False
    started = time.perf_counter()
    engine = create_engine(spec.model, seed=spec.seed, base_dir=spec.base_dir)
    load_s = time.perf_counter() - started
    runs: dict[int, list[list[str]]] = {s.index: [] for s in shards}
    for shard in [*shards, *shards]:
        runs[shard.index].append(run_shard(spec, shard, engine, method)["completion"].to_list())
    engine.close()
    report = {
        "isolation": not args.no_isolation,
        "max_tokens": args.max_tokens,
        "engine_load_s": round(load_s, 1),
        "shards": {
            str(index): {
                "completions": len(first),
                "reproduced": sum(a == b for a, b in zip(first, second, strict=True)),
            }
            for index, (first, second) in runs.items()
        },
    }
    print(json.dumps(report, indent=2) if args.json else report)
