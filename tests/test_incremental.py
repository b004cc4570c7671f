"""Incremental top-up rounds: a round that validates, embeds, dedups, decontaminates and scores only its new
completions builds the same pool as one pass over everything (real MiniLM, real FAISS, real Prefect tasks)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from conftest import small_spec_dict

from polyculture.flows.build_dataset import _process, _process_more
from polyculture.preflight import parse_spec
from polyculture.spec import DedupSpec
from polyculture.stages.decontaminate import load_benchmarks
from polyculture.stages.dedup import dedup, dedup_more
from polyculture.stages.summary import all_rejects

NAMES = ["Amara", "Bjorn", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena", "Mateo"]
PLACES = ["Lagos", "Oslo", "Chengdu", "Beirut", "Quito", "Tunis", "Split", "Osaka", "Riga", "Perth", "Accra"]
WORKS = [
    "repaired fishing boats along a stormy harbour",
    "taught chemistry to teenagers who hated mornings",
    "grew rare tomatoes in a greenhouse made of old windows",
    "wrote crossword puzzles for a weekly newspaper",
    "ran a night bakery famous for rye bread",
    "mapped caves under limestone hills",
    "restored church organs across three provinces",
]
LEAK = "The quick brown fox jumps over the lazy dog near the old river bank at dawn."
LADDER = "A ladder 13 metres long leans against a vertical wall with its foot 5 metres from the wall."


def _completions(bios: list[str | None], round_no: int) -> pl.DataFrame:
    """One completion per bio (None: an answer that is not JSON), alternating doctor and farmer cells."""
    rows = []
    for i, bio in enumerate(bios):
        occupation = ["doctor", "farmer"][i % 2]
        text = "not json at all" if bio is None else json.dumps({"name": f"Person {i}", "birth_year": 1950, "bio": bio})
        rows.append(
            {"call_id": f"c{i % 2}-p{round_no * 100 + i}-s0", "cell_id": i % 2, "cell_key": f"occupation={occupation}",
             "occupation": occupation, "prompt_index": i, "sample_index": 0, "turn": 0, "system": None, "user": "u",
             "messages": "[]", "completion": text, "prompt_tokens": 5, "completion_tokens": 9,
             "finish_reason": "stop", "method": "direct", "model": "m", "engine": "e", "shard": round_no,
             "batch_seconds": 1.0}
        )  # fmt: skip
    return pl.DataFrame(rows, schema_overrides={"system": pl.String})


def _pools(spec_dir, prefect_server, private_cache):
    (spec_dir / "quiz.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (LEAK, LADDER)))
    spec = parse_spec(
        small_spec_dict(
            target_size=24,
            dedup={"threshold": 0.9},
            decontaminate={"benchmarks": [{"path": "quiz.jsonl", "name": "quiz"}]},
            # prose gates; "long" only scores, so rebalancing has passing and failing records to order
            quality=[
                {"kind": "prose", "name": "prose"},
                {"kind": "prose", "name": "long", "min_words": 12, "gate": False},
            ],
        ),
        spec_dir,
    )
    s = [f"{NAMES[i % 13]} from {PLACES[i % 11]} {WORKS[i % 7]} for {10 + i} years." for i in range(34)]
    near = lambda t: t.rstrip(".") + " again."  # noqa: E731  (one word more: cosine > 0.9 on MiniLM)
    first = [*s[:20], s[0].upper(), near(s[1]), "1 2 3 4 5 6 7 8 9 10 11 12", None, LEAK]
    # Round 1: copies of a kept record, of a record dropped as a near duplicate (one hop to what represents it) and
    # of a record in a benchmark; near copies of an earlier record and of a new one; a copy inside the round.
    later = [*s[20:34], s[2], near(s[1]), near(s[3]), near(s[20]), s[21], "x y z 1 2 3 4 5 6 7 8 9", None, LADDER]
    round0, round1 = _completions(first, 0), _completions(later, 1)
    benchmarks = load_benchmarks(spec.decontaminate, spec.base_dir)

    full = _process(spec, pl.concat([round0, round1]), None, [], {}, {}, benchmarks)
    scores: dict = {}
    pool0 = _process(spec, round0, None, [], {}, scores, benchmarks)
    scored_after_first = len(scores)
    more = _process_more(spec, pool0, round1, None, [], {}, scores, benchmarks)
    return full, pool0, more, scored_after_first, len(scores)


def test_an_incremental_round_equals_the_full_recomputation(spec_dir, prefect_server, private_cache):
    full, pool0, more, scored_after_first, scored = _pools(spec_dir, prefect_server, private_cache)

    assert more.validated.records.equals(full.validated.records)
    assert more.validated.rejects.equals(full.validated.rejects)
    np.testing.assert_allclose(more.embeddings, full.embeddings, atol=1e-6)
    assert more.deduped.kept["record_id"].to_list() == full.deduped.kept["record_id"].to_list()
    np.testing.assert_allclose(more.deduped.kept_embeddings, full.deduped.kept_embeddings, atol=1e-6)
    assert more.deduped.rejects.equals(full.deduped.rejects)
    clusters, expected = more.deduped.clusters, full.deduped.clusters
    assert clusters.drop("similarity").equals(expected.drop("similarity"))
    np.testing.assert_allclose(clusters["similarity"].to_numpy(), expected["similarity"].to_numpy(), atol=1e-5)
    assert more.decontaminated.table() == full.decontaminated.table()
    assert more.quality.records.equals(full.quality.records)
    assert more.quality.counts == full.quality.counts
    assert more.balanced.kept["record_id"].to_list() == full.balanced.kept["record_id"].to_list()
    assert more.balanced.cells.equals(full.balanced.cells)
    assert all_rejects(more).equals(all_rejects(full))

    # The second round exercised every path: each dedup reason against earlier and new records, a benchmark copy,
    # a prose failure; and quality scored only the new records (2 checks per record reaching the stage).
    new_rejects = all_rejects(more).filter(pl.col("call_id").str.contains(r"-p1\d\d-"))
    details = new_rejects.filter(pl.col("stage") == "dedup")["detail"].to_list()
    old_ids = set(pool0.validated.records["record_id"].to_list())
    assert any(d.startswith("duplicate of") and "same normalised" in d and d.split()[2] in old_ids for d in details)
    assert any("same normalised" not in d and d.split()[2] in old_ids for d in details)
    assert any(d.split()[2] not in old_ids for d in details)
    assert {"decontaminate", "quality", "parse"} <= set(new_rejects["stage"].to_list())
    assert scored_after_first == 2 * pool0.deduped.kept.height - 2 * pool0.decontaminated.rejects.height
    assert scored == 2 * (more.decontaminated.kept.height)


def _records(texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {"record_id": [f"r{i}" for i in range(len(texts))], "call_id": [f"c{i}" for i in range(len(texts))],
         "text": texts}
    )  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dedup_more_equals_dedup_over_the_whole_pool(seed):
    """Many planted chains of near and exact copies across the round boundary, on seeded vectors (FAISS flat)."""
    rng = np.random.default_rng(seed)
    n, split = 600, 380
    vectors = rng.standard_normal((n, 24)).astype(np.float32)
    texts = [f"text {i}" for i in range(n)]
    for i in rng.choice(np.arange(20, n), 200, replace=False):  # a copy of an earlier row, near or exact
        j = int(rng.integers(0, i))
        if rng.random() < 0.3:
            vectors[i], texts[i] = vectors[j], texts[j].upper()
        else:
            vectors[i] = vectors[j] + rng.normal(0, rng.choice([0.1, 0.45, 0.55]), 24)
    settings = DedupSpec(threshold=0.9)
    records = _records(texts)
    full = dedup(records, vectors, settings)
    earlier = dedup(records.head(split), vectors[:split], settings)
    more = dedup_more(earlier, records.head(split), records.slice(split), vectors[split:], settings)
    assert set(full.rejects["reason"]) == {"exact_duplicate", "near_duplicate"}
    assert more.kept["record_id"].to_list() == full.kept["record_id"].to_list()
    assert more.rejects.equals(full.rejects)
    assert more.clusters.drop("similarity").equals(full.clusters.drop("similarity"))
    np.testing.assert_allclose(
        more.clusters["similarity"].to_numpy(), full.clusters["similarity"].to_numpy(), atol=1e-5
    )
    np.testing.assert_array_equal(more.kept_embeddings, full.kept_embeddings)


def test_dedup_more_refuses_a_keep_policy_that_reranks_earlier_records():
    records = _records(["a text", "another"])
    vectors = np.eye(2, 8, dtype=np.float32)
    settings = DedupSpec(keep="probability")
    earlier = dedup(records.head(1), vectors[:1], settings)
    with pytest.raises(ValueError, match="dedup.keep 'probability'"):
        dedup_more(earlier, records.head(1), records.slice(1), vectors[1:], settings)
