"""The report's figures at scale: the vectorised versions equal the plain definitions, and the figures that became
seeded samples agree with the exact ones on a small set (speed is in bench/report_scale.py)."""

from __future__ import annotations

import gzip
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from polyculture.metrics import conceptual, semantic
from polyculture.metrics.attribute import attribute_summary
from polyculture.metrics.calibration import calibration
from polyculture.metrics.conceptual import conceptual_diversity, individual_key, individual_keys
from polyculture.metrics.lexical import compression_ratio, distinct_n, distinct_ns, tokenize
from polyculture.metrics.semantic import nearest_neighbour_similarity, prepared_rows
from polyculture.report import diversity
from polyculture.report.diversity import COMPRESSION_MAX_TEXTS


def _corpus(n: int, seed: int = 0) -> list[str]:
    """English-like texts with repeated words and phrases, a few non-ASCII words, empty texts and punctuation."""
    rng = np.random.default_rng(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "Don't", "stop", "naïve", "café", "ÉCOLE", "x_y", "12", "straße",
             "l'été", "½", "三", "İstanbul", "ΣΑΣ", "e\u0301cole", "it\u2019s", "end."]  # fmt: skip
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    texts = []
    for _ in range(n):
        k = int(rng.integers(0, 12))
        words = rng.choice(vocab, size=k, p=weights / weights.sum())
        texts.append(", ".join(words) if rng.random() < 0.2 else " ".join(words))
    return texts


