"""dedup: exact and near duplicates on real MiniLM embeddings and real FAISS."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from polyculture.index.text import normalize_text
from polyculture.spec import DedupSpec
from polyculture.stages import dedup as dedup_module
from polyculture.stages.dedup import dedup

pytestmark = pytest.mark.usefixtures("private_cache")


def records(texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "record_id": [f"r{i}" for i in range(len(texts))],
            "call_id": [f"c{i // 2}" for i in range(len(texts))],
            "text": texts,
        }
    )


def test_normalize_text():
    assert normalize_text("  Hello,\n\tWORLD!!  ") == "hello, world"
    assert normalize_text("Straße") == "strasse"  # casefold, not lower
    assert normalize_text("ＡＢＣ ﬁsh") == "abc fish"  # NFKC: full-width letters, ligature
    assert normalize_text("«Quoted», she said.") == "quoted», she said"
    assert normalize_text("...") == ""


def test_exact_duplicates_differing_in_case_and_whitespace(embedder):
    texts = ["Hello, world!", "  hello,   WORLD ", "Hello, world.", "Something else entirely about trains."]
    result = dedup(records(texts), embedder.encode(texts), DedupSpec(threshold=0.999))
    assert result.kept["record_id"].to_list() == ["r0", "r3"]
    assert result.rejects["record_id"].to_list() == ["r1", "r2"]
    assert set(result.rejects["reason"]) == {"exact_duplicate"}
    assert set(result.rejects["stage"]) == {"dedup"}
    assert all(d.startswith("duplicate of r0") for d in result.rejects["detail"])
    assert result.rejects["call_id"].to_list() == ["c0", "c1"]


def test_near_duplicate_paraphrases(embedder):
    texts = [
        "The cat sat on the mat.",
        "How do I reset my password?",
        "The cat is sitting on the mat.",  # cos 0.93 to r0
        "How can I reset my password?",  # cos 0.99 to r1
        "Photosynthesis converts sunlight into chemical energy.",
        "She plays the violin in an orchestra.",
    ]
    emb = embedder.encode(texts)
    result = dedup(records(texts), emb, DedupSpec(threshold=0.9))

    assert result.kept["record_id"].to_list() == ["r0", "r1", "r4", "r5"]
    rejects = {r["record_id"]: r for r in result.rejects.iter_rows(named=True)}
    assert set(rejects) == {"r2", "r3"}
    assert {r["reason"] for r in rejects.values()} == {"near_duplicate"}
    assert rejects["r2"]["detail"] == f"duplicate of r0 (cosine {float(emb[2] @ emb[0]):.3f})"
    assert rejects["r3"]["detail"].startswith("duplicate of r1 (cosine 0.9")
    # rows of kept_embeddings are the kept records' rows
    np.testing.assert_array_equal(result.kept_embeddings, emb[[0, 1, 4, 5]])

    # at a stricter threshold the 0.93 paraphrase is distinct, the 0.99 one still a duplicate
    strict = dedup(records(texts), emb, DedupSpec(threshold=0.95))
    assert strict.kept["record_id"].to_list() == ["r0", "r1", "r2", "r4", "r5"]


def test_distinct_texts_all_kept(embedder):
    texts = [
        "The stock market fell sharply today.",
        "Photosynthesis converts sunlight into chemical energy.",
        "Quantum chromodynamics describes quarks and gluons.",
        "She plays the violin in an orchestra.",
    ]
    result = dedup(records(texts), embedder.encode(texts), DedupSpec(threshold=0.8))
    assert result.kept.height == 4
    assert result.rejects.height == 0
    assert result.clusters["cluster_id"].to_list() == [0, 1, 2, 3]


def test_clusters_frame(embedder):
    texts = ["The cat sat on the mat.", "the cat sat on the mat", "Stocks dropped.", "A cat was sitting on the mat."]
    emb = embedder.encode(texts)
    result = dedup(records(texts), emb, DedupSpec(threshold=0.9))
    clusters = result.clusters
    assert clusters.schema == {
        "record_id": pl.String,
        "cluster_id": pl.Int64,
        "representative_id": pl.String,
        "similarity": pl.Float64,
        "reference": pl.String,
    }
    assert clusters["record_id"].to_list() == ["r0", "r1", "r2", "r3"]
    assert clusters["cluster_id"].to_list() == [0, 0, 1, 0]
    assert clusters["representative_id"].to_list() == ["r0", "r0", "r2", "r0"]
    sims = clusters["similarity"].to_list()
    assert sims[0] == 1.0 and sims[2] == 1.0
    assert sims[3] == pytest.approx(float(emb[3] @ emb[0]), abs=1e-5)
    assert sims[3] >= 0.9
    # every representative is a kept record
    assert set(clusters["representative_id"]) == set(result.kept["record_id"])


def test_greedy_chain_does_not_merge_distinct_texts():
    # unit vectors 18.2 degrees apart: cos(a,b) = cos(b,c) = 0.95, cos(a,c) = 0.805
    angles = np.radians([0.0, 18.19, 36.38])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    result = dedup(records(["a", "b", "c"]), emb, DedupSpec(threshold=0.9))
    assert result.kept["record_id"].to_list() == ["r0", "r2"]  # b goes; c is only close to the dropped b
    assert result.rejects["detail"].to_list()[0].startswith("duplicate of r0 (cosine 0.95")


def test_identical_vectors_are_duplicates_at_threshold_one():
    emb = np.tile(np.array([[0.6, 0.8, 0.0]], dtype=np.float32), (2, 1))
    result = dedup(records(["first text", "second text"]), emb, DedupSpec(threshold=1.0))
    assert result.kept["record_id"].to_list() == ["r0"]
    assert result.rejects["reason"].to_list() == ["near_duplicate"]


def test_chunked_range_search_gives_the_same_answer(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16)).astype(np.float32)
    emb = np.vstack([base, base + rng.normal(scale=0.05, size=base.shape).astype(np.float32)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    frame = records([f"text {i}" for i in range(12)])
    whole = dedup(frame, emb, DedupSpec(threshold=0.95))
    monkeypatch.setattr(dedup_module, "QUERY_CHUNK", 5)
    chunked = dedup(frame, emb, DedupSpec(threshold=0.95))
    assert whole.kept["record_id"].to_list() == [f"r{i}" for i in range(6)]
    assert chunked.kept["record_id"].to_list() == whole.kept["record_id"].to_list()
    assert chunked.clusters.equals(whole.clusters)


def test_misaligned_input_refused(embedder):
    texts = ["one", "two", "three"]
    with pytest.raises(ValueError, match="3 records but 2 embedding rows"):
        dedup(records(texts), embedder.encode(texts[:2]), DedupSpec(threshold=0.9))


def test_empty_frame():
    result = dedup(records([]), np.zeros((0, 384), dtype=np.float32), DedupSpec(threshold=0.9))
    assert result.kept.height == 0
    assert result.kept_embeddings.shape == (0, 384)
    assert result.rejects.height == 0
    assert result.clusters.height == 0
    assert result.rejects.columns == ["record_id", "call_id", "stage", "reason", "detail"]


def _planted(n_groups: int = 40, copies: int = 3, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Groups of near-identical unit vectors (cos > 0.97 inside a group, ~0 across groups), rows grouped in order."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_groups, dim))
    rows = [b + rng.normal(scale=0.03, size=dim) for b in base for _ in range(copies)]
    emb = np.asarray(rows, dtype=np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_keep_probability_keeps_the_most_likely_member(embedder):
    texts = ["How do I reset my password?", "How can I reset my password?", "Photosynthesis needs sunlight."]
    frame = records(texts).with_columns(verbalized_probability=pl.Series([0.1, 0.7, None], dtype=pl.Float64))
    emb = embedder.encode(texts)
    assert dedup(frame, emb, DedupSpec(threshold=0.9)).kept["record_id"].to_list() == ["r0", "r2"]  # first wins by default
    result = dedup(frame, emb, DedupSpec(threshold=0.9, keep="probability"))
    assert result.kept["record_id"].to_list() == ["r1", "r2"]
    assert result.clusters.filter(pl.col("record_id") == "r0")["representative_id"].to_list() == ["r1"]
    # exact duplicates follow the same order: the likelier copy represents the other
    same = records(["Same text.", "same text"]).with_columns(verbalized_probability=pl.Series([0.2, 0.9]))
    assert dedup(same, embedder.encode(["Same text.", "same text"]), DedupSpec(threshold=0.9, keep="probability")).kept[
        "record_id"
    ].to_list() == ["r1"]


def test_keep_central_keeps_the_member_most_like_the_rest():
    # b sits between a and c: cos(a,b) = cos(b,c) = 0.95, cos(a,c) = 0.805. first keeps a and c; central keeps b
    # alone, since it represents both.
    angles = np.radians([0.0, 18.19, 36.38])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    assert dedup(records(["a", "b", "c"]), emb, DedupSpec(threshold=0.9)).kept["record_id"].to_list() == ["r0", "r2"]
    result = dedup(records(["a", "b", "c"]), emb, DedupSpec(threshold=0.9, keep="central"))
    assert result.kept["record_id"].to_list() == ["r1"]
    assert set(result.clusters["representative_id"]) == {"r1"}


def test_unknown_keep_policy_refused():
    # The spec section refuses an unknown policy, before any stage runs.
    with pytest.raises(ValueError, match="Input should be 'first', 'probability' or 'central'"):
        dedup(records(["a"]), np.ones((1, 2), dtype=np.float32), DedupSpec(threshold=0.9, keep="random"))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_index_kind_finds_the_planted_groups(kind):
    emb = _planted(n_groups=60, copies=3, dim=32)
    frame = records([f"text {i}" for i in range(emb.shape[0])])
    result = dedup(frame, emb, DedupSpec(threshold=0.9, index=kind, device="cpu"))
    # one survivor per group, the first of each
    assert result.kept["record_id"].to_list() == [f"r{3 * g}" for g in range(60)]
    assert result.clusters["cluster_id"].to_list() == [g for g in range(60) for _ in range(3)]


def test_dedup_against_a_reference(embedder, tmp_path):
    from polyculture.index.releases import (
        ReleaseIndexError,
        load_release_index,
        locate_release_index,
        write_release_index,
    )

    released = ["How do I reset my password?", "The cat sat on the mat."]
    folder = write_release_index(
        tmp_path / "run" / "reference", ["old0", "old1"], released, embedder.encode(released),
        embedding_model="minilm-l6", source="bios/v1",
    )  # fmt: skip
    assert locate_release_index(tmp_path / "run") == folder  # a run folder points at its reference/
    with pytest.raises(ReleaseIndexError, match="not a reference index"):
        locate_release_index(tmp_path / "nowhere")
    with pytest.raises(ReleaseIndexError, match="embedded with 'minilm-l6'"):
        load_release_index(folder, embedding_model="other-model")
    reference = load_release_index(folder, embedding_model="minilm-l6")

    texts = ["the cat sat on the mat", "How can I reset my password?", "Photosynthesis needs sunlight.", "New text."]
    result = dedup(records(texts), embedder.encode(texts), DedupSpec(threshold=0.9), [reference])
    assert result.kept["record_id"].to_list() == ["r2", "r3"]
    rejects = {r["record_id"]: r for r in result.rejects.iter_rows(named=True)}
    assert rejects["r0"]["reason"] == "exact_in_reference"
    assert rejects["r0"]["detail"] == "already in reference 'bios/v1' as old1 (same normalised text)"
    assert rejects["r1"]["reason"] == "near_reference"
    assert rejects["r1"]["detail"].startswith("near old0 in reference 'bios/v1' (cosine 0.9")
    clusters = result.clusters.filter(pl.col("reference").is_not_null())
    assert clusters["record_id"].to_list() == ["r0", "r1"]
    assert clusters["representative_id"].to_list() == ["old1", "old0"]
    assert clusters["cluster_id"].to_list() == [None, None]
