"""Generated tokens per second of each engine on the same work (the biographies VS prompt), median of repeats.

Usage: .venv/bin/python bench/engine_throughput.py [--engines vllm,transformers] [--prompts 16] [--repeats 3]
Prints one JSON line per engine. Numbers from one run only are comparable: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from polyculture.engines.base import SamplingParams
from polyculture.engines.factory import create_engine
from polyculture.methods import get_method
from polyculture.preflight import load_spec
from polyculture.stages.plan import plan
from polyculture.stages.prompts import generation_schema, render_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(Path(__file__).parent.parent / "configs" / "biographies.yaml"))
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

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
        }))  # fmt: skip


if __name__ == "__main__":
    main()