def _plain_distinct_n(texts: list[str], n: int) -> float:
    """The definition, one text at a time (the implementation before polars)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = tokenize(text or "")
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def test_distinct_n_vectorised_equals_the_definition() -> None:
    texts = _corpus(3000) + ["", "...", "one"]
    figures = distinct_ns(texts, (1, 2, 3, 4))
    for n in (1, 2, 3, 4):
        assert figures[n] == pytest.approx(_plain_distinct_n(texts, n), rel=0, abs=1e-12)
    assert distinct_n(pl.Series(texts), 2) == figures[2]  # a polars column as well as a list
    assert distinct_ns([None, "a b"], (1, 2)) == {1: 1.0, 2: 1.0}  # type: ignore[list-item]


def test_individual_keys_vectorised_equal_individual_key() -> None:
    ids = ["c3-p1-s0", "c3-p1-s2-t1", "r2-c3-p12-s0", "c3-p1", "c31", "", "x-c1-p2"]
    assert individual_keys(pl.Series(ids)).to_list() == [individual_key(i) for i in ids]


def _plain_variability(keys: list[str], x: np.ndarray) -> tuple[float, float]:
    """Internal and population variability from the full pair matrix (the definition)."""
    unit = prepared_rows(x, len(keys) + 2, 0)
    sims = unit @ unit.T
    labels = np.array(keys)
    groups: dict[str, list[int]] = defaultdict(list)
    for row, key in enumerate(keys):
        groups[key].append(row)
    internal = []
    for rows in groups.values():
        if len(rows) >= 2:
            block = sims[np.ix_(rows, rows)]
            internal.append(1.0 - (block.sum() - np.trace(block)) / (len(rows) * (len(rows) - 1)))
    different = labels[:, None] != labels[None, :]
    return float(np.mean(internal)), float(1.0 - sims[different].mean())


def test_conceptual_diversity_is_exact_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    # Interleaved (not contiguous) individuals of 1 to ~150 records, so chunks split nowhere near group borders.
    keys = [f"k{int(rng.integers(0, 60))}" if rng.random() < 0.9 else "big" for _ in range(1500)]
    keys[-1] = "alone"
    x = rng.standard_normal((len(keys), 8)).astype(np.float32) + 0.5  # not unit, not centred
    x[3] = 0.0  # a zero row stays zero
    internal, population = _plain_variability(keys, x)
    for chunk in (7, 100_000):
        monkeypatch.setattr(conceptual, "CHUNK_ROWS", chunk)
        result = conceptual_diversity(keys, x)
        assert result["internal_variability"] == pytest.approx(internal, rel=1e-9)
        assert result["population_variability"] == pytest.approx(population, rel=1e-9)


def test_sampled_compression_ratio_agrees_with_the_exact_figure() -> None:
    # Texts of 20-40 words over a 500-word Zipf vocabulary (~1.3 MB joined). DEFLATE looks back 32 KB, so past a few
    # hundred KB the ratio is an average over windows and a seeded sample estimates it; a sample much under 100 KB
    # reads low (each block's Huffman tables and window warm up), which is why the report samples 10k texts (~1.5 MB).
    rng = np.random.default_rng(2)
    vocab = np.array([f"{w}{i}" for i, w in enumerate(["word", "café", "thing"] * 167)])
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    texts = [" ".join(rng.choice(vocab, size=int(rng.integers(20, 40)), p=weights / weights.sum()))
             for _ in range(6000)]  # fmt: skip
    exact = compression_ratio(texts)
    joined = " ".join(texts).encode()
    assert exact == pytest.approx(len(joined) / len(gzip.compress(joined, compresslevel=9, mtime=0)))
    for seed in range(3):
        assert compression_ratio(texts, max_texts=2000, seed=seed) == pytest.approx(exact, rel=0.01)
    assert COMPRESSION_MAX_TEXTS >= 2000  # the report samples at least as many texts as checked here


def test_calibration_any_hashable_keys_and_bad_probabilities() -> None:
    result = calibration(["c1", "c1", "c2", "c2", "c2"], [("a",), ("b",), ("a",), ("b",), ("z",)],
                         [0.3, 0.1, float("nan"), 0.2, -1.0])  # fmt: skip
    assert result is not None and (result["calls"], result["items"]) == (2, 3)
    shares = {v["value"]: v["verbalized_share"] for v in result["per_value"]}
    assert shares == pytest.approx({("a",): 0.375, ("b",): 0.625})  # call 1: 0.75 / 0.25; call 2: b alone = 1


def test_report_states_its_samples(tmp_path: Path) -> None:
    from tests.test_report import run_report

    report, out_dir = run_report(tmp_path)
    assert report["sample"]["compression_texts"] == COMPRESSION_MAX_TEXTS
    assert report["sample"]["semantic_rows"] == 2000
    markdown = (out_dir / "report.md").read_text()
    assert f"compression ratio over at most {COMPRESSION_MAX_TEXTS} texts" in markdown
    assert "distinct-n, attribute tables and conceptual diversity use every record" in markdown
    assert f"compression ratio over at most {COMPRESSION_MAX_TEXTS} texts" in (out_dir / "report.html").read_text()


def test_attribute_summary_of_a_polars_column_equals_the_list_one() -> None:
    values = ["doctor", "teacher", None, "pilot", "doctor", "Doctor", "pilot", "chef", None] * 7
    target = {"doctor": 2.0, "teacher": 1.0, "chef": 1.0}
    assert attribute_summary(pl.Series(values, dtype=pl.String), target) == attribute_summary(values, target)


def test_nearest_neighbours_by_faiss_equal_the_dense_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x[10] = x[11]  # an exact duplicate pair: each one's nearest other row scores 1
    dense = nearest_neighbour_similarity(x, max_rows=600)
    monkeypatch.setattr(semantic, "DENSE_MAX_ROWS", 100)
    by_faiss = nearest_neighbour_similarity(x, max_rows=600)
    np.testing.assert_allclose(by_faiss, dense, atol=1e-5)
    assert by_faiss[10] == pytest.approx(1.0, abs=1e-5) and by_faiss[11] == pytest.approx(1.0, abs=1e-5)


def test_stages_distinct_measures_subsets_as_their_own_texts() -> None:
    texts = _corpus(400, seed=4)
    validated = pl.DataFrame({"record_id": [f"r{i}" for i in range(400)], "text": texts})
    pool = validated[::3]  # a subset, in another order below
    final = validated[::5].with_columns(pl.when(pl.col("record_id") == "r10").then(pl.lit("rewritten words here"))
                                        .otherwise(pl.col("text")).alias("text"))  # fmt: skip
    frames = {"before": (validated, None), "after_dedup": (pool.reverse(), None), "after": (final, None)}
    assert diversity._rows_within(validated, final) is None  # a changed text: measured on its own
    got = diversity.stages_distinct(frames)
    for key, (frame, _) in frames.items():
        expected = {n: _plain_distinct_n(frame["text"].to_list(), n) for n in (1, 2)}
        assert got[key] == pytest.approx(expected, abs=1e-12)
