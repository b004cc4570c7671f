"""Answers cut short: the complete responses before the cut are salvaged by the list methods' parsers, validated like
any other, counted in build_counts and shown in the report; one-record methods still reject a cut answer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from conftest import small_spec_dict
from hypothesis import given, settings
from hypothesis import strategies as st
from test_build_summary import _pool
from test_generate_validate import _completions
from test_report import run_report

from polyculture.methods import get_method
from polyculture.methods.base import cut_responses
from polyculture.preflight import parse_spec
from polyculture.report.html import render_html
from polyculture.report.markdown import render_markdown
from polyculture.report.model import Report
from polyculture.stages.summary import build_counts
from polyculture.stages.validate import ValidationResult, salvaged_records, validate

ITEM = {"name": "Ada Obi", "birth_year": 1950, "bio": "A doctor who ran a clinic for forty years."}


def _items(n: int) -> list[dict]:
    return [ITEM | {"name": f"Ada Obi {i}", "probability": round(0.1 * (i + 1), 1)} for i in range(n)]


def _cut_answer(complete: int, cut: str = '{"name": "Cy', reasoning: str | None = None) -> str:
    """An answer with `complete` whole responses, then `cut`: the start of one more, where the text stops."""
    head = json.dumps({"reasoning": reasoning} if reasoning is not None else {})[:-1]
    head = head + ", " if reasoning is not None else head
    whole = ", ".join(json.dumps(item) for item in _items(complete))
    return f'{head}"responses": [{whole}{", " if complete else ""}{cut}'


@pytest.mark.parametrize("complete", [0, 1, 3])
def test_vs_cut_answer_keeps_the_complete_responses(complete):
    result = get_method("vs_standard", k=4).parse(_cut_answer(complete))
    if complete == 0:
        assert result.error is not None and not result.items and not result.truncated
        return
    assert result.error is None and result.truncated
    assert [i.fields["name"] for i in result.items] == [f"Ada Obi {i}" for i in range(complete)]
    assert [i.probability for i in result.items] == [item["probability"] for item in _items(complete)]


@pytest.mark.parametrize(
    "cut",
    [
        '{"name": "Cy", "bio": "half a sent',  # inside a string
        '{"name": "Cy", "birth_year": 19',  # inside a number
        '{"name": "Cy", "probability": 0.',  # inside a float
        '{"name": "Cy", "birth_year": 1950, ',  # right after a comma inside the cut item
        '{"name": "Cy", "place": {"city": "Lagos", "geo": [6.5, 3.',  # inside nested objects of the cut item
        "",  # right after the comma that ends the last complete item
        '{"name"',  # inside a key
    ],
)
def test_the_item_at_the_cut_is_dropped_wherever_it_stops(cut):
    result = get_method("vs_standard", k=4).parse(_cut_answer(2, cut))
    assert result.truncated and [i.fields["name"] for i in result.items] == ["Ada Obi 0", "Ada Obi 1"]


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
# 64-bit integers: ijson's C backend refuses larger ones ("integer overflow"), so an answer holding one is not
# salvaged (it stays the reject it was before salvage existed); test_an_integer_beyond_64_bits_is_not_salvaged.
INT64 = st.integers(-(2**63), 2**63 - 1)
LEAF = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | TEXT
VALUE = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)
ITEMS = st.lists(
    st.fixed_dictionaries({"name": TEXT, "probability": st.floats(0, 1)}, optional={"extra": VALUE}),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ITEMS, st.booleans(), st.data())
def test_any_cut_keeps_exactly_the_items_closed_before_it(items, ascii_only, data):
    parts = [json.dumps(item, ensure_ascii=ascii_only) for item in items]
    text, ends = '{"responses": [', []
    for i, part in enumerate(parts):
        text += (", " if i else "") + part
        ends.append(len(text))
    text += "]}"
    cut = data.draw(st.integers(0, len(text) - 1))
    vs = get_method("vs_standard", k=len(items))
    whole, result = vs.parse(text).items, vs.parse(text[:cut])
    closed = sum(end <= cut for end in ends)
    if closed and "\\" in text[:cut]:
        # With escapes before the cut (\u001f, surrogate pairs), ijson's C parser may refuse a prefix that stops
        # inside one: then less or nothing is salvaged (the answer stays a reject, as before salvage), never a
        # wrong record.
        assert result.items == whole[: len(result.items)] and len(result.items) <= closed
    elif closed:
        assert result.truncated and result.error is None and result.items == whole[:closed]
    else:
        assert result.error is not None and not result.items and not result.truncated


def test_nested_objects_inside_complete_items_are_kept_whole():
    nested = ITEM | {"place": {"city": "Lagos", "geo": [6.5, 3.4], "tags": [{"k": "v"}]}, "probability": 0.25}
    text = '{"responses": [' + json.dumps(nested) + ', {"name": "B", "place": {"city": "Ac'
    [item] = get_method("vs_standard", k=2).parse(text).items
    assert item.fields == {k: v for k, v in nested.items() if k != "probability"} and item.probability == 0.25
    assert isinstance(item.fields["place"]["geo"][0], float)  # floats, not Decimals


def test_a_bare_list_and_prose_before_the_json_are_salvaged_too():
    bare = "Sure, here they are:\n```json\n[" + json.dumps(_items(1)[0]) + ', {"name": "x'
    assert [i.fields["name"] for i in get_method("vs_standard", k=2).parse(bare).items] == ["Ada Obi 0"]


def test_only_a_valid_json_prefix_is_salvaged():
    vs = get_method("vs_standard", k=3)
    first = json.dumps(_items(1)[0])
    for broken in (
        '{"responses": [' + first + ' {"name": "no comma before me"',  # a syntax error before the cut
        '{"responses": [' + first + ", oops",
        '{"responses": [' + first + "]} trailing",  # complete JSON: read whole, not salvaged
    ):
        result = vs.parse(broken)
        assert not result.truncated
    assert cut_responses('{"responses": [' + first + "]}") == []  # complete: nothing was cut
    assert cut_responses('{"responses": [' + first + ", 12") == [_items(1)[0]]  # a number at the cut may go on
    assert cut_responses('{"other": [' + first + ",") == []  # no "responses" list
    assert cut_responses('{"responses": {"a": ' + first + ",") == []  # "responses" is not a list


def test_vs_cot_salvages_only_after_a_complete_reasoning():
    vs = get_method("vs_cot", k=3)
    cut_reasoning = '{"reasoning": "first I list {the [options'
    assert vs.parse(cut_reasoning).error is not None
    result = vs.parse(_cut_answer(2, reasoning='think of "{[" shapes first'))
    assert result.truncated and [i.fields["name"] for i in result.items] == ["Ada Obi 0", "Ada Obi 1"]
    # a nested "responses" inside another key is not the answer's list
    assert vs.parse('{"reasoning": {"responses": [' + json.dumps(_items(1)[0]) + ", ").error is not None


def test_vs_multi_and_sequence_salvage_each_turn():
    multi = get_method("vs_multi", k=4, turns=2)
    assert [i.fields["name"] for i in multi.parse(_cut_answer(1)).items] == ["Ada Obi 0"]
    sequence = get_method("sequence", k=3)
    text = '{"responses": [{"name": "A", "year": 1}, {"name": "B", "year": 2}, {"name": "C", "ye'
    result = sequence.parse(text)
    assert result.truncated and [i.fields for i in result.items] == [{"name": "A", "year": 1}, {"name": "B", "year": 2}]


@pytest.mark.parametrize("name", ["direct", "cot", "multi_turn"])
def test_one_record_methods_still_reject_a_cut_answer(name):
    result = get_method(name).parse('{"name": "Ada", "year": 18')
    assert result.error is not None and not result.items and not result.truncated


def test_validate_keeps_salvaged_records_and_rejects_the_cut_remainder(spec_dir):
    spec = parse_spec(small_spec_dict(method={"name": "vs_standard", "k": 4}), spec_dir)
    schema_bad = json.dumps(ITEM | {"name": "B", "probability": 0.2})  # "B" is shorter than minLength 2
    texts = [
        _cut_answer(3),  # 3 salvaged of 4
        '{"responses": [' + json.dumps(_items(1)[0]) + ", " + schema_bad + ', {"name": "Cy", "bi',
        _cut_answer(0),  # nothing complete: the whole answer is a reject
        json.dumps({"responses": _items(4)}),  # whole
    ]
    frame = _completions(spec, "vs_standard", texts).with_columns(
        pl.Series("finish_reason", ["length", "length", "length", "stop"])
    )
    result = validate(frame, spec, get_method(spec.method))
    by_call = dict(result.records.group_by("call_id").len().iter_rows())
    assert by_call == {"c0-p0-s0": 3, "c0-p1-s0": 1, "c0-p3-s0": 4}
    assert result.records.filter(pl.col("call_id") == "c0-p0-s0")["item_index"].to_list() == [0, 1, 2]
    parse = result.rejects.filter(pl.col("stage") == "parse")
    assert parse["record_id"].to_list() == [None, None, None] and set(parse["reason"]) == {"truncated"}
    details = parse["detail"].to_list()
    assert details[0].startswith("JSON cut short after 3 complete responses (salvaged)")
    assert details[1].startswith("JSON cut short after 2 complete responses (salvaged)")
    assert "cut short" not in details[2]  # the old reject: the error and the completion's start
    schema = result.rejects.filter(pl.col("stage") == "schema")
    assert schema["record_id"].to_list() == ["c0-p1-s0-1"]  # the salvaged item that breaks the schema
    assert salvaged_records(result) == 4


def test_salvaged_records_go_through_selection(spec_dir):
    spec = parse_spec(small_spec_dict(method={"name": "vs_standard", "k": 4, "selection": "sample"}), spec_dir)
    frame = _completions(spec, "vs_standard", [_cut_answer(3)], finish="length")
    result = validate(frame, spec, get_method(spec.method))
    assert result.records.height == 1
    assert result.rejects.filter(pl.col("stage") == "select").height == 2
    assert salvaged_records(result) == 1


def test_build_counts_count_salvaged_records(spec_dir):
    spec = parse_spec(small_spec_dict(), spec_dir)
    pool = _pool()
    assert build_counts(spec, [pl.DataFrame({"n_prompts": [3]})], pool)["salvaged"] == 0
    # call c3 was cut and its first response kept: its answer-level reject now sits beside a record of it
    records = pl.concat(
        [pool.validated.records, pl.DataFrame({"record_id": ["c3-0"], "call_id": ["c3"], "text": ["t"]})]
    )
    salvaged = replace(pool, validated=ValidationResult(records, pool.validated.rejects))
    counts = build_counts(spec, [pl.DataFrame({"n_prompts": [3]})], salvaged)
    assert counts["salvaged"] == 1 and counts["valid"] == 5
    assert list(counts)[-1] == "salvaged"  # after the stages, not one of them


def test_report_shows_salvaged_beside_the_funnel(tmp_path: Path):
    data, out_dir = run_report(tmp_path)
    assert "salvaged" not in data["counts"] and Report.from_dict(data).salvaged == 0  # older counts read fine
    assert "salvaged" not in render_markdown(Report.from_dict(data))
    report = Report.from_dict({**data, "counts": {**data["counts"], "salvaged": 2}})
    assert report.salvaged == 2 and "salvaged" not in report.funnel()
    assert json.loads(report.to_json())["counts"]["salvaged"] == 2  # a new key in report.json, nothing renamed
    markdown = render_markdown(report)
    assert "(2 valid records were salvaged from answers cut short)" in markdown
    assert "| salvaged |" not in markdown  # not a row of the funnel table
    html = render_html(report, out_dir)
    assert "2 valid records were salvaged from answers cut short" in html
    assert "<td>salvaged</td>" not in html


def test_an_integer_beyond_64_bits_is_not_salvaged():
    """A known limit, pinned: the cut answer stays a reject (what it was before salvage), never a wrong record."""
    item = {"name": "Ada", "probability": 0.5, "extra": -100000000000000000004096}
    text = '{"responses": [' + json.dumps(item) + ', {"name": "B'
    result = get_method("vs_standard", k=2).parse(text)
    assert result.error is not None and not result.items and not result.truncated
