"""The static embedding option (`minilm-l6-static`, model2vec distilled from the embedded MiniLM) against MiniLM,
and polyculture against SemHash at scale. Three parts, one run:

- speed: texts/s of MiniLM and of the static model on CPU, the model alone (no cache), on one fixed sample of the
  planted-duplicate corpus of bench/semhash_compare.py; median of --repeats.
- recall: that corpus (--recall-n texts, planted duplicates at --dup-rate) embedded by both models; our dedup stage
  with MiniLM at --threshold against the static model at a sweep of thresholds: recall of the planted duplicates,
  unplanted (base) texts removed, and agreement (Jaccard) of the removed set with MiniLM's. The threshold whose
  removals agree best with MiniLM's is reported.
- scale: --scale-n texts of the same corpus. (a) both tools on the same static vectors; (b) each end to end from raw
  texts with a static model2vec embedder: ours the `minilm-l6-static` Embedder (cold cache) + dedup, SemHash
  `SemHash.from_records(..., model=StaticModel)` + self_deduplicate. SemHash's own default model
  (minishlab/potion-base-8M, also a 256-d model2vec model) cannot be downloaded here, so SemHash gets the same
  distilled model; embedding cost is then equal per text and the comparison is of the pipelines around it.
  Recall: for a random --sample of rows, exact brute-force cosine against every earlier row, judged greedily as
  both tools keep the first: a row is a true duplicate if any earlier row reaches the threshold; a tool misses it
  when it keeps the row although an earlier row it also kept reaches the threshold.

Usage: .venv/bin/python bench/static_embedding.py [--parts speed,recall,scale] [--speed-n 2000] [--recall-n 10000]
                                                  [--scale-n 1000000] [--threshold 0.9] [--json out.json]
Needs the bench extra (semhash, faker). The machine is shared: compare figures within one run only.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

SWEEP = (0.80, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95)


def _median_rate(fn, n: int, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(n / statistics.median(times), 1), [round(t, 3) for t in times]


def part_speed(args, embedders) -> dict:
    from semhash_compare import build_corpus

    texts = build_corpus(args.speed_n, 0.0, args.seed)[0]
    out = {"texts": len(texts), "mean_chars": round(statistics.mean(map(len, texts)), 1)}
    for name, embedder in embedders.items():
        rate, times = _median_rate(lambda e=embedder: e._encode_uncached(texts, False), len(texts), args.repeats)
        out[name] = {"texts_per_s": rate, "seconds": times, "load_s": embedder.load_s}
        print(f"speed {name}: {rate} texts/s ({times})", file=sys.stderr)
    out["static_over_minilm"] = round(out["minilm-l6-static"]["texts_per_s"] / out["minilm-l6"]["texts_per_s"], 1)
    return out


def part_recall(args, embedders) -> dict:
    import numpy as np
    import polars as pl
    from semhash_compare import build_corpus, run_ours

    texts, sources, labels, info = build_corpus(args.recall_n, args.dup_rate, args.seed)
    frame = pl.DataFrame({"record_id": [f"r{i:07d}" for i in range(len(texts))], "call_id": "bench", "text": texts})
    planted = [i for i in range(len(texts)) if sources[i] >= 0]
    vectors = {}
    for name, embedder in embedders.items():
        started = time.perf_counter()
        vectors[name] = np.ascontiguousarray(embedder.encode(texts), dtype=np.float32)
        print(f"recall: embedded {len(texts)} with {name} in {time.perf_counter() - started:.1f}s", file=sys.stderr)

    def score(removed: set[int], reference: set[int] | None) -> dict:
        out = {
            "removed": len(removed),
            "planted_recall": round(sum(i in removed for i in planted) / len(planted), 4),
            "base_texts_removed": sum(sources[i] < 0 for i in removed),
        }
        if reference is not None:
            out["jaccard_with_minilm"] = round(len(removed & reference) / max(1, len(removed | reference)), 4)
        return out

    _, minilm_removed = run_ours(frame, vectors["minilm-l6"], args.threshold)
    minilm = set(minilm_removed)
    by_kind = {}
    result = {"corpus": info, "threshold": args.threshold, "minilm": score(minilm, None), "static": {}}
    for t in sorted({*SWEEP, args.threshold}):
        _, removed = run_ours(frame, vectors["minilm-l6-static"], t)
        result["static"][f"{t:g}"] = score(set(removed), minilm)
        by_kind[f"{t:g}"] = {k: round(sum(i in removed for i in planted if labels[i] == k)
                                      / max(1, sum(labels[i] == k for i in planted)), 4)
                             for k in info["planted_by_kind"]}  # fmt: skip
        print(f"recall: static at {t}: {result['static'][f'{t:g}']}", file=sys.stderr)
    result["minilm"]["by_kind"] = {
        k: round(sum(i in minilm for i in planted if labels[i] == k) / max(1, sum(labels[i] == k for i in planted)), 4)
        for k in info["planted_by_kind"]
    }
    result["static_by_kind"] = by_kind
    best = max(result["static"], key=lambda t: result["static"][t]["jaccard_with_minilm"])
    result["best_matching_static_threshold"] = float(best)
    return result


def sampled_recall(vectors, removed: set[int], sample, threshold: float) -> dict:
    """Greedy-consistent recall and false removals of one tool's removals on `sample` rows (exact, in chunks)."""
    import numpy as np

    n = len(vectors)
    kept = np.ones(n, dtype=bool)
    kept[list(removed)] = False
    best_any = np.full(len(sample), -2.0, dtype=np.float32)
    best_kept = np.full(len(sample), -2.0, dtype=np.float32)
    queries = vectors[sample]
    for start in range(0, n, 65_536):
        block = vectors[start : start + 65_536]
        sims = block @ queries.T  # rows of this block x sample
        rows = np.arange(start, start + len(block))[:, None]
        earlier = rows < np.asarray(sample)[None, :]
        sims = np.where(earlier, sims, -2.0)
        best_any = np.maximum(best_any, sims.max(axis=0))
        best_kept = np.maximum(best_kept, np.where(kept[start : start + len(block), None], sims, -2.0).max(axis=0))
    # float32 sums differ by ~1e-6 between BLAS paths: the tools' own tolerance, not a miss
    tol = 1e-5
    true_dup = best_any >= threshold - tol
    is_removed = np.array([i in removed for i in sample])
    missed = (~is_removed) & (best_kept >= threshold + tol)
    false_removed = is_removed & (best_any < threshold - tol)
    return {
        "sample": len(sample),
        "true_duplicates": int(true_dup.sum()),
        "missed": int(missed.sum()),
        "recall": round(1 - missed.sum() / max(1, true_dup.sum()), 4),
        "false_removals": int(false_removed.sum()),
    }


