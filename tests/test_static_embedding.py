"""minilm-l6-static: model2vec distilled for real from the embedded MiniLM (once per session), then used as the
build's embedder: embedding, its own cache, dedup, the report, and the spec's refusal of an unknown model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import small_spec_dict
from test_report import make_spec, records

from polyculture.engines.model_files import resolve_embedding_model
from polyculture.engines.static_model import STATIC_PCA_DIMS, is_static_model_folder
from polyculture.preflight import parse_spec
from polyculture.report.write import RecordSet, ReportInputs, write_report
from polyculture.spec import DedupSpec, SpecError
from polyculture.stages.dedup import dedup
from polyculture.stages.embed import Embedder, model_cache_key

STATIC = "minilm-l6-static"


@pytest.fixture(scope="session")
def static_home(tmp_path_factory):
    """A session cache holding the distilled model: distilling takes about a minute on 2 cores, so it happens once."""
    home = tmp_path_factory.mktemp("static-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYCULTURE_CACHE", str(home))
        folder = resolve_embedding_model(STATIC).path
        yield home, folder


@pytest.fixture(scope="session")
def static_embedder(static_home):
    home, _ = static_home
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYCULTURE_CACHE", str(home))
        return Embedder(STATIC)


def test_distilled_once_into_a_keyed_folder_and_reused(static_home, monkeypatch):
    home, folder = static_home
    assert is_static_model_folder(folder) and folder.parent == home / "models"
    assert folder.name.startswith(f"{STATIC}-") and len(folder.name) == len(STATIC) + 17  # + "-" + 16 hex of the key
    monkeypatch.setenv("POLYCULTURE_CACHE", str(home))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_embedding_model(STATIC).path == folder  # found, not distilled again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (home / "models").iterdir() if p.is_dir()] == [folder.name]
    # the embedding cache follows the distilled folder (its key), never MiniLM's
    assert model_cache_key(STATIC, folder) == folder.name != model_cache_key("minilm-l6", folder)


def test_static_model_embeds_normalised_vectors_and_caches_them(static_embedder, private_cache):
    texts = [
        "The doctor treated patients in a small mountain village.",
        "The doctor treated the patients of a small mountain village.",
        "Quarterly revenue fell as shipping costs rose sharply.",
    ]
    vectors = static_embedder.encode(texts)
    assert vectors.shape == (3, STATIC_PCA_DIMS) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.9 > similarity[0, 2] + 0.3  # paraphrase close, unrelated text far
    shards = list((private_cache / "embeddings" / static_embedder.cache_key).glob("*.npz"))
    assert len(shards) == 1
    np.testing.assert_array_equal(static_embedder.encode(texts[::-1]), vectors[::-1])  # served from the cache


def test_dedup_with_the_static_model_finds_near_duplicates(static_embedder, private_cache):
    texts = [
        "Maria Lopez is a farmer from Peru who grows quinoa on terraced fields.",
        "A lighthouse keeper in Norway writes poems about winter storms.",
        "Maria Lopez is a farmer from Peru who grows quinoa on terraced feilds.",  # typo of 0
        "A lighthouse keeper in Norway writes poems about the winter storms.",  # one word added to 1
        "The committee approved the new budget after a long debate.",
    ]
    frame = pl.DataFrame({"record_id": [f"r{i}" for i in range(5)], "call_id": "c", "text": texts})
    result = dedup(frame, static_embedder.encode(texts), DedupSpec(threshold=0.9, embedding_model=STATIC))
    assert result.kept["record_id"].to_list() == ["r0", "r1", "r4"]
    assert sorted(result.rejects["record_id"].to_list()) == ["r2", "r3"]
    assert set(result.rejects["reason"]) == {"near_duplicate"}


def test_report_works_on_static_vectors(static_embedder, private_cache, tmp_path):
    rows = [
        ("Ana", "doctor", "happy", "Ana runs a rural clinic and rides a motorbike to distant farms."),
        ("Bo", "doctor", "sad", "Bo studies rare blood disorders in a university hospital lab."),
        ("Di", "teacher", None, "Di teaches chemistry and coaches the school chess team."),
    ]
    copy = [("Ed", "doctor", "happy", "Ana runs a rural clinic and rides a motorbike to distant farm.")]
    final, validated = records(rows), records(rows + copy)
    rejects = pl.DataFrame(schema={c: pl.String for c in ("record_id", "call_id", "stage", "reason", "detail")})
    cells = pl.DataFrame({"cell_key": ["job=doctor", "job=teacher"], "job": ["doctor", "teacher"], "target": [2, 1],
                          "available": [3, 1], "kept": [2, 1], "deficit": [0, 0], "reason": [None, None]},
                         schema_overrides={"reason": pl.String})  # fmt: skip
    report = write_report(
        make_spec(tmp_path, dedup={"embedding_model": STATIC}),
        ReportInputs(
            run_id="run-1",
            counts={"valid": 4, "final": 3},
            rejects=rejects,
            cells=cells,
            usage={},
            validated=RecordSet(validated, static_embedder.encode(validated["text"].to_list())),
            final=RecordSet(final, static_embedder.encode(final["text"].to_list())),
        ),  # fmt: skip
        tmp_path / "report",
    ).to_dict()
    before, after = report["diversity"]["before"], report["diversity"]["after"]
    assert 0 < after["semantic_diversity"] <= 100 and before["semantic_diversity"] < after["semantic_diversity"]
    assert before["near_duplicate_share"] == pytest.approx(0.5) and after["near_duplicate_share"] == 0.0
    assert (tmp_path / "report" / "report.html").is_file()


def test_spec_accepts_the_static_name_and_refuses_an_unknown_one(spec_dir):
    assert parse_spec(small_spec_dict(dedup={"embedding_model": STATIC}), spec_dir).dedup.embedding_model == STATIC
    with pytest.raises(SpecError) as refused:
        parse_spec(small_spec_dict(dedup={"embedding_model": "minilm-l6-statik"}), spec_dir)
    message = str(refused.value)
    assert "dedup.embedding_model: unknown model 'minilm-l6-statik'" in message and STATIC in message
