"""math_answer checks: the comparison of an author's answer with its solutions (grouped by equivalence, majority,
solve rate) in worker processes where a hung comparison costs one record, the `_solve_rate` column carried to the
published rows, refusals naming the field, and the check on the real embedded model. math-verify's own behaviour is
pinned in test_math_verify.py."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from test_quality import records_of

from polyculture.spec import MathAnswerCheck
from polyculture.stages.quality import cache_frame, cache_from_frame, quality
from polyculture.stages.quality_math_compare import compare_answers


def _compare(answer, solutions):
    score, note = compare_answers({"answer": answer, "solutions": solutions, "solves": len(solutions)})
    return score, json.loads(note)


def test_solutions_are_grouped_by_equivalence_not_by_string():
    score, found = _compare("1/2", ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{2/4}", "\\boxed{3}"])
    assert score == 0.75 and found["author_is_majority"] and found["solve_rate"] == 0.75
    score, found = _compare("17", ["so \\boxed{5}", "\\boxed{5}", "\\boxed{5.0}", "\\boxed{17}"])
    assert (
        score == 0.75 and not found["author_is_majority"] and found["majority"] == "5" and found["solve_rate"] == 0.25
    )
    score, found = _compare("5", ["no idea", "I cannot", "\\boxed{5}", "hmm"])
    assert score == 0.25 and found["author_is_majority"] and found["unparsed"] == 3
    assert _compare("", ["\\boxed{1}"] * 3)[1]["problem"] == "the author's answer is empty or not text"
    assert not _compare("banana", ["\\boxed{1}"] * 3)[1]["author_is_majority"]  # parses (as symbols), never equal
    assert _compare(12, ["\\boxed{12}"] * 3)[0] == 1.0  # a number as the author's answer is read as text


def test_an_authors_answer_with_a_unit_word_is_read_as_its_number():
    """In $...$ LaTeX reads "12 dollars" as 12*a*do*l*l*r*s (never equal to a solution's 12); the check compares the
    number. An expression or a two-part answer is not cut."""
    assert _compare("12 dollars", ["So he pays 12 dollars."] * 3)[1]["author_is_majority"]
    assert _compare("12 cm^2", ["The area is \\boxed{12}"] * 3)[1]["solve_rate"] == 1.0
    assert _compare("1,000 people", ["\\boxed{1000}"] * 3)[1]["author_is_majority"]
    assert not _compare("13 dollars", ["So he pays 12 dollars."] * 3)[1]["author_is_majority"]
    assert _compare("2x+1", ["\\boxed{1+2x}"] * 3)[1]["author_is_majority"]
    assert not _compare("2x+1", ["\\boxed{2}"] * 3)[1]["author_is_majority"]
    assert not _compare("10 and 12", ["\\boxed{10}"] * 3)[1]["author_is_majority"]


def test_math_answer_settings_are_refused_naming_the_field(spec_dir):
    from conftest import small_spec_dict
    from test_spec import _refused

    check = {"name": "verified", "kind": "math_answer", "problem_field": "bio", "answer_field": "name"}
    cases = {
        "quality.0.solves": {"solves": 2},
        "quality.0.min_agreement": {"min_agreement": 0},
        "quality.0.solve_rate: Value error, must be [min, max]": {"solve_rate": [0.9, 0.1]},
        "quality.0.solve_template": {"solve_template": "Solve it."},
        "quality.0.problem_field: 'problem' is not in the record schema's properties": {"problem_field": "problem"},
        "quality.0.answer_field: 'answer' is not in the record schema's properties": {"answer_field": "answer"},
    }
    for expected, change in cases.items():
        assert expected.replace("Value error, ", "") in _refused(spec_dir, small_spec_dict(quality=[check | change]))
    two = [check, check | {"name": "again"}]
    assert "one math_answer check at most" in _refused(spec_dir, small_spec_dict(quality=two))
    # the score cache keeps the solve rates under "<name>_solve_rate": no other check may be called that
    fluent = {"name": "verified_solve_rate", "kind": "fluency", "quantile": 0.2}
    assert "check names ['verified_solve_rate'] are taken by the math_answer check's solve rates" in _refused(
        spec_dir, small_spec_dict(quality=[check, fluent])
    )
    # `_solve_rate` is published beside the score: a record field of that name is refused
    schema = json.loads((spec_dir / "record.schema.json").read_text())
    schema["properties"]["_solve_rate"] = {"type": "number"}
    (spec_dir / "rated.schema.json").write_text(json.dumps(schema))
    shadow = small_spec_dict(record={"schema": "rated.schema.json"}, quality=[check])
    assert "quality.0.kind: a math_answer check publishes the column '_solve_rate', which is also a record field" in (
        _refused(spec_dir, shadow)
    )


def test_polyculture_check_refuses_a_bad_math_answer_section_with_exit_2(spec_dir):
    import yaml
    from conftest import small_spec_dict
    from test_cli import _run

    path = spec_dir / "math.yaml"
    check = {"name": "verified", "kind": "math_answer", "problem_field": "bio", "answer_field": "name", "solves": 2}
    path.write_text(yaml.safe_dump(small_spec_dict(quality=[check])))
    out = _run("check", str(path))
    assert out.returncode == 2 and "quality.0.solves" in out.stderr and "Traceback" not in out.stderr


def _math_check(**settings) -> MathAnswerCheck:
    return MathAnswerCheck.model_validate({"name": "verified", "kind": "math_answer", **settings})


def test_verdicts_say_why_a_problem_fails():
    """compare_solutions on written solutions (no model): each failing record's note names the reason."""
    from polyculture.stages.quality_math import compare_solutions

    answers = ["5", "17", "5", "banana?", "", "6"]
    solutions = [
        ["2 + 3 = 5", "\\boxed{5}", "The answer is 5.", "\\boxed{6}"],  # 3/4 agree with the author
        ["2 + 3 = 5", "\\boxed{5}", "so **5**", "\\boxed{17}"],  # the author is wrong
        ["\\boxed{5}", "\\boxed{4}", "\\boxed{6}", "\\boxed{7}"],  # no agreement to speak of
        ["\\boxed{1}"] * 4,
        ["\\boxed{1}"] * 4,
        ["I cannot say.", "Hmm.", "no idea", "???"],
    ]
    got = compare_solutions(answers, solutions, _math_check(min_agreement=0.5, solve_rate=[0.1, 0.9]))
    (ok, rate_ok), (wrong, rate_wrong), (weak, _), (banana, _), (empty, _), (silent, _) = got
    assert ok == (0.75, True, "majority answer '5' (3/4 solutions), solve rate 0.75") and rate_ok == 0.75
    assert wrong[:2] == (0.75, False) and rate_wrong == 0.25
    assert wrong[2] == "the author's answer '17' is not the majority answer '5' (3/4 solutions), solve rate 0.25"
    assert weak[:2] == (0.25, False) and weak[2].startswith("agreement 0.25 < min_agreement 0.5")
    assert "no two of the 4 solutions agree (first answer '5')" in weak[2]  # not called a majority
    assert banana[1] is False and "the author's answer 'banana?' is not the majority answer '1'" in banana[2]
    assert empty[1] is False and empty[2] == "the author's answer is empty or not text"
    assert silent[:2] == (0.0, False) and silent[2].startswith("no solution gave an answer math-verify reads")
    trivial = compare_solutions(["5"], [["\\boxed{5}"] * 4], _math_check(solve_rate=[0.1, 0.9]))[0][0]
    assert trivial == (1.0, False, "solve rate 1.00 outside [0.1, 0.9]: majority answer '5' (4/4 solutions), solve "
                                   "rate 1.00")  # fmt: skip


def test_a_comparison_that_hangs_costs_its_record_only():
    """A solution answering (10^10)! sends math-verify's comparison into sympy's factorial for minutes (measured on
    0.9.0; its own timeouts are off). In the check's worker processes it costs that record, failed with the reason,
    and the records around it are compared as usual."""
    import time

    from polyculture.stages.quality_math import compare_solutions

    answers = ["5", "5", "7"]
    solutions = [["\\boxed{5}"] * 3, ["\\boxed{(10^{10})!}", "\\boxed{5}", "\\boxed{5}"], ["\\boxed{7}"] * 3]
    started = time.monotonic()
    got = compare_solutions(answers, solutions, _math_check(solves=3, timeout_s=2, workers=2))
    assert time.monotonic() - started < 60
    assert [o[:2] for o, _ in got] == [(1.0, True), (None, False), (1.0, True)]
    assert got[1] == ((None, False, "timed out after 2 s"), None)


def test_the_solve_rate_is_a_published_column(tmp_path):
    """Every column a check adds (`check.columns`) is published after the metadata: the score, then `_solve_rate`."""
    import polars as pl
    from conftest import PROJECT

    from polyculture.preflight import load_spec
    from polyculture.stages.publish import quality_columns, records_table

    spec = load_spec(PROJECT / "configs" / "math_problems.yaml")
    assert quality_columns(spec) == ["_quality_reads", "_quality_verified", "_solve_rate"]
    record = {"topic": "arithmetic", "difficulty": "easy", "problem": "What is 2 + 3 for a student?",
              "solution": "Add them: 2 + 3 = 5.", "answer": "5"}  # fmt: skip
    final = pl.DataFrame({
        "record_id": ["c0-p0-s0-0"], "method": ["vs_standard"], "model": ["m"], "verbalized_probability": [0.5],
        "record_json": [json.dumps(record)], "_quality_reads": [1.0], "_quality_verified": [0.75], "_solve_rate": [0.5],
    })  # fmt: skip
    table = records_table(spec, final)
    assert table.column_names[-3:] == ["_quality_reads", "_quality_verified", "_solve_rate"]
    assert table.column("_solve_rate").to_pylist() == [0.5]
    card = (PROJECT / "src" / "polyculture" / "report" / "templates" / "card.md.j2").read_text()
    assert "`_solve_rate`" in card


class Recording:
    """The real engine, keeping each generate call's conversations, sampling parameters and completions: the
    solutions the check saw, so the test can recompute what it stored."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []
        self.name, self.model_name = engine.name, engine.model_name

    def generate(self, conversations, params, json_schema=None):
        done = self.engine.generate(conversations, params, json_schema)
        self.calls.append((conversations, params, done))
        return done

    def sequence_logprobs(self, conversation, continuations, *, mean_per_token=False):
        return self.engine.sequence_logprobs(conversation, continuations, mean_per_token=mean_per_token)

    def close(self) -> None:
        self.engine.close()


@pytest.mark.slow
def test_math_answer_on_the_real_model_solves_compares_and_caches(one_torch_thread, tmp_path):
    from math_verify import parse, verify

    from polyculture.engines.factory import create_engine
    from polyculture.spec import ModelSpec
    from polyculture.stages.quality_math import solve_conversation, solve_seed
    from polyculture.stages.quality_math_compare import unbold

    rows = [
        {"problem": "What is 2 + 3?", "answer": "5"},
        {"problem": "What is 2 + 3?", "answer": "17"},  # the author is blatantly wrong
        {"problem": "What is 10 - 4?", "answer": "6"},
        {"problem": "", "answer": "1"},
    ]
    frame = records_of(rows)
    check = MathAnswerCheck(name="verified", kind="math_answer", solves=3, max_tokens=96, workers=1)
    known: dict = {}
    engine = Recording(create_engine(ModelSpec(engine="transformers"), seed=0))
    try:
        result = quality(frame, np.zeros((4, 2), dtype=np.float32), [check], engine=engine, known=known)
    finally:
        engine.close()
    # one batched call for the three problems, n = solves, a fresh conversation each, seeded from the record ids
    assert len(engine.calls) == 1
    conversations, params, done = engine.calls[0]
    assert conversations == [solve_conversation(r["problem"], check) for r in rows[:3]]
    assert (params.n, params.temperature, params.max_tokens) == (3, 0.7, 96)
    assert params.seed == solve_seed("verified", ["c0-0", "c1-0", "c2-0"])
    solutions = [[c.text for c in samples] for samples in done]
    for i, texts in enumerate(solutions):
        print(f"c{i}-0 ({rows[i]['answer']}):", [t[-80:] for t in texts])
    print(result.scores.to_dicts())
    assert result.counts[0].tokens == sum(sum(c.completion_tokens for c in s) + s[0].prompt_tokens for s in done)
    assert result.counts[0].seconds > 0 and result.counts[0].checked == 4

    # the stored agreement and solve rate are what the solutions say: recomputed here from the recorded solutions
    scores = {r["record_id"]: r for r in result.scores.iter_rows(named=True)}
    for i, texts in enumerate(solutions):
        rid = f"c{i}-0"
        agreement, note = compare_answers({"answer": rows[i]["answer"], "solutions": texts, "solves": 3})
        assert scores[rid]["score"] == agreement and result.solve_rates[rid] == json.loads(note)["solve_rate"]
        gold = parse(f"${rows[i]['answer']}$", parsing_timeout=None)
        matching = sum(bool(verify(gold, parse(unbold(t), parsing_timeout=None), timeout_seconds=None)) for t in texts)
        assert result.solve_rates[rid] == matching / 3
    # 2 + 3 = 17 fails, and its note says what the majority answered instead
    details = dict(zip(result.rejects["record_id"], result.rejects["detail"], strict=True))
    assert details["c1-0"].startswith("verified: the author's answer '17' is not the majority answer '5' ("), details
    assert result.solve_rates["c1-0"] == 0.0
    assert details["c3-0"] == "verified: problem is empty or not text (no score)" and result.solve_rates["c3-0"] is None
    for row in result.records.iter_rows(named=True):  # what passed: the author's answer is the majority's
        assert row["_quality_verified"] >= 0.5 and row["_solve_rate"] >= row["_quality_verified"] - 1e-9
    # the solve rates live in the score cache too: scored again from the cache (no engine), the same columns
    again = quality(frame, np.zeros((4, 2), dtype=np.float32), [check], engine=None,
                    known=cache_from_frame(cache_frame(known)))  # fmt: skip
    assert again.records.equals(result.records) and again.counts[0].tokens == 0

    # the report's Math section over this pass: verified counts, the answers of the final records, the plot
    from conftest import small_spec_dict

    from polyculture.report.math import math_figures
    from polyculture.spec import BuildSpec

    spec = BuildSpec.model_validate(small_spec_dict(quality=[check.model_dump(mode="json")]))
    math = math_figures(spec, result, frame, result.records, tmp_path / "plots")
    assert math is not None and (math.checked, math.verified) == (4, result.records.height)
    assert math.by_cell["(no cell)"].passed == math.verified and math.final_answers == result.records.height
    assert sum(a.records for a in math.top_answers) == math.final_answers
    assert math.solve_rate_histogram is None or (tmp_path / math.solve_rate_histogram).is_file()


def test_repeating_decimals_written_with_overline_are_never_trusted():
    # math-verify 0.9.0 drops \overline: verify("1", "1.\overline{72}") is True (bench/math_verify_agreement.py)
    from math_verify import parse, verify

    assert verify(parse("$1$", parsing_timeout=None), parse("$1.\\overline{72}$", parsing_timeout=None),
                  timeout_seconds=None)  # fmt: skip
    score, found = _compare("1", ["so it is $1.\\overline{72}$"] * 3)
    assert score == 0.0 and found["problem"].startswith("no solution gave an answer math-verify reads")
    score, found = _compare("1.\\overline{3}", ["\\boxed{1}"] * 3)
    assert score == 0.0 and "uses \\overline" in found["problem"]


def test_a_problem_that_states_its_answer_fails_unsolved():
    """What the embedded model writes when it cannot write a problem ('8.00 (whole fraction)', answer 8.00) is
    solved by copying the number: such a record fails before any solution is sampled (no engine call is made)."""
    from polyculture.stages.quality_math import math_outcomes, states_answer

    assert states_answer("8.00 (whole fraction)", "8.00")
    assert states_answer("0.8, probability of giving 0 is 1.8e-08", "1.8")  # inside an exponent form too
    assert states_answer("I have 1,000 apples and eat 4.", "1000") and states_answer("It costs 12 dollars", 12.0)
    assert not states_answer("A bag has 2 red and 3 blue balls. How many balls?", "5")
    assert not states_answer("There are 5 cats and 4 dogs. How many cats?", "5")  # one digit: not looked for
    assert not states_answer("What is 17 + 25?", "42") and not states_answer("Name it.", "banana")
    records = [{"problem": "8.00 (whole fraction)", "answer": "8.00"}, {"problem": "2.1, probability: 1.25", "answer": "2.1"}]
    solved = math_outcomes(records, ["r0", "r1"], _math_check(), engine=None)
    assert [o[:2] for o in solved.outcomes] == [(None, False), (None, False)]
    assert solved.outcomes[0][2] == "the problem states its own answer '8.00' (answer_in_problem: false)"
    assert solved.tokens == 0 and solved.solve_rates == [None, None]


def test_solving_skips_records_a_cheaper_gate_failed():
    """A prose gate listed first: its failures are never solved (no engine time, no score row for the check); a
    record that passes it is solved by the real engine."""
    from test_quality import records_of

    from polyculture.engines.factory import create_engine
    from polyculture.spec import ModelSpec, ProseCheck
    from polyculture.stages.quality import quality

    rows = [{"problem": "12 (whole)", "answer": "12"},
            {"problem": "Tom has seven apples and buys five more apples at the shop. How many apples does he have?",
             "answer": "12"}]  # fmt: skip
    checks = [ProseCheck(name="prose", kind="prose", field="problem"), _math_check(solves=3, max_tokens=48)]
    engine = create_engine(ModelSpec(engine="transformers"), seed=5)
    try:
        result = quality(records_of(rows), np.zeros((2, 4), dtype=np.float32), checks, engine=engine)
    finally:
        engine.close()
    solved = result.scores.filter(pl.col("check") == "verified")
    assert solved["record_id"].to_list() == ["c1-0"]  # only the record that reads as prose was solved
    counts = {c.name: c for c in result.counts}
    assert counts["verified"].checked == 1 and counts["verified"].tokens > 0
    assert set(result.rejects["record_id"].to_list()) >= {"c0-0"}
    assert "prose" in result.rejects.filter(pl.col("record_id") == "c0-0")["detail"][0]