def part_scale(args, embedders) -> dict:
    import numpy as np
    import polars as pl
    from model2vec import StaticModel
    from semhash_compare import build_corpus, run_ours, run_semhash

    started = time.perf_counter()
    texts = build_corpus(args.scale_n, args.dup_rate, args.seed)[0]
    print(f"scale: corpus {len(texts)} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    frame = pl.DataFrame({"record_id": [f"r{i:07d}" for i in range(len(texts))], "call_id": "bench", "text": texts})
    static = embedders["minilm-l6-static"]
    out: dict = {"n": len(texts), "threshold": args.threshold}

    # (b) end to end, ours: a cold embedding cache (the cost a first build pays: hashing + encode + cache write)
    with tempfile.TemporaryDirectory(prefix="static-bench-") as cold:
        os.environ["POLYCULTURE_CACHE"] = cold
        previous = os.environ.get("POLYCULTURE_CACHE")
        os.environ["POLYCULTURE_CACHE"] = cold  # the embedder's vector cache follows it; the loaded model stays
        started = time.perf_counter()
        vectors = np.ascontiguousarray(static.encode(texts), dtype=np.float32)
        ours_embed_s = time.perf_counter() - started
        ours_dedup_s, ours_removed = run_ours(frame, vectors, args.threshold)
        if previous is None:
            os.environ.pop("POLYCULTURE_CACHE")
        else:
            os.environ["POLYCULTURE_CACHE"] = previous
    print(f"scale: ours e2e embed {ours_embed_s:.1f}s dedup {ours_dedup_s:.1f}s", file=sys.stderr)
    model = StaticModel.from_pretrained(str(static.path))
    records = [{"text": text, "idx": i} for i, text in enumerate(texts)]
    from semhash import SemHash

    started = time.perf_counter()
    semhash = SemHash.from_records(records, columns=["text"], model=model)
    sem_removed_e2e = {d.record["idx"] for d in semhash.self_deduplicate(threshold=args.threshold).filtered}
    sem_e2e_s = time.perf_counter() - started
    del semhash
    print(f"scale: semhash e2e {sem_e2e_s:.1f}s", file=sys.stderr)

    # (a) the same vectors for both (the static model's, just computed)
    sem_times, sem_removed = run_semhash(texts, vectors, args.threshold, "usearch")
    ours_same_s = ours_dedup_s  # ours already ran on exactly these vectors
    print(f"scale: same vectors ours {ours_same_s:.1f}s semhash {sem_times['total_s']:.1f}s", file=sys.stderr)

    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(len(texts), size=min(args.sample, len(texts)), replace=False).tolist())
    out["end_to_end"] = {
        "ours_s": round(ours_embed_s + ours_dedup_s, 2),
        "ours_embed_s": round(ours_embed_s, 2),
        "ours_dedup_s": round(ours_dedup_s, 2),
        "semhash_s": round(sem_e2e_s, 2),
        "semhash_over_ours": round(sem_e2e_s / (ours_embed_s + ours_dedup_s), 2),
        "ours_removed": len(ours_removed),
        "semhash_removed": len(sem_removed_e2e),
        "ours_recall": sampled_recall(vectors, set(ours_removed), sample, args.threshold),
        "semhash_recall": sampled_recall(vectors, sem_removed_e2e, sample, args.threshold),
    }
    out["same_vectors"] = {
        "ours_s": round(ours_same_s, 2),
        "semhash_s": round(sem_times["total_s"], 2),
        "semhash_index_s": round(sem_times["index_s"], 2),
        "semhash_over_ours": round(sem_times["total_s"] / ours_same_s, 2),
        "semhash_removed": len(sem_removed),
        "semhash_recall": sampled_recall(vectors, set(sem_removed), sample, args.threshold),
        "jaccard": round(
            len(set(ours_removed) & set(sem_removed)) / max(1, len(set(ours_removed) | set(sem_removed))), 4
        ),
    }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="speed,recall,scale")
    parser.add_argument("--speed-n", type=int, default=2000)
    parser.add_argument("--recall-n", type=int, default=10_000)
    parser.add_argument("--scale-n", type=int, default=1_000_000)
    parser.add_argument("--dup-rate", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--sample", type=int, default=2000, help="rows checked by exact search in the scale part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import faiss
    import torch
    from semhash_compare import limit_usearch_threads

    from polyculture.stages.embed import Embedder

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    limit_usearch_threads(args.threads)
    parts = args.parts.split(",")
    embedders = {}
    for name in ("minilm-l6", "minilm-l6-static") if {"speed", "recall"} & set(parts) else ("minilm-l6-static",):
        started = time.perf_counter()
        embedders[name] = Embedder(name)
        embedders[name].load_s = round(time.perf_counter() - started, 2)  # the static one: distils on first use
    results = {"load_start": os.getloadavg(), "config": vars(args)}
    if "speed" in parts:
        results["speed"] = part_speed(args, embedders)
    if "recall" in parts:
        results["recall"] = part_recall(args, embedders)
    if "scale" in parts:
        results["scale"] = part_scale(args, embedders)
    results["load_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
