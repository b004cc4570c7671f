"""Diversity metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from polyculture.metrics.attribute import attribute_summary
from polyculture.metrics.lexical import distinct_n, tokenize
from polyculture.metrics.semantic import mean_pairwise_similarity, semantic_diversity


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("The Doctor's cat, don't RUN!") == ["the", "doctor's", "cat", "don't", "run"]


def test_distinct_n_exact_values() -> None:
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 tokens
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # "the cat" twice
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(["The cat.", "the CAT!"], 1) == pytest.approx(2 / 4)


def test_distinct_n_does_not_span_texts_and_handles_no_ngrams() -> None:
    # Across the boundary "a b" + "c" would form "b c"; it must not be counted.
    assert distinct_n(["a b", "c"], 2) == pytest.approx(1 / 1)
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "...", "one"], 2) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["a"], 0)


def test_semantic_diversity_identical_is_zero_and_orthogonal_is_hundred() -> None:
    same = np.tile(np.array([[0.6, 0.8, 0.0]], dtype=np.float32), (5, 1))
    assert semantic_diversity(same) == pytest.approx(0.0, abs=1e-9)
    assert mean_pairwise_similarity(same) == pytest.approx(1.0)
    orthogonal = np.eye(4, dtype=np.float32)
    assert semantic_diversity(orthogonal) == pytest.approx(100.0)
    assert mean_pairwise_similarity(orthogonal) == pytest.approx(0.0)


def test_semantic_diversity_clips_negative_cosines_and_averages_pairs() -> None:
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert semantic_diversity(opposite) == pytest.approx(100.0)  # clip(-1) = 0, not 200
    assert mean_pairwise_similarity(opposite) == pytest.approx(-1.0)
    # Pairs: cos 0, 0.6, 0.8 -> mean of (1, 0.4, 0.2) = 0.5333...
    three = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert semantic_diversity(three) == pytest.approx(100 * 1.6 / 3)
    assert mean_pairwise_similarity(three) == pytest.approx(1.4 / 3)
    # Not normalised on input: the metric is about directions.
    assert semantic_diversity(three * 7.0) == pytest.approx(100 * 1.6 / 3)


def test_semantic_diversity_small_inputs_and_sampling() -> None:
    assert semantic_diversity(np.zeros((0, 3))) == 0.0
    assert semantic_diversity(np.ones((1, 3))) == 0.0
    assert mean_pairwise_similarity(np.ones((1, 3))) == 0.0
    rng = np.random.default_rng(1)
    many = rng.normal(size=(300, 8))
    sampled = semantic_diversity(many, max_rows=50, seed=3)
    assert sampled == semantic_diversity(many, max_rows=50, seed=3)  # deterministic
    assert math.isfinite(sampled) and 0 < sampled <= 100
    assert sampled == pytest.approx(semantic_diversity(many), abs=10)
    with pytest.raises(ValueError, match="NaN"):
        semantic_diversity(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_attribute_summary_hand_computed() -> None:
    summary = attribute_summary(["a", "a", "b", None, "z"], {"a": 0.5, "b": 0.25, "c": 0.25})
    assert summary["n"] == 5
    assert summary["counts"] == {"a": 2, "b": 1, "c": 0}
    assert summary["other"] == 2  # the null and the off-target "z"
    assert summary["other_examples"] == [{"value": None, "count": 1}, {"value": "z", "count": 1}]
    assert summary["observed_share"] == pytest.approx({"a": 0.4, "b": 0.2, "c": 0.0})
    assert summary["other_share"] == pytest.approx(0.4)
    assert summary["target_share"] == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    # Over the allowed values: p = (2/3, 1/3, 0).
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert summary["entropy_bits"] == pytest.approx(h)
    assert summary["normalized_entropy"] == pytest.approx(h / math.log2(3))
    assert summary["kl_bits"] == pytest.approx(math.log2(4 / 3))  # both terms have ratio 4/3
    assert summary["kl_infinite"] is False
    assert summary["total_variation"] == pytest.approx(0.5 * (0.1 + 0.05 + 0.25 + 0.4))
    assert summary["coverage"] == pytest.approx(2 / 3)


def test_attribute_summary_on_target_and_normalises_weights() -> None:
    summary = attribute_summary(["a", "b", "c", "d"], {"a": 1, "b": 1, "c": 1, "d": 1})
    assert summary["entropy_bits"] == pytest.approx(2.0)
    assert summary["normalized_entropy"] == pytest.approx(1.0)
    assert summary["kl_bits"] == pytest.approx(0.0)
    assert summary["total_variation"] == pytest.approx(0.0)
    assert summary["coverage"] == 1.0
    assert summary["other"] == 0


def test_attribute_summary_infinite_kl_is_flagged_and_json_safe() -> None:
    summary = attribute_summary(["a", "b", "b"], {"a": 1.0, "b": 0.0})
    assert summary["kl_bits"] is None
    assert summary["kl_infinite"] is True
    assert summary["total_variation"] == pytest.approx(2 / 3)
    json.dumps(summary, allow_nan=False)


def test_attribute_summary_empty_and_all_other() -> None:
    empty = attribute_summary([], {"a": 1.0, "b": 1.0})
    assert empty["n"] == 0 and empty["kl_bits"] is None and empty["total_variation"] is None
    assert empty["entropy_bits"] == 0.0 and empty["coverage"] == 0.0
    json.dumps(empty, allow_nan=False)
    off = attribute_summary(["x", None], {"a": 1.0})
    assert off["other"] == 2 and off["counts"] == {"a": 0}
    assert off["kl_bits"] is None and off["kl_infinite"] is False
    assert off["total_variation"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="target"):
        attribute_summary(["a"], {"a": 0.0})
