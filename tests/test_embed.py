"""embed: the real MiniLM model; the cache lives in a per-test folder."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SMALL_SCHEMA

from polyculture.engines.model_files import ModelUnavailable
from polyculture.stages import embed
from polyculture.stages.embed import Embedder, load_embedder

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def calls(embedder, monkeypatch):
    """Texts sent to the underlying model, one list per model.encode call."""
    seen: list[list[str]] = []
    real = embedder.model.encode

    def counting(texts, *args, **kwargs):
        seen.append(list(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(embedder.model, "encode", counting)
    return seen


def _shards(cache) -> list:
    return sorted((cache / "embeddings" / "minilm-l6").iterdir())


def test_shape_dtype_and_unit_norm(embedder):
    vectors = embedder.encode(["A short sentence.", "Another, rather different, sentence about trains.", ""])
    assert embedder.name == "minilm-l6"
    assert embedder.dimension == 384
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input(embedder, calls):
    vectors = embedder.encode([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32
    assert calls == []


def test_paraphrases_closer_than_unrelated(embedder):
    a, b, c = embedder.encode(
        ["How do I reset my password?", "How can I reset my password?", "She plays the violin in an orchestra."]
    )
    assert a @ b > 0.9
    assert a @ c < 0.3
    assert a @ b > a @ c + 0.5


def test_cache_hit_returns_identical_vectors_without_encoding(embedder, calls):
    first = embedder.encode(["alpha text", "beta text", "alpha text"])
    assert calls == [["alpha text", "beta text"]]  # a repeated text is encoded once
    np.testing.assert_array_equal(first[0], first[2])

    second = embedder.encode(["beta text", "gamma text", "alpha text"])
    assert calls[1:] == [["gamma text"]]  # only the missing text
    np.testing.assert_array_equal(second[0], first[1])
    np.testing.assert_array_equal(second[2], first[0])

    third = embedder.encode(["gamma text", "alpha text"])
    assert len(calls) == 2  # everything cached: the model is not called
    np.testing.assert_array_equal(third[0], second[1])


def test_disk_cache_survives_a_new_embedder(embedder, private_cache):
    texts = ["persisted one", "persisted two"]
    original = embedder.encode(texts)
    assert all(p.suffix == ".npz" and not p.name.startswith(".") for p in _shards(private_cache))

    fresh = Embedder("minilm-l6")  # a new process would see only the disk
    seen = []
    real = fresh.model.encode
    fresh.model.encode = lambda t, *a, **k: (seen.append(list(t)), real(t, *a, **k))[1]
    np.testing.assert_array_equal(fresh.encode(texts), original)
    assert seen == []


def test_damaged_and_leftover_files_are_ignored(embedder, private_cache):
    reference = embedder.encode(["robust text"])
    folder = private_cache / "embeddings" / "minilm-l6"
    for shard in _shards(private_cache):
        shard.write_bytes(b"not a zip file")  # a damaged shard
    (folder / ".crashed.npz.tmp").write_bytes(b"half")  # a write that never finished

    fresh = Embedder("minilm-l6")
    np.testing.assert_allclose(fresh.encode(["robust text"]), reference, atol=1e-6)  # re-encoded, not crashed


def test_compaction_keeps_every_vector(embedder, private_cache, monkeypatch):
    monkeypatch.setattr(embed, "_COMPACT_AFTER", 2)
    texts = [f"compaction sentence number {i}" for i in range(5)]
    vectors = np.vstack([embedder.encode([t]) for t in texts])
    assert len(_shards(private_cache)) <= 3

    fresh = Embedder("minilm-l6")
    seen = []
    real = fresh.model.encode
    fresh.model.encode = lambda t, *a, **k: (seen.append(list(t)), real(t, *a, **k))[1]
    np.testing.assert_array_equal(fresh.encode(texts), vectors)
    assert seen == []


def test_load_embedder_is_cached_per_name(embedder):
    assert load_embedder("minilm-l6") is embedder


def test_unknown_model_refused():
    with pytest.raises(ModelUnavailable, match="no-such-embedder"):
        load_embedder("no-such-embedder")


def test_vectors_from_a_worker_are_looked_up_here_and_on_disk(embedder, calls, private_cache):
    """What a shard worker embedded (flows.shards.embed_shard: the texts validate will give the flow) is taken into
    the flow's cache by text key: the flow's encode is a lookup, and a new process finds them on disk."""
    import json

    import polars as pl
    from conftest import small_spec_dict

    from polyculture.flows.shards import embed_shard
    from polyculture.preflight import parse_spec
    from polyculture.stages.embed import text_key

    spec_dir = private_cache.parent
    (spec_dir / "record.schema.json").write_text(json.dumps(SMALL_SCHEMA))
    spec = parse_spec(small_spec_dict(), spec_dir)
    bios = ["A doctor who sailed alone around Cape Horn twice.", "A farmer breeding frost-proof lemons in Riga."]
    completions = pl.DataFrame(
        {"call_id": ["c0-p0-s0", "c0-p1-s0", "c0-p2-s0"], "cell_id": [0, 0, 0], "cell_key": ["occupation=doctor"] * 3,
         "occupation": ["doctor"] * 3, "prompt_index": [0, 1, 2], "sample_index": [0, 0, 0], "turn": [0, 0, 0],
         "completion": [json.dumps({"name": "Ann", "birth_year": 1950, "bio": b}) for b in bios] + ["no json"],
         "finish_reason": ["stop"] * 3, "method": ["direct"] * 3, "model": ["m"] * 3}
    )  # fmt: skip
    keys, vectors = embed_shard(spec, completions)
    assert keys == tuple(text_key(b) for b in bios)  # the unparseable answer has no text
    np.testing.assert_allclose(vectors, embedder.encode(bios), atol=1e-6)

    # A vector this process never computed (as from a worker elsewhere) is what encode returns, without the model.
    other = np.eye(2, embedder.dimension, dtype=np.float32)
    texts = ["only a worker embedded this", "and this"]
    calls.clear()
    assert embedder.remember([text_key(t) for t in texts], other) == 2
    np.testing.assert_array_equal(embedder.encode(texts), other)
    assert calls == []
    assert embedder.remember([text_key(t) for t in texts], other) == 0  # already here: nothing written again
    np.testing.assert_array_equal(Embedder("minilm-l6").encode(texts), other)  # a new process reads the disk
