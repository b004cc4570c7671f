"""decontaminate: records that leak a benchmark item are rejects, named by benchmark and item.

Two tests per checked text (record.text_field or the whole record, or each of `fields`), against every benchmark:
- n-gram: the text shares a word n-gram (index.ngrams: casefolded words, punctuation dropped) with an item, or holds
  a short item (fewer than n words) whole;
- embedding: the cosine of the nearest item (FAISS inner product over L2-normalised vectors of the build's embedder,
  whose text-hash cache embeds each benchmark once) is at or above the threshold.
A record flagged by either test is a reject (reason `ngram_overlap` when the n-gram test fired, else
`embedding_neighbour`). It runs after dedup on each round's pool; each benchmark gets a row of counts for the report.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl

from polyculture.index.benchmarks import Benchmark, read_benchmark_file, read_champ
from polyculture.index.ngrams import NgramIndex, words
from polyculture.index.similarity import SIMILARITY_TOLERANCE
from polyculture.index.sources import SourceError
from polyculture.index.text import clip
from polyculture.preflight import locate_benchmark
from polyculture.spec import DecontaminateSpec
from polyculture.stages.embed import Embedder
from polyculture.stages.rejects import REJECTS_SCHEMA, reject

STAGE = "decontaminate"
EXAMPLES = 3  # flagged records shown per benchmark
ITEM_CHARS = 80  # of a benchmark item's text in a reject's detail
TEXT_COLUMN = "text"  # the field name reported when the embedded text is checked (no `fields`)


@dataclass(frozen=True)
class ContaminationExample:
    record_id: str
    field: str
    item_id: str
    item_text: str  # clipped to ITEM_CHARS
    test: str  # ngram | embedding | both
    shared_ngrams: int
    cosine: float


@dataclass(frozen=True)
class BenchmarkContamination:
    """One benchmark's row: records checked and flagged by each test (`flagged` = n-gram + embedding - both)."""

    benchmark: str
    source: str
    items: int
    records_checked: int
    flagged_ngram: int
    flagged_embedding: int
    flagged_both: int
    flagged: int
    examples: tuple[ContaminationExample, ...]


@dataclass(frozen=True)
class DecontaminationResult:
    kept: pl.DataFrame
    kept_embeddings: np.ndarray  # rows aligned with kept
    rejects: pl.DataFrame
    benchmarks: tuple[BenchmarkContamination, ...]

    def table(self) -> list[dict[str, Any]]:
        """The per-benchmark rows as JSON data (result.json, the report): dicts and lists."""
        return [{**asdict(row), "examples": [asdict(e) for e in row.examples]} for row in self.benchmarks]


@dataclass
class Evidence:
    """The strongest evidence one benchmark holds against one record, over its checked texts: the most n-grams
    shared with one item (0: none) and the cosine of the nearest item (-1: nothing checked); items by position."""

    shared: int = 0
    ngram_item: int = -1
    ngram_field: str = ""
    cosine: float = -1.0
    nearest_item: int = -1
    nearest_field: str = ""


def load_benchmarks(settings: DecontaminateSpec, base_dir: Path) -> list[Benchmark]:
    """The spec's benchmarks read (champ from its package; files beside the spec, then in the working folder)."""
    loaded = []
    for benchmark in settings.benchmarks:
        if isinstance(benchmark, str):
            loaded.append(read_champ())
            continue
        found = locate_benchmark(benchmark.path, base_dir)
        if found is None:
            raise SourceError(f"decontaminate.benchmarks: '{benchmark.path}' not found")
        loaded.append(read_benchmark_file(benchmark.label, found, benchmark.text_column, benchmark.id_column))
    return loaded


