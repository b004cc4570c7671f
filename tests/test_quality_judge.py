"""judge checks: the rubric rendered over the record, verdicts decoded under the JSON Schema by the real embedded model
on the transformers engine (the build's engine, or the check's own model), parsed, averaged, cached and gated."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from polyculture.engines.base import Completion
from polyculture.spec import JudgeCheck
from polyculture.stages.quality import quality
from polyculture.stages.quality_judge import _outcome, judge_conversation, parse_verdict, verdict_schema

RUBRIC = "Rate how readable this short biography is as English prose.\n\nBiography: {{ bio }}"
RECORDS = [
    {"bio": "Maria Lopez was a nurse in Lima who trained two generations of midwives."},
    {"bio": "TruccionaraIberrada(uberAmariga 1970d-3-91894 4:20:16.23-3101"},
    {"bio": "Kenji Sato grew rice in Niigata and wrote haiku about the changing seasons."},
    {"bio": "too,simple,ketan; margin en,title;first_person_textarea"},
]


def records_of(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "record_id": [f"c{i}-0" for i in range(len(rows))],
            "call_id": [f"c{i}" for i in range(len(rows))],
            "record_json": [json.dumps(r) for r in rows],
            "text": [r["bio"] for r in rows],
        }
    )


def judge(**settings) -> JudgeCheck:
    return JudgeCheck.model_validate({"name": "readable", "kind": "judge", "rubric": RUBRIC, "threshold": 3} | settings)


def test_the_rubric_is_rendered_over_the_record_with_the_score_range():
    check = judge(min_score=0, max_score=10, threshold=7)
    [turn] = judge_conversation(check, {"bio": "A farmer.", "name": "Ana"})
    assert turn["role"] == "user" and turn["content"].startswith(RUBRIC.replace("{{ bio }}", "A farmer."))
    assert "an integer from 0 to 10" in turn["content"]
    schema = verdict_schema(check)
    assert schema["properties"]["score"] == {"type": "integer", "minimum": 0, "maximum": 10}
    assert list(schema["properties"]) == ["reason", "score"]  # the grounds before the number


def test_verdicts_parse_or_say_why_not():
    check = judge()
    assert parse_verdict('{"reason": " Clear. ", "score": 4}', check) == (4, "Clear.")
    assert parse_verdict('{"score": 2}', check) == (2, "")
    assert parse_verdict('{"reason": "x", "score": 9}', check) == "score 9 outside [1, 5]"
    assert parse_verdict('{"reason": "x", "score": "4"}', check) == "score is not an integer: '4'"
    assert parse_verdict('{"reason": "x", "score": true}', check).startswith("score is not an integer")
    assert parse_verdict("[4]", check) == "not a JSON object"
    assert parse_verdict('{"reason": "x", "sco', check).startswith("not JSON")
    # several samples: the mean of the usable ones; none usable: a failure with the reason and no score
    done = [Completion('{"reason": "ok", "score": 4}', 1, 1, "stop"), Completion('{"reason": "m', 1, 1, "length"),
            Completion('{"reason": "fine", "score": 5}', 1, 1, "stop")]  # fmt: skip
    assert _outcome(check, done) == (4.5, None, "scores [4, 5]; ok")
    assert _outcome(check, done[1:2]) == (None, False, "the judge gave no usable verdict (cut short at max_tokens)")


@pytest.mark.slow
def test_judge_on_the_real_model_gates_caches_and_repeats(one_torch_thread):
    """SmolLM2-135M is a poor judge (the bench measures how poor); what must hold is the mechanics: every verdict an
    integer in range under the grammar, the same verdicts when scored again, the mean of samples, the threshold
    gating, cached scores reused without the engine, and a judge with its own model section using its own engine."""
    from polyculture.engines.factory import create_engine
    from polyculture.spec import ModelSpec

    frame = records_of(RECORDS)
    vectors = np.zeros((len(RECORDS), 3), dtype=np.float32)
    engine = create_engine(ModelSpec(engine="transformers"), seed=0)
    try:
        greedy = judge(max_tokens=96)
        known: dict = {}
        first = quality(frame, vectors, [greedy], engine=engine, known=known)
        again = quality(frame, vectors, [greedy], engine=engine, known={})
        sampled = judge(samples=3, max_tokens=96)
        mean = quality(frame, vectors, [sampled], engine=None, judge_engines={"readable": engine}, known={})
    finally:
        engine.close()
    scores = first.scores["score"].to_list()
    print("greedy:", list(zip(scores, first.scores["note"].to_list(), strict=True)))
    print("samples=3:", mean.scores["score"].to_list(), mean.scores["note"].to_list())
    usable = [s for s in scores if s is not None]
    assert len(usable) >= 3 and all(float(s).is_integer() and 1 <= s <= 5 for s in usable)
    assert again.scores["score"].to_list() == scores  # seeded per check and record ids: the same verdicts
    # gating: passed exactly where the score reaches the threshold; a failure names the check and its score
    for rid, score in zip(first.scores["record_id"], scores, strict=True):
        assert (rid in first.records["record_id"].to_list()) == (score is not None and score >= 3)
    assert all(d.startswith("readable: ") for d in first.rejects["detail"])
    passing_notes = first.scores.filter(pl.col("passed"))["note"].to_list()
    assert all(isinstance(n, str) for n in passing_notes)  # a pass keeps the judge's reason
    assert first.counts[0].threshold == 3 and first.counts[0].checked == len(RECORDS)
    # three samples each, averaged: a multiple of 1/3 in range, the note listing the samples' scores
    for score, note in zip(mean.scores["score"], mean.scores["note"], strict=True):
        if score is not None:
            assert 1 <= score <= 5 and abs(score * 3 - round(score * 3)) < 1e-9 and "scores [" in note
    # the cached verdicts decide a new threshold with no engine at all
    strict = quality(frame, vectors, [judge(threshold=5, max_tokens=96)], engine=None, known=known)
    assert strict.records.height == sum(s == 5 for s in usable)


def test_a_judge_without_an_engine_is_a_clear_error():
    with pytest.raises(ValueError, match=r"quality check 'readable' \(judge\) needs an engine"):
        quality(records_of(RECORDS[:1]), np.zeros((1, 2), dtype=np.float32), [judge()], engine=None)
