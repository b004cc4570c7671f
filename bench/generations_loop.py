"""The generations loop end to end on the embedded model: cost per generation and the drift figures.

Runs (or resumes) `polyculture generations CONFIG` in this process, then prints, per arm and generation, the build's
wall seconds and generated tokens, the tuning seconds and answer tokens, and the figures of the drift report; and the
peak resident memory of this process and its children (vLLM workers included).

Usage: .venv/bin/python bench/generations_loop.py configs/generations/logic.yaml [--regime accumulate] [--generations 5]
(--regime / --generations write a copy of the config beside it with those values). One run; the machines are shared
and noisy, so say so beside any figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import yaml

FIGURES = ["records", "correctness", "semantic_diversity", "vendi_score", "distinct_2", "compression_ratio",
           "attribute_entropy", "tail_value_coverage", "tail_ngram_coverage", "unique_answers"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--regime", choices=["replace", "accumulate", "fresh"])
    parser.add_argument("--generations", type=int)
    args = parser.parse_args()
    config = Path(args.config)
    if args.regime or args.generations:
        data = yaml.safe_load(config.read_text())
        data["regime"] = args.regime or data["regime"]
        data["generations"] = args.generations or data["generations"]
        data["name"] = f"{data['name']}-{data['regime']}-g{data['generations']}"
        config = config.with_name(f".bench-{data['name']}.yaml")
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    from polyculture.flows.generations import generations

    started = time.perf_counter()
    result = generations(str(config))
    wall = time.perf_counter() - started
    for arm, gens in result["arms"].items():
        for g in gens:
            f, t = g["figures"], g.get("tuning") or {}
            row = {"arm": arm, "generation": g["generation"], "build_seconds": f.get("build_seconds"),
                   "generated_tokens": f.get("generated_tokens"), "tune_seconds": t.get("seconds"),
                   "tune_tokens": t.get("tokens"), **{k: f.get(k) for k in FIGURES}}  # fmt: skip
            print(json.dumps(row))
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    print(json.dumps({"wall_seconds": round(wall, 1), "peak_rss_mib": round(peak / 1024), "report": result["html"]}))


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