def decontaminate(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    settings: DecontaminateSpec,
    benchmarks: list[Benchmark],
    embedder: Embedder,
) -> DecontaminationResult:
    """Reject the records that overlap a benchmark item (n-gram or embedding test); count each benchmark's flags."""
    n = records.height
    texts = checked_texts(records, settings.fields)
    vectors = {TEXT_COLUMN: embeddings} if settings.fields is None else {f: _encode(embedder, t) for f, t in texts.items()}
    checked = sum(1 for i in range(n) if any(column[i] for column in texts.values()))
    threshold = settings.embedding_threshold - SIMILARITY_TOLERANCE  # float32: an exact copy can score 0.99999994
    evidence = [benchmark_evidence(benchmark, texts, vectors, settings.ngram, embedder) for benchmark in benchmarks]
    table = []
    for benchmark, found in zip(benchmarks, evidence, strict=True):
        by_ngram = {i for i, e in enumerate(found) if e.shared > 0}
        by_embedding = {i for i, e in enumerate(found) if e.cosine >= threshold}
        flagged = sorted(by_ngram | by_embedding)
        examples = tuple(
            _example(benchmark, records["record_id"][i], found[i], i in by_ngram, i in by_embedding)
            for i in flagged[:EXAMPLES]
        )
        table.append(
            BenchmarkContamination(
                benchmark=benchmark.name, source=benchmark.source, items=len(benchmark.texts), records_checked=checked,
                flagged_ngram=len(by_ngram), flagged_embedding=len(by_embedding),
                flagged_both=len(by_ngram & by_embedding), flagged=len(flagged), examples=examples,
            )
        )  # fmt: skip

    rows, kept_mask = [], np.ones(n, dtype=bool)
    record_ids, call_ids = records["record_id"].to_list(), records["call_id"].to_list()
    for i in range(n):
        detail = _reject_detail(benchmarks, [found[i] for found in evidence], settings, threshold)
        if detail is not None:
            kept_mask[i] = False
            rows.append(reject(record_ids[i], call_ids[i], STAGE, *detail))
    return DecontaminationResult(
        kept=records.filter(pl.Series(kept_mask)) if n else records,
        kept_embeddings=np.ascontiguousarray(embeddings[np.flatnonzero(kept_mask)], dtype=np.float32),
        rejects=pl.DataFrame(rows, schema=REJECTS_SCHEMA),
        benchmarks=tuple(table),
    )


