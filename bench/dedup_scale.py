"""How the dedup similarity index scales: build, add, full self-search, peak memory and recall at a threshold.

Synthetic embeddings shaped like sentence-embedding output (MiniLM vectors are anisotropic, not uniform on the
sphere): a shared mean direction + topic centres + low-rank structure + noise, so unrelated rows score ~0.1-0.5.
A known share of rows are planted near-duplicates of earlier rows at cosines spread over 0.85-0.99 (a few "hot"
rows get hundreds of copies, like templated generations). Rows are generated in chunks to bound memory.

Recall: for a random sample of queries, the exact pairs >= threshold (numpy brute force against every row, in
chunks) against what the index returned; self-pairs are not counted. The sample is also searched at a few nprobe
values (ivf) to show recall against time; "projected full" scales the sample time to all n queries.

Usage: .venv/bin/python bench/dedup_scale.py [--n 1000000] [--dim 384] [--threshold 0.9] [--kind auto] [--json]
Compare figures from one run only: the machines are shared and noisy.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")  # before numpy/faiss load their thread pools

import argparse
import json
import resource
import sys
import time

import faiss
import numpy as np

from polyculture.index.similarity import (
    SIMILARITY_TOLERANCE,
    IndexPlan,
    Neighbors,
    SimilarityIndex,
    choose_index,
)

GEN_CHUNK = 65_536
BRUTE_DB_CHUNK = 50_000  # queries x 50k float32 similarities per matmul: ~400 MB at 2000 queries


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_embeddings(n: int, dim: int, dup_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows and, per row, the row it was planted from (-1 for originals)."""
    rng = np.random.default_rng(seed)
    mean = _unit(rng.standard_normal(dim))
    topics = _unit(rng.standard_normal((2_000, dim)))
    rank = 48
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T  # rank x dim, orthonormal
    spectrum = 1.0 / np.arange(1, rank + 1)  # decaying variances, like real embedding spectra
    spectrum *= 0.40 / spectrum.sum()
    # squared-norm budget: mean 0.30, topic 0.15, low-rank 0.40, isotropic noise 0.30
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, GEN_CHUNK):
        m = min(GEN_CHUNK, n - start)
        rows = np.sqrt(0.30) * mean + np.sqrt(0.15) * topics[rng.integers(0, len(topics), m)]
        rows += (rng.standard_normal((m, rank)) * np.sqrt(spectrum)) @ basis
        rows += rng.standard_normal((m, dim)) * np.sqrt(0.30 / dim)
        out[start : start + m] = _unit(rows)

    source = np.full(n, -1, dtype=np.int64)
    n_dup = int(n * dup_share)
    if n_dup == 0 or n < 10:
        return out, source
    dups = np.sort(rng.choice(np.arange(n // 10, n), n_dup, replace=False))  # the first 10% stay originals
    originals = np.setdiff1d(np.arange(n), dups)
    # sources: an earlier original; 2% of the copies go to 20 hot rows
    earlier = np.searchsorted(originals, dups)  # number of originals before each dup (>= 1)
    picks = originals[(rng.random(n_dup) * earlier).astype(np.int64)]
    hot = rng.random(n_dup) < 0.02
    picks[hot] = originals[rng.integers(0, 20, hot.sum())]
    source[dups] = picks
    for start in range(0, n_dup, GEN_CHUNK):
        d, s = dups[start : start + GEN_CHUNK], picks[start : start + GEN_CHUNK]
        base = out[s].astype(np.float64)
        cos = rng.uniform(0.85, 0.99, len(d))[:, None]
        noise = rng.standard_normal(base.shape)
        noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to the source: cosine is exactly `cos`
        out[d] = (cos * base + np.sqrt(1 - cos**2) * _unit(noise)).astype(np.float32)
    return out, source


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exact_pairs(vectors: np.ndarray, sample: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    queries = vectors[sample]
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(vectors), BRUTE_DB_CHUNK):
        sims = queries @ vectors[start : start + BRUTE_DB_CHUNK].T
        qi, dj = np.nonzero(sims >= threshold - SIMILARITY_TOLERANCE)
        pairs.update((int(sample[q]), int(start + j)) for q, j in zip(qi, dj, strict=True))
    return {(q, j) for q, j in pairs if q != j}


def found_pairs(found: Neighbors, sample: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for local, q in enumerate(sample):
        ids, _ = found.of(local)
        pairs.update((int(q), int(j)) for j in ids if j != q)
    return pairs


def dedup_counts(found: Neighbors) -> tuple[int, int]:
    """(rows with any earlier neighbour, rows a greedy in-order dedup drops: an earlier KEPT neighbour)."""
    n = len(found)
    owner = np.repeat(np.arange(n), np.diff(found.lims))
    earlier = found.ids < owner
    candidates = np.unique(owner[earlier])
    kept = np.ones(n, dtype=bool)
    for i in candidates:  # rows without an earlier neighbour are kept: only these need the sequential pass
        ids, _ = found.of(int(i))
        ids = ids[ids < i]
        if kept[ids].any():
            kept[i] = False
    return len(candidates), int(n - kept.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--queries-for-recall", type=int, default=2000)
    parser.add_argument("--dup-share", type=float, default=0.08)
    parser.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "hnsw"])
    parser.add_argument("--nlist", type=int, default=0, help="override the chosen nlist (ivf)")
    parser.add_argument("--nprobe", type=int, default=0, help="override the chosen nprobe (ivf)")
    parser.add_argument("--sweep", default="8,16,32,64", help="nprobe values tried on the recall sample (ivf)")
    parser.add_argument("--skip-full", action="store_true", help="only the recall sample, no full self-search")
    parser.add_argument(
        "--stage", action="store_true",
        help="also time the whole dedup stage (polyculture.stages.dedup.dedup: exact hashes, index, greedy keep) "
        "on a frame of unique texts; with --skip-full, instead of the bare index search",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    report: dict[str, object] = {"n": args.n, "dim": args.dim, "threshold": args.threshold, "threads": args.threads}

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    vectors, source = make_embeddings(args.n, args.dim, args.dup_share, args.seed)
    report["generate_s"] = round(time.perf_counter() - started, 1)
    probe = vectors[np.random.default_rng(1).choice(args.n, 2000)]
    typical = (probe[:1000] * probe[1000:]).sum(1)
    report["typical_cosine_p5_p50_p95"] = [round(float(x), 3) for x in np.percentile(typical, [5, 50, 95])]
    report["planted_duplicates"] = int((source >= 0).sum())
    log(f"generated {args.n} x {args.dim} in {report['generate_s']} s; cosines {report['typical_cosine_p5_p50_p95']}")

    plan: IndexPlan = choose_index(args.n, args.kind, device="cpu")
    if plan.kind == "ivf":
        nlist = args.nlist or plan.nlist
        plan = IndexPlan("ivf", "cpu", nlist=nlist, nprobe=args.nprobe or plan.nprobe, k=plan.k)
    report["plan"] = plan.__dict__

    started = time.perf_counter()
    index = SimilarityIndex.trained(vectors, plan, seed=args.seed)
    report["train_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    index.add(vectors)
    report["add_s"] = round(time.perf_counter() - started, 1)
    log(f"{plan.kind}: trained in {report['train_s']} s, added in {report['add_s']} s")

    sample = np.sort(
        np.random.default_rng(args.seed + 1).choice(args.n, min(args.queries_for_recall, args.n), replace=False)
    )
    started = time.perf_counter()
    truth = exact_pairs(vectors, sample, args.threshold)
    report["brute_force_sample_s"] = round(time.perf_counter() - started, 1)
    report["recall_sample"] = {"queries": len(sample), "exact_pairs": len(truth)}
    log(f"brute force over {len(sample)} queries: {len(truth)} pairs in {report['brute_force_sample_s']} s")

    sweep = []
    values = [int(v) for v in args.sweep.split(",")] if plan.kind == "ivf" else [0]
    for nprobe in values:
        if plan.kind == "ivf":
            index.tune_search(nprobe=min(nprobe, plan.nlist))
        started = time.perf_counter()
        got = index.neighbors(vectors[sample], args.threshold)
        seconds = time.perf_counter() - started
        pairs = found_pairs(got, sample)
        row = {
            "nprobe": nprobe if plan.kind == "ivf" else None,
            "sample_s": round(seconds, 2),
            "projected_full_s": round(seconds * args.n / len(sample), 0),
            "recall": round(len(pairs & truth) / len(truth), 4) if truth else None,
            "false_pairs": len(pairs - truth),
        }
        sweep.append(row)
        log(f"sample search {row}")
    report["sweep"] = sweep
    if plan.kind == "ivf":
        index.tune_search(nprobe=plan.nprobe)

    if not args.skip_full:
        started = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 60:
                last[0] = time.perf_counter()
                log(f"  self-search {done}/{total} ({time.perf_counter() - started:.0f} s)")

        found = index.neighbors(vectors, args.threshold, on_chunk=progress)
        report["full_search_s"] = round(time.perf_counter() - started, 1)
        pairs = found_pairs(Neighbors.concat([_slice(found, int(q)) for q in sample]), sample)
        report["full_search_recall"] = round(len(pairs & truth) / len(truth), 4) if truth else None
        report["neighbour_entries"] = int(found.lims[-1])
        report["truncated_queries"] = len(found.truncated)
        with_earlier, dropped = dedup_counts(found)
        report["rows_with_earlier_neighbour"] = with_earlier
        report["greedy_dedup_drops"] = dropped
        log(f"full self-search {report['full_search_s']} s")
    if args.stage:
        import polars as pl

        from polyculture.spec import DedupSpec
        from polyculture.stages.dedup import dedup

        frame = pl.DataFrame(
            {"record_id": [f"r{i}" for i in range(args.n)], "call_id": [f"c{i}" for i in range(args.n)],
             "text": [f"text {i}" for i in range(args.n)]}
        )  # fmt: skip
        started = time.perf_counter()
        result = dedup(frame, vectors, DedupSpec(threshold=args.threshold))
        report["stage_s"] = round(time.perf_counter() - started, 1)
        report["stage_dropped"] = int(result.rejects.height)
        log(f"dedup stage {report['stage_s']} s, {report['stage_dropped']} dropped")
    report["peak_rss_mib"] = round(peak_rss_mib())

    if args.json:
        print(json.dumps(report))
        return
    print(f"\ndedup similarity index, n={args.n:,} dim={args.dim} threshold={args.threshold} threads={args.threads}")
    print(f"  data: typical cosine p5/p50/p95 {report['typical_cosine_p5_p50_p95']}, "
          f"planted near-duplicates {report['planted_duplicates']:,}")  # fmt: skip
    detail = f"nlist={plan.nlist} nprobe={plan.nprobe}" if plan.kind == "ivf" else ""
    print(f"  index: {plan.kind} {detail}")
    for key in ("generate_s", "train_s", "add_s", "brute_force_sample_s", "full_search_s", "full_search_recall",
                "neighbour_entries", "truncated_queries", "rows_with_earlier_neighbour", "greedy_dedup_drops",
                "stage_s", "stage_dropped",
                "peak_rss_mib"):  # fmt: skip
        if key in report:
            print(f"  {key:<30} {report[key]}")
    sample_info = report["recall_sample"]
    print(f"\n  recall sample: {sample_info['queries']} queries, {sample_info['exact_pairs']} exact pairs")  # type: ignore[index]
    print(f"  {'nprobe':>8} {'sample s':>10} {'projected full s':>18} {'recall':>8} {'false pairs':>12}")
    for row in sweep:
        print(f"  {row['nprobe'] or '-'!s:>8} {row['sample_s']:>10} {row['projected_full_s']:>18} "
              f"{row['recall']!s:>8} {row['false_pairs']:>12}")  # fmt: skip


def _slice(found: Neighbors, q: int) -> Neighbors:
    ids, sims = found.of(q)
    return Neighbors(np.array([0, len(ids)], dtype=np.int64), ids, sims)


if __name__ == "__main__":
    main()
