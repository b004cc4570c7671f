"""Diversity metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from polyculture.metrics.attribute import attribute_summary
from polyculture.metrics.conceptual import conceptual_diversity, individual_key
from polyculture.metrics.lexical import compression_ratio, distinct_n, tokenize
from polyculture.metrics.monoculture import compare_dispersion, value_dispersion
from polyculture.metrics.self_bleu import self_bleu
from polyculture.metrics.semantic import mean_pairwise_similarity, nearest_neighbour_similarity, semantic_diversity
from polyculture.metrics.vendi import vendi_score


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


# ---- lexical: compression ratio; self-BLEU against nltk ----------------------------------------------------------------


def test_compression_ratio_is_gzip_of_the_joined_texts() -> None:
    import gzip

    texts = ["the cat sat on the mat"] * 50
    joined = " ".join(texts).encode()
    assert compression_ratio(texts) == pytest.approx(len(joined) / len(gzip.compress(joined, mtime=0)))
    varied = [f"record {i}: {np.random.default_rng(i).integers(0, 10**12)} words" for i in range(50)]
    assert compression_ratio(texts) > 5 > compression_ratio(varied)  # repetition compresses: higher is less diverse
    assert compression_ratio([]) is None and compression_ratio(["", None]) is None  # type: ignore[list-item]


def test_self_bleu_matches_nltk_sentence_bleu() -> None:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    rng = np.random.default_rng(7)
    vocab = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "sofa", "quickly", "slowly"]
    for _ in range(40):
        # Lengths from 0 to 14 tokens: empty texts, texts shorter than 4-grams and ties in reference length included.
        texts = [" ".join(rng.choice(vocab, size=rng.integers(0, 15))) for _ in range(rng.integers(2, 9))]
        tokens = [tokenize(t) for t in texts]
        expected = np.mean(
            [
                sentence_bleu(
                    [tokens[j] for j in range(len(tokens)) if j != i],
                    tokens[i],
                    smoothing_function=SmoothingFunction().method1,
                )
                for i in range(len(tokens))
            ]
        )
        assert self_bleu(texts) == pytest.approx(expected, abs=1e-12), texts


def test_self_bleu_edges_and_sampling() -> None:
    assert self_bleu(["only one"]) is None and self_bleu([]) is None
    assert self_bleu(["a b c d e", "a b c d e"]) == pytest.approx(1.0)  # identical texts: perfect overlap
    assert self_bleu(["a b", "c d"]) == 0.0  # no unigram in common
    many = [f"text number {i} about topic {i % 7}" for i in range(300)]
    sampled = self_bleu(many, max_texts=40, seed=2)
    assert sampled == self_bleu(many, max_texts=40, seed=2) and 0 < sampled < 1
    with pytest.raises(ValueError, match="max_n"):
        self_bleu(["a", "b"], max_n=0)


# ---- semantic: Vendi score, nearest neighbours ---------------------------------------------------------------------


def test_vendi_score_counts_effective_distinct_items() -> None:
    assert vendi_score(np.eye(4)) == pytest.approx(4.0)
    assert vendi_score(np.tile([[0.6, 0.8]], (5, 1))) == pytest.approx(1.0)
    # Three copies of e0 and e1, e2, e3: kernel eigenvalues (3, 1, 1, 1, 0, 0) / 6 -> exp(H) = sqrt(12).
    rows = np.vstack([np.eye(4)[[0, 0, 0]], np.eye(4)[1:]])
    assert vendi_score(rows) == pytest.approx(math.sqrt(12))
    assert vendi_score(np.zeros((0, 3))) is None
    # Fewer rows than dimensions (the QR shortcut) and more rows than dimensions: exp(entropy) of the n x n kernel.
    for shape in ((7, 30), (40, 6)):
        x = np.random.default_rng(1).normal(size=shape)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        eigen = np.linalg.eigvalsh(x @ x.T / shape[0])
        eigen = eigen[eigen > 1e-12]
        assert vendi_score(x) == pytest.approx(math.exp(-(eigen * np.log(eigen)).sum()))


def test_nearest_neighbour_similarity() -> None:
    x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert nearest_neighbour_similarity(x) == pytest.approx([0.6, 0.8, 0.8])
    assert len(nearest_neighbour_similarity(np.ones((1, 2)))) == 0


# ---- conceptual diversity ----------------------------------------------------------------------------------------


def test_individual_key_groups_by_cell_and_prompt() -> None:
    assert individual_key("c3-p1-s0") == "c3-p1"
    assert individual_key("c3-p1-s2-t1") == "c3-p1"
    assert individual_key("r2-c3-p12-s0") == "r2-c3-p12"
    assert individual_key("c3-p1") == "c3-p1"
    assert individual_key("c31") == "c31"  # not the pattern: the call is its own individual


def test_conceptual_diversity_hand_computed() -> None:
    # Two prompts, two answers each. A: e0 and (0.6, 0.8, 0); B: e2 twice.
    x = np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0, 0, 1.0], [0, 0, 1.0]])
    result = conceptual_diversity(["A", "A", "B", "B"], x)
    # Internal: A 1 - 0.6 = 0.4, B 0 -> 0.2. Population: the 4 cross pairs all have cos 0 -> 1.
    assert result["internal_variability"] == pytest.approx(0.2)
    assert result["population_variability"] == pytest.approx(1.0)
    assert result["ratio"] == pytest.approx(5.0)
    assert result["homogeneous"] is False and result["reason"] is None
    assert (result["individuals"], result["individuals_with_repeats"], result["records"]) == (2, 2, 4)

    # Each prompt answered with the same two answers: individuals differ no more than they differ from themselves.
    same = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    homogeneous = conceptual_diversity(["A", "A", "B", "B"], same)
    assert homogeneous["internal_variability"] == pytest.approx(1.0)
    assert homogeneous["population_variability"] == pytest.approx(0.5)
    assert homogeneous["homogeneous"] is True


def test_conceptual_diversity_needs_two_repeated_individuals() -> None:
    result = conceptual_diversity(["A", "A", "B"], np.eye(3))
    assert result["internal_variability"] is None and result["homogeneous"] is None
    assert "at least 2 prompts" in result["reason"]
    empty = conceptual_diversity([], np.zeros((0, 3)))
    assert empty["individuals"] == 0 and empty["reason"]
    with pytest.raises(ValueError, match="individuals"):
        conceptual_diversity(["A", "B"], np.eye(3))


# ---- monoculture and JS divergence ----------------------------------------------------------------------------------


def test_compare_dispersion_against_a_reference() -> None:
    result = compare_dispersion(["Pos", "pos ", "pos", "neg"], ["pos", "neg", "neutral", "neutral", None, ""])
    gen, ref = result["generated"], result["reference"]
    assert (gen["n"], gen["distinct"], gen["top_value"], gen["top_share"]) == (4, 2, "pos", 0.75)
    assert gen["entropy_bits"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert ref["n"] == 4 and ref["entropy_bits"] == pytest.approx(1.5)  # 1/4, 1/4, 1/2
    assert result["entropy_ratio"] == pytest.approx(gen["entropy_bits"] / 1.5)
    assert result["narrower"] is True
    # JS over (neg, neutral, pos): p = (1/4, 0, 3/4), q = (1/4, 1/2, 1/4); m = (1/4, 1/4, 1/2).
    p, q, m = np.array([0.25, 0, 0.75]), np.array([0.25, 0.5, 0.25]), np.array([0.25, 0.25, 0.5])

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        return float(sum(ai * math.log2(ai / bi) for ai, bi in zip(a, b, strict=True) if ai))

    assert result["js_divergence_bits"] == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
    empty = compare_dispersion([], ["a"])
    assert empty["generated"]["entropy_bits"] is None and empty["js_divergence_bits"] is None
    assert value_dispersion(["x"])["entropy_bits"] == 0.0


def test_attribute_summary_js_divergence() -> None:
    assert attribute_summary(["a", "b"], {"a": 1, "b": 1})["js_bits"] == pytest.approx(0.0)
    assert attribute_summary(["z", None], {"a": 1.0})["js_bits"] == pytest.approx(1.0)  # all off target: disjoint
    # Observed (a, b, other) = (1/2, 0, 1/2) vs target (1/2, 1/2, 0); mixture m = (1/2, 1/4, 1/4):
    # KL(p || m) = KL(q || m) = 1/2 * log2(2) = 1/2, so JS = 1/2 (finite where KL to the target is not).
    summary = attribute_summary(["a", "z"], {"a": 1, "b": 1})
    assert summary["js_bits"] == pytest.approx(0.5)
    assert attribute_summary([], {"a": 1.0})["js_bits"] is None