def checked_texts(records: pl.DataFrame, fields: list[str] | None) -> dict[str, list[str]]:
    """The texts checked, by field, rows aligned with `records` ("" where a record has none). Without `fields`, the
    text embedded for dedup; a field that is not a string is checked as its JSON."""
    if fields is None:
        return {TEXT_COLUMN: [t or "" for t in records[TEXT_COLUMN].to_list()]}
    parsed = [json.loads(raw) for raw in records["record_json"].to_list()]
    return {field: [_as_text(record.get(field)) for record in parsed] for field in fields}


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _encode(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """Vectors of the non-empty texts (cached by text hash); zero rows for empty ones, which are never checked."""
    out = np.zeros((len(texts), embedder.dimension), dtype=np.float32)
    rows = [i for i, t in enumerate(texts) if t]
    if rows:
        out[rows] = embedder.encode([texts[i] for i in rows])
    return out


def benchmark_evidence(
    benchmark: Benchmark, texts: dict[str, list[str]], vectors: dict[str, np.ndarray], n: int, embedder: Embedder
) -> list[Evidence]:
    """Per record: the item sharing the most n-grams with one of its texts, and the nearest item by cosine (both
    tests always run, so a caller can apply any threshold; bench/decontamination.py does)."""
    size = len(next(iter(texts.values())))
    found = [Evidence() for _ in range(size)]
    if not benchmark.texts or not size:
        return found
    ngrams = NgramIndex(benchmark.texts, n)
    index = faiss.IndexFlatIP(embedder.dimension)
    index.add(embedder.encode(list(benchmark.texts)))
    for field, column in texts.items():
        rows = [i for i, t in enumerate(column) if t]
        if not rows:
            continue
        sims, items = index.search(np.ascontiguousarray(vectors[field][rows], dtype=np.float32), 1)
        for row, sim, item in zip(rows, sims[:, 0].tolist(), items[:, 0].tolist(), strict=True):
            e = found[row]
            if sim > e.cosine:
                e.cosine, e.nearest_item, e.nearest_field = float(min(sim, 1.0)), int(item), field
            shared = ngrams.matches(column[row])
            if shared:
                # Most shared n-grams; ties go to the first item.
                best, count = min(shared.items(), key=lambda kv: (-kv[1], kv[0]))
                if count > e.shared:
                    e.shared, e.ngram_item, e.ngram_field = count, best, field
    return found


def _example(benchmark: Benchmark, record_id: str, e: Evidence, ngram: bool, embedding: bool) -> ContaminationExample:
    item = e.ngram_item if ngram else e.nearest_item
    return ContaminationExample(
        record_id=record_id,
        field=e.ngram_field if ngram else e.nearest_field,
        item_id=benchmark.item_ids[item],
        item_text=clip(benchmark.texts[item], ITEM_CHARS),
        test="both" if ngram and embedding else "ngram" if ngram else "embedding",
        shared_ngrams=e.shared,
        cosine=round(e.cosine, 4),
    )


def _reject_detail(
    benchmarks: list[Benchmark], found: list[Evidence], settings: DecontaminateSpec, threshold: float
) -> tuple[str, str] | None:
    """(reason, detail) of a flagged record: the benchmark sharing the most n-grams, else the one whose item is
    nearest by cosine; None when no benchmark flags it."""
    ngram_hits = [(b, e) for b, e in zip(benchmarks, found, strict=True) if e.shared > 0]
    if ngram_hits:
        b, e = max(ngram_hits, key=lambda be: be[1].shared)  # max keeps the first of equals: spec order
        item = f"{b.name} item {b.item_ids[e.ngram_item]} '{clip(b.texts[e.ngram_item], ITEM_CHARS)}'"
        overlap = f"holds {item} whole" if e.shared == 1 and _is_whole(b, e.ngram_item, settings.ngram) else (
            f"shares {e.shared} word {settings.ngram}-gram{'s' if e.shared > 1 else ''} with {item}"
        )  # fmt: skip
        return "ngram_overlap", f"{overlap} (field {e.ngram_field}; nearest cosine {e.cosine:.3f})"
    embedding_hits = [(b, e) for b, e in zip(benchmarks, found, strict=True) if e.cosine >= threshold]
    if embedding_hits:
        b, e = max(embedding_hits, key=lambda be: be[1].cosine)
        return "embedding_neighbour", (
            f"cosine {e.cosine:.3f} to {b.name} item {b.item_ids[e.nearest_item]} "
            f"'{clip(b.texts[e.nearest_item], ITEM_CHARS)}' (field {e.nearest_field}; threshold "
            f"{settings.embedding_threshold})"
        )
    return None


def _is_whole(benchmark: Benchmark, item: int, n: int) -> bool:
    return len(words(benchmark.texts[item])) < n


def merge_decontamination(earlier: DecontaminationResult, later: DecontaminationResult) -> DecontaminationResult:
    """One result for the records of `earlier` then those of `later` (each record is judged alone, so a later round
    checks only its new records): kept rows and rejects in order, each benchmark's counts summed, its first examples."""
    table = tuple(
        replace(
            a,
            records_checked=a.records_checked + b.records_checked,
            flagged_ngram=a.flagged_ngram + b.flagged_ngram,
            flagged_embedding=a.flagged_embedding + b.flagged_embedding,
            flagged_both=a.flagged_both + b.flagged_both,
            flagged=a.flagged + b.flagged,
            examples=(a.examples + b.examples)[:EXAMPLES],
        )
        for a, b in zip(earlier.benchmarks, later.benchmarks, strict=True)
    )
    return DecontaminationResult(
        kept=pl.concat([earlier.kept, later.kept]),
        kept_embeddings=np.ascontiguousarray(np.vstack([earlier.kept_embeddings, later.kept_embeddings]), np.float32),
        rejects=pl.concat([earlier.rejects, later.rejects]),
        benchmarks=table,
    )
