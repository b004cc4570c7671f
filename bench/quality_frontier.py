"""The demo's quality-diversity frontier: sampling temperature x fluency gate, on the demo's own prompts and engine.

    .venv/bin/python bench/quality_frontier.py --prompts 32 --thresholds=-5.5,-4.5 --plot bench/quality_frontier.png

Gates: off, the fluency check at each threshold, the prose check (Gopher's rules and a repetition bound), and both.
For each sampling setting (T=1.0/top_p 1.0, T=0.7/top_p 0.9, T=0.5/top_p 0.9 by default) the first `--prompts` prompts
of configs/biographies.yaml are generated as a build does (its method, k, n and max_tokens; one shard, seeded),
validated, and every valid record's text is scored by the fluency check (mean token log-prob under the same model).
Each gate (off, and each absolute threshold) then keeps the records at or above it, and the script prints per
(setting, gate): valid records, passing records, the median tokens per word of passing texts (English prose takes
about 1.3-1.5 with this tokenizer), the share unique before dedup (distinct texts / valid), semantic diversity of the
passing records (MiniLM, the report's figure) and passing unique records per 1,000 generated tokens; one table, and a
plot of diversity against tokens per word (one point per setting and gate). One run; machines are shared, so compare
points of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SETTINGS = [(1.0, 1.0), (0.7, 0.9), (0.5, 0.9)]


def figures(texts: list[str], scores: list[float], prose: list[bool], vectors, tokens_per_word: list[float],
            gate: tuple[bool, float | None], generated_tokens: int, valid: int) -> dict[str, Any]:  # fmt: skip
    from polyculture.metrics.semantic import semantic_diversity

    with_prose, threshold = gate
    keep = [
        i for i, s in enumerate(scores)
        if (threshold is None or (s is not None and s >= threshold)) and (prose[i] or not with_prose)
    ]  # fmt: skip
    kept_texts = [texts[i] for i in keep]
    unique = len(set(kept_texts))
    name = " + ".join((["prose"] if with_prose else []) + ([f"fluency >= {threshold:g}"] if threshold is not None else []))
    return {
        "gate": name or "off",
        "valid": valid,
        "passing": len(keep),
        "median_tokens_per_word": round(statistics.median([tokens_per_word[i] for i in keep]), 2) if keep else None,
        "share_unique_before_dedup": round(len(set(texts)) / len(texts), 3) if texts else None,
        "semantic_diversity_passing": round(float(semantic_diversity(vectors[keep])), 1) if len(keep) > 1 else None,
        "passing_unique_per_1k_tokens": round(1000 * unique / generated_tokens, 2) if generated_tokens else None,
    }


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="configs/biographies.yaml")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per setting (the spec's n completions each)")
    parser.add_argument("--settings", default=",".join(f"{t}/{p}" for t, p in SETTINGS), help="T/top_p,...")
    parser.add_argument("--thresholds", default="-5.5,-4.5", help="fluency gates (mean token log-prob), besides off")
    parser.add_argument("--plot", default=None, help="write the frontier plot (PNG) here")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()

    import numpy as np

    from polyculture.engines.factory import create_engine
    from polyculture.methods import get_method
    from polyculture.preflight import load_spec
    from polyculture.spec import ProseCheck
    from polyculture.stages.embed import load_embedder
    from polyculture.stages.generate import plan_shards, run_shard
    from polyculture.stages.plan import plan
    from polyculture.stages.quality import fluency_scores
    from polyculture.stages.quality_prose import prose_outcome
    from polyculture.stages.validate import validate

    spec = load_spec(Path(args.spec))
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"batch_size": args.prompts})})
    method = get_method(spec.method)
    shard = plan_shards(spec, plan(spec), method, Path(tempfile.mkdtemp(prefix="frontier-")))[0]
    started = time.perf_counter()
    engine = create_engine(spec.model, seed=spec.seed, base_dir=spec.base_dir)
    load_seconds = time.perf_counter() - started
    tokenizer = getattr(engine, "tokenizer", None) or engine.llm.get_tokenizer()
    embedder = load_embedder(spec.dedup.embedding_model, spec.base_dir)
    thresholds = [None] + [float(t) for t in args.thresholds.split(",") if t.strip()]
    gates = [(False, t) for t in thresholds] + [(True, t) for t in thresholds]
    prose_check = ProseCheck(name="prose", kind="prose")
    rows: list[dict[str, Any]] = []
    examples: dict[str, list[str]] = {}
    for setting in args.settings.split(","):
        temperature, top_p = (float(x) for x in setting.split("/"))
        run = spec.model_copy(
            update={"sampling": spec.sampling.model_copy(update={"temperature": temperature, "top_p": top_p})}
        )
        started = time.perf_counter()
        completions = run_shard(run, shard, engine, method)
        generation_seconds = time.perf_counter() - started
        records = validate(completions, run, method).records
        texts = records["text"].to_list()
        started = time.perf_counter()
        scores = fluency_scores(texts, engine) if texts else []
        scoring_seconds = time.perf_counter() - started
        scores = [s if isinstance(s, float) else None for s in scores]
        vectors = embedder.encode(texts) if texts else np.zeros((0, 384), dtype=np.float32)
        per_word = [len(tokenizer.encode(t, add_special_tokens=False)) / max(1, len(t.split())) for t in texts]
        generated = int(completions["completion_tokens"].sum())
        prose = [bool(prose_outcome(t, prose_check, field="text")[1]) for t in texts]
        for gate in gates:
            row = {"temperature": temperature, "top_p": top_p, **figures(texts, scores, prose, vectors, per_word, gate,
                                                                         generated, len(texts))}  # fmt: skip
            row.update(generated_tokens=generated, generation_seconds=round(generation_seconds, 1),
                       fluency_seconds=round(scoring_seconds, 1))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # as it goes: runs are long
        order = sorted(range(len(texts)), key=lambda i: -(scores[i] if scores[i] is not None else -99))
        examples[f"T={temperature:g}"] = [f"{scores[i]:.2f} {texts[i][:140]}" for i in order[:2] + order[-2:]]
    engine.close()

    result = {"spec": args.spec, "prompts": args.prompts, "engine": spec.model.engine, "method": spec.method.name,
              "load_seconds": round(load_seconds, 1), "rows": rows, "examples_best_and_worst": examples,
              "load_average": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        head = ["T", "top_p", "gate", "valid", "pass", "tok/word", "unique", "sem.div", "pass uniq/1k tok"]
        print(" | ".join(head))
        for r in rows:
            print(" | ".join(str(v) for v in (r["temperature"], r["top_p"], r["gate"], r["valid"], r["passing"],
                                              r["median_tokens_per_word"], r["share_unique_before_dedup"],
                                              r["semantic_diversity_passing"], r["passing_unique_per_1k_tokens"])))  # fmt: skip
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    if args.plot:
        plot(rows, Path(args.plot))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for gate in dict.fromkeys(r["gate"] for r in rows):
        points = [r for r in rows if r["gate"] == gate and r["semantic_diversity_passing"] is not None]
        ax.plot([r["median_tokens_per_word"] for r in points], [r["semantic_diversity_passing"] for r in points],
                marker="o", label=f"gate {gate}")  # fmt: skip
        for r in points:
            ax.annotate(f"T={r['temperature']:g}", (r["median_tokens_per_word"], r["semantic_diversity_passing"]),
                        fontsize=8, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.axvline(1.6, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("median tokens per word of passing records (lower: more like prose)")
    ax.set_ylabel("semantic diversity of passing records")
    ax.set_title("Demo frontier: temperature x quality gate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
