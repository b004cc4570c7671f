"""bench: one top-up round on a 100k pool, incremental (flows.build_dataset._process_more's stages) vs the full pass
(_process's stages) over the same completions.

    PYTHONPATH=src .venv/bin/python bench/top_up_incremental.py --pool 100000 --new 5000 --json out.json

- Completions are synthetic direct-method JSON records (12 random words from a 3,000-word vocabulary), one record each,
  two prompt cells; 8% of the rows are planted near duplicates of earlier rows (bench/dedup_scale.py's anisotropic
  vectors, cosines 0.85-0.99) and a quarter of those copy their source's text exactly.
- Embedding is a cache lookup in both (as in a build where the texts were embedded once: sha256 keys in the real
  Embedder's memory, filled with the synthetic vectors); MiniLM itself is not run (160 texts/s would dominate).
- Stages timed: validate, embed lookup, dedup (full: `dedup` over the pool, the index `choose_index` picks: IVF above
  50k rows; incremental: `dedup_more` of the new rows against the kept ones), quality (one prose check, scores cached
  per record id: the earlier rows are lookups in both), rebalance over the pool (the same work in both).
  No decontamination (per record: it scales with what is checked, like validate), no Prefect.
- One run; the machine is shared (load average printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup_scale import make_embeddings  # noqa: E402

from polyculture.methods import get_method  # noqa: E402
from polyculture.preflight import parse_spec  # noqa: E402
from polyculture.stages.dedup import dedup, dedup_more  # noqa: E402
from polyculture.stages.embed import load_embedder, text_key  # noqa: E402
from polyculture.stages.quality import quality  # noqa: E402
from polyculture.stages.rebalance import rebalance  # noqa: E402
from polyculture.stages.validate import ValidationResult, validate  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "occupation": {"type": "string"},
        "bio": {"type": "string", "minLength": 10},
    },
    "required": ["name", "occupation", "bio"],
}


def completions(texts: list[str], first: int, round_no: int) -> pl.DataFrame:
    n = len(texts)
    cell = [(first + i) % 2 for i in range(n)]
    occupation = ["doctor" if c == 0 else "farmer" for c in cell]
    return pl.DataFrame(
        {
            "call_id": [f"c{c}-p{first + i}-s0" for i, c in enumerate(cell)],
            "cell_id": cell,
            "cell_key": [f"occupation={o}" for o in occupation],
            "occupation": occupation,
            "prompt_index": list(range(first, first + n)),
            "sample_index": [0] * n,
            "turn": [0] * n,
            "completion": [json.dumps({"name": f"P{first + i}", "bio": t}) for i, t in enumerate(texts)],
            "finish_reason": ["stop"] * n,
            "method": ["direct"] * n,
            "model": ["m"] * n,
            "shard": [round_no] * n,
        }
    )


def timed(figures: dict[str, float], name: str, fn):
    started = time.perf_counter()
    out = fn()
    figures[name] = round(time.perf_counter() - started, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    total = args.pool + args.new
    folder = Path(tempfile.mkdtemp(prefix="topup-bench-"))
    os.environ.setdefault("POLYCULTURE_CACHE", str(folder / "cache"))
    (folder / "record.schema.json").write_text(json.dumps(SCHEMA))
    spec = parse_spec(
        {
            "name": "bench",
            "prompt": {"template": "Write a short biography of a fictional {{ occupation }}."},
            "record": {"schema": "record.schema.json", "text_field": "bio"},
            "attributes": [{"name": "occupation", "values": ["doctor", "farmer"], "weights": [1, 1]}],
            "target_size": int(args.pool * 0.8),
            "method": {"name": "direct"},
            "model": {"name": "smollm2-135m-instruct", "engine": "transformers"},
            "dedup": {"threshold": 0.9},
            "quality": [{"kind": "prose", "name": "prose", "min_words": 3}],
            "seed": args.seed,
        },
        folder,
    )
    rng = np.random.default_rng(args.seed)
    vocab = np.array([f"w{i}x" for i in range(3_000)])
    vectors, source = make_embeddings(total, 384, 0.08, args.seed)
    texts = [" ".join(row) for row in vocab[rng.integers(0, len(vocab), (total, 12))]]
    for i in np.flatnonzero((source >= 0) & (rng.random(total) < 0.25)):
        texts[i] = texts[source[i]]
        vectors[i] = vectors[source[i]]
    embedder = load_embedder(spec.dedup.embedding_model, spec.base_dir)
    embedder._memory_dir = embedder.cache_dir  # bench only: the texts' vectors as if embedded before
    embedder._memory = {text_key(t): v for t, v in zip(texts, vectors, strict=True)}
    method = get_method(spec.method)
    old = completions(texts[: args.pool], 0, 0)
    new = completions(texts[args.pool :], args.pool, 1)

    def tail(validated, embeddings, deduped, scores, figures):
        checked = timed(figures, "quality", lambda: quality(deduped.kept, deduped.kept_embeddings, spec.quality, known=scores))
        balanced = timed(
            figures, "rebalance",
            lambda: rebalance(checked.records, checked.embeddings, spec.rebalance, spec.attributes, spec.target_size),
        )  # fmt: skip
        return deduped, balanced

    # The earlier rounds' pool (not timed): what the incremental round starts from.
    scores: dict = {}
    pool_validated = validate(old, spec, method)
    pool_embeddings = embedder.encode(pool_validated.records["text"].to_list())
    pool_deduped = dedup(pool_validated.records, pool_embeddings, spec.dedup)
    quality(pool_deduped.kept, pool_deduped.kept_embeddings, spec.quality, known=scores)

    inc: dict[str, float] = {}
    started = time.perf_counter()
    fresh = timed(inc, "validate", lambda: validate(new, spec, method))
    validated = ValidationResult(
        pl.concat([pool_validated.records, fresh.records]), pl.concat([pool_validated.rejects, fresh.rejects])
    )
    new_embeddings = timed(inc, "embed_lookup", lambda: embedder.encode(fresh.records["text"].to_list()))
    embeddings = np.vstack([pool_embeddings, new_embeddings])
    deduped = timed(
        inc, "dedup",
        lambda: dedup_more(pool_deduped, pool_validated.records, fresh.records, new_embeddings, spec.dedup),
    )  # fmt: skip
    inc_dedup, inc_balanced = tail(validated, embeddings, deduped, scores, inc)
    inc["total"] = round(time.perf_counter() - started, 2)

    full: dict[str, float] = {}
    started = time.perf_counter()
    everything = pl.concat([old, new])
    validated = timed(full, "validate", lambda: validate(everything, spec, method))
    embeddings = timed(full, "embed_lookup", lambda: embedder.encode(validated.records["text"].to_list()))
    deduped = timed(full, "dedup", lambda: dedup(validated.records, embeddings, spec.dedup))
    full_dedup, full_balanced = tail(validated, embeddings, deduped, dict(scores), full)
    full["total"] = round(time.perf_counter() - started, 2)

    a, b = set(inc_dedup.kept["record_id"].to_list()), set(full_dedup.kept["record_id"].to_list())
    result = {
        "pool": args.pool,
        "new": args.new,
        "valid": validated.records.height,
        "kept_incremental": len(a),
        "kept_full": len(b),
        "kept_jaccard": round(len(a & b) / len(a | b), 5),
        "final_same": inc_balanced.kept["record_id"].to_list() == full_balanced.kept["record_id"].to_list(),
        "incremental_seconds": inc,
        "full_seconds": full,
        "speedup": round(full["total"] / inc["total"], 2),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
