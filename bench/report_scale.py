"""Report at scale: `write_report` on synthetic runs of N records with random unit embeddings (issue 17, figure 4).

Builds a validated frame of N records (random 20-40-word texts over a 20,000-word Zipf vocabulary, two attributes, call ids
grouping records by prompt, VS probabilities), a pool of 90% of them and a final set of 80%, each with its rows of
one random float32 unit-embedding matrix (384-d, like MiniLM), then times `write_report` end to end and each of its
parts (wrapped in place by name), and prints peak RSS (the process's, including the synthetic data) and the RSS the
data alone held before the report started.

    PYTHONPATH=src python bench/report_scale.py --n 100000 --n 1000000

One run per size; the machine is shared, so figures move by +-20% between runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl

from polyculture.preflight import parse_spec
from polyculture.report import diversity, embedding_map, write
from polyculture.report.write import RecordSet, ReportInputs, write_report

SCHEMA = {
    "type": "object",
    "properties": {"job": {"type": "string"}, "mood": {"type": "string"}, "bio": {"type": "string"}},
    "required": ["job", "bio"],
}
VOCABULARY = 20_000
JOBS = ["doctor", "teacher", "farmer", "pilot", "chef"]
MOODS = ["happy", "sad", "calm"]
# The report's parts, wrapped by name in the module that calls them.
PARTS = {
    diversity: ["distinct_n", "distinct_ns", "compression_ratio", "self_bleu", "semantic_diversity", "mean_pairwise_similarity",
                "vendi_score", "nearest_neighbour_similarity", "_conceptual", "_calibration"],
    write: ["stages_distinct", "attribute_figures", "monoculture", "plot_attribute", "plot_similarity", "embedding_map",
            "render_markdown", "render_html", "reject_groups"],
    embedding_map: ["project_2d", "plot_embedding_map"],
}  # fmt: skip


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(n: int, dim: int, seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    # English-like words: 20,000 random lower-case words of 2-10 letters drawn with Zipf weights 1/rank^1.07.
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    word_lengths = rng.integers(2, 11, size=VOCABULARY)
    vocab = np.array(["".join(letters[rng.integers(0, 26, size=k)]) for k in word_lengths])
    weights = 1.0 / np.arange(1, VOCABULARY + 1) ** 1.07
    lengths = rng.integers(20, 40, size=n)
    words = pl.Series("word", vocab).gather(rng.choice(VOCABULARY, size=int(lengths.sum()), p=weights / weights.sum()))
    # One space-joined string per record, joined by polars (a Python loop over a million records took ~30 s).
    docs = pl.DataFrame({"word": words, "doc": np.repeat(np.arange(n), lengths)})
    texts = docs.group_by("doc", maintain_order=True).agg(pl.col("word").str.join(" "))["word"]
    prompts = np.arange(n) // 8  # 8 records per prompt, like n=8 sampling
    frame = pl.DataFrame(
        {
            "row": np.arange(n),
            "prompt": prompts,
            "cell_id": (prompts % 15).astype(np.int64),
            "verbalized_probability": rng.random(n),
            "text": texts,
            "job": pl.Series(JOBS).gather(rng.integers(0, len(JOBS), size=n)),
            "mood": pl.Series(MOODS).gather(rng.integers(0, len(MOODS), size=n)),
        }
    ).select(
        record_id=pl.format("r{}", "row"),
        call_id=pl.format("c{}-p{}-s0", "cell_id", "prompt"),
        cell_id="cell_id",
        method=pl.lit("vs_standard"),
        verbalized_probability="verbalized_probability",
        text="text",
        job="job",
        mood="mood",
    )
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return frame, x


def wrap_parts(timings: dict[str, float]) -> None:
    for module, names in PARTS.items():
        for name in names:
            original = getattr(module, name, None)
            if original is None:  # renamed between versions (distinct_n -> distinct_ns)
                continue

            @functools.wraps(original)
            def timed(*args, __original=original, __name=name, **kwargs):  # type: ignore[no-untyped-def]
                started = time.perf_counter()
                try:
                    return __original(*args, **kwargs)
                finally:
                    timings[__name] += time.perf_counter() - started

            setattr(module, name, timed)


def cached_synthetic(n: int, dim: int, data_dir: Path | None) -> tuple[pl.DataFrame, np.ndarray]:
    """`synthetic`, read from / written to data_dir when given (records.parquet, embeddings.npy), so a run can time
    the report alone on a machine where one long process is unwelcome."""
    if data_dir is None:
        return synthetic(n, dim, seed=7)
    records, vectors = data_dir / f"records-{n}.parquet", data_dir / f"embeddings-{n}x{dim}.npy"
    if records.exists() and vectors.exists():
        return pl.read_parquet(records), np.load(vectors)
    frame, x = synthetic(n, dim, seed=7)
    data_dir.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(records)
    np.save(vectors, x)
    return frame, x


def run(n: int, dim: int, folder: Path, data_dir: Path | None = None) -> dict[str, object]:
    (folder / "person.schema.json").write_text(json.dumps(SCHEMA))
    spec = parse_spec(
        {
            "name": "scale",
            "description": "Report scale bench.",
            "prompt": {"template": "Describe a {{ job }}."},
            "record": {"schema": "person.schema.json", "text_field": "bio"},
            "method": {"name": "vs_standard", "k": 5},
            "attributes": [
                {"name": "job", "values": JOBS},
                {"name": "mood", "values": MOODS, "source": "field"},
            ],
            "target_size": int(n * 0.8),
            "seed": 7,
        },
        base_dir=folder,
    )
    started = time.perf_counter()
    frame, x = cached_synthetic(n, dim, data_dir)
    rng = np.random.default_rng(1)
    pool_rows = np.sort(rng.choice(n, size=int(n * 0.9), replace=False))
    final_rows = np.sort(rng.choice(pool_rows, size=int(n * 0.8), replace=False))
    pool, final = frame[pool_rows], frame[final_rows]
    pool_x, final_x = x[pool_rows], x[final_rows]
    cells = (
        final.group_by("job").len("kept").with_columns(
            cell_key="job=" + pl.col("job"), target=pl.col("kept"), available=pl.col("kept"), deficit=pl.lit(0),
            reason=pl.lit(None, dtype=pl.String))
    )  # fmt: skip
    rejects = pl.DataFrame(schema={"record_id": pl.String, "call_id": pl.String, "stage": pl.String,
                                   "reason": pl.String, "detail": pl.String})  # fmt: skip
    data_s = time.perf_counter() - started
    data_rss = current_rss_mib()
    timings: dict[str, float] = defaultdict(float)
    wrap_parts(timings)
    started = time.perf_counter()
    write_report(
        spec,
        ReportInputs(
            run_id="bench",
            counts={"valid": n, "after_semantic_dedup": pool.height, "final": final.height, "completions": n // 5},
            validated=RecordSet(frame, x),
            pool=RecordSet(pool, pool_x),
            final=RecordSet(final, final_x),
            rejects=rejects,
            cells=cells,
            usage={},
        ),
        folder / "report",
    )
    total = time.perf_counter() - started
    return {
        "n": n,
        "data_s": round(data_s, 1),
        "report_s": round(total, 1),
        "parts_s": {k: round(v, 2) for k, v in sorted(timings.items(), key=lambda kv: -kv[1])},
        "rss_before_report_mib": round(data_rss),
        "peak_rss_mib": round(rss_mib()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="records (repeatable; default 100000)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--data-dir", type=Path, help="keep the synthetic data here and reuse it (same n, dim)")
    parser.add_argument("--only-data", action="store_true", help="write the synthetic data to --data-dir and stop")
    args = parser.parse_args()
    if args.only_data:
        if args.data_dir is None:
            parser.error("--only-data needs --data-dir")
        for n in args.n or [100_000]:
            cached_synthetic(n, args.dim, args.data_dir)
        return
    for n in args.n or [100_000]:
        # One size per process would give clean peaks; run sizes in separate invocations for that.
        with tempfile.TemporaryDirectory() as tmp:
            result = run(n, args.dim, Path(tmp), args.data_dir)
        print(json.dumps(result), flush=True)
        if len(args.n or []) > 1:
            print("note: peak RSS is the process's so far; run one size per invocation for a clean peak",
                  file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
