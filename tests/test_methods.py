"""Methods: prompts, constrained-decoding schemas, and parsers that never raise on anything the model writes."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyculture.methods import get_method

ITEM_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Thing",
    "type": "object",
    "properties": {"name": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["name", "year"],
    "additionalProperties": False,
}


def test_direct_conversation_and_schema():
    direct = get_method("direct")
    assert direct.conversation("Say hi", None) == [{"role": "user", "content": "Say hi"}]
    assert direct.conversation("Say hi", "Be brief")[0] == {"role": "system", "content": "Be brief"}
    schema = direct.response_schema(ITEM_SCHEMA)
    assert "$schema" not in schema and "title" not in schema and schema["required"] == ["name", "year"]


def test_direct_parse():
    direct = get_method("direct")
    assert direct.parse('{"name": "Ada", "year": 1815}').items[0].fields == {"name": "Ada", "year": 1815}
    # prose and code fences around the object are tolerated
    assert direct.parse('Sure! ```json\n{"name": "Ada", "year": 1815}\n```').items[0].fields["name"] == "Ada"
    assert direct.parse("").error == "empty completion"
    assert direct.parse("no json here").error == "no JSON object in completion"
    assert "expected a JSON object" in direct.parse("[1, 2]").error
    assert "invalid JSON" in direct.parse('{"name": "Ada", "year": ').error


def test_vs_prompt_mentions_k_and_tail_threshold():
    vs = get_method("vs_standard", k=4, probability_threshold=0.1)
    system = vs.conversation("Name a fruit", "You are terse.")[0]["content"]
    assert system.startswith("You are terse.")
    assert "generate 4 possible responses" in system and "below 0.1" in system and '"probability"' in system
    assert "full distribution" in get_method("vs_standard", k=5).conversation("q", None)[0]["content"]


def test_vs_response_schema_accepts_and_rejects():
    vs = get_method("vs_standard", k=2)
    schema = vs.response_schema(ITEM_SCHEMA)
    good = {"responses": [{"name": "a", "year": 1, "probability": 0.4}, {"name": "b", "year": 2, "probability": 0.6}]}
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):  # k is exact
        jsonschema.validate({"responses": good["responses"][:1]}, schema)
    with pytest.raises(jsonschema.ValidationError):  # probability is required and bounded
        jsonschema.validate({"responses": [{"name": "a", "year": 1, "probability": 2}] * 2}, schema)


def test_vs_parse_items_and_item_errors():
    vs = get_method("vs_standard", k=3)
    text = json.dumps(
        {
            "responses": [
                {"name": "a", "year": 1, "probability": 0.5},
                {"name": "b", "year": 2},
                {"name": "c", "year": 3, "probability": "high"},
                "just text",
                {"name": "d", "year": 4, "probability": 1.5},
            ]
        }
    )
    items = vs.parse(text).items
    assert items[0].fields == {"name": "a", "year": 1} and items[0].probability == 0.5 and items[0].error is None
    assert items[1].error == "probability: Field required (got {'name': 'b', 'year': 2})"
    assert "valid number" in items[2].error and "'high'" in items[2].error
    assert "not an object" in items[3].error
    assert "less than or equal to 1" in items[4].error and "1.5" in items[4].error
    assert vs.parse('{"answers": []}').error == 'no "responses" list in the answer'
    assert vs.parse('{"responses": []}').error == '"responses" is empty'
    # a bare list of responses is accepted too
    assert vs.parse('[{"name": "a", "year": 1, "probability": 0.2}]').items[0].probability == 0.2


ALL_METHODS = [
    get_method("direct"),
    get_method("cot"),
    get_method("sequence", k=3),
    get_method("multi_turn", k=3),
    get_method("vs_standard", k=3),
    get_method("vs_standard", k=3, probability_definition="percentage"),
    get_method("vs_cot", k=3),
    get_method("vs_multi", k=3, turns=2),
]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parsers_never_raise_on_arbitrary_text(text):
    for method in ALL_METHODS:
        result = method.parse(text)
        # either a reason for the whole completion, or at least one item: never both, never neither
        assert (result.error is None) == bool(result.items)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parsers_never_raise_on_arbitrary_json(value):
    text = json.dumps(value)
    wrapped = [text, json.dumps({"responses": value}), json.dumps({"reasoning": "r", "responses": [value, value]})]
    for method in ALL_METHODS:
        for candidate in wrapped:
            result = method.parse(candidate)
            assert (result.error is None) == bool(result.items)
            for item in result.items:
                assert item.error is not None or item.fields is not None
                assert item.probability is None or 0 <= item.probability <= 1


def test_parsers_survive_deep_nesting():
    for method in ALL_METHODS:
        for text in ("[" * 100_000, '{"responses": ' + "[" * 100_000, "x " + "{" * 50_000):
            result = method.parse(text)
            assert result.error is not None and not result.items


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        get_method("beam")


# --- every method of the paper -------------------------------------------------------------------------------------

METHOD_NAMES = ["direct", "cot", "sequence", "multi_turn", "vs_standard", "vs_cot", "vs_multi"]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_get_method_builds_every_method(name):
    method = get_method(name, k=4, turns=2)
    assert method.name == name
    expected_turns = {"multi_turn": 4, "vs_multi": 2}.get(name, 1)
    assert method.turns == expected_turns
    assert method.items_per_call == (1 if name in ("direct", "cot") else 4)
    schema = method.response_schema(ITEM_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(schema)
    for turn in range(method.turns):
        jsonschema.Draft202012Validator.check_schema(method.response_schema(ITEM_SCHEMA, turn=turn))
    conversation = method.conversation("Name a fruit", "Be brief.")
    assert conversation[-1] == {"role": "user", "content": "Name a fruit"}
    assert conversation[0]["role"] == "system" and conversation[0]["content"].startswith("Be brief.")


def test_single_turn_methods_have_no_follow_up():
    for name in ("direct", "cot", "sequence", "vs_standard", "vs_cot"):
        with pytest.raises(ValueError, match="single turn"):
            get_method(name).follow_up(1)
    with pytest.raises(ValueError, match="turn 3"):
        get_method("multi_turn", k=3).follow_up(3)
    with pytest.raises(ValueError, match="turn 0"):
        get_method("vs_multi", k=3, turns=2).follow_up(0)


def test_cot_prompt_schema_and_parse():
    cot = get_method("cot")
    system = cot.conversation("Name a fruit", None)[0]["content"]
    assert "step by step" in system and '"reasoning"' in system and "then the response's fields" in system
    schema = cot.response_schema(ITEM_SCHEMA)
    assert list(schema["properties"]) == ["reasoning", "name", "year"]  # reasoning is written first
    assert schema["required"] == ["reasoning", "name", "year"] and "title" not in schema
    jsonschema.validate({"reasoning": "think", "name": "Ada", "year": 1815}, schema)
    for bad in ({"name": "Ada", "year": 1815}, {"reasoning": 3, "name": "Ada", "year": 1815}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    parsed = cot.parse('{"reasoning": "fruits are many", "name": "Ada", "year": 1815}')
    assert parsed.items[0].fields == {"name": "Ada", "year": 1815}  # the reasoning is dropped from the record
    assert cot.parse('{"name": "Ada", "year": 1}').items[0].fields == {"name": "Ada", "year": 1}  # tolerant
    assert cot.parse('{"reasoning": "only thoughts"}').items[0].error == "only a reasoning, no record fields"
    assert "expected a JSON object" in cot.parse('["a"]').error
    assert cot.parse("").error == "empty completion"
    with pytest.raises(ValueError, match="field 'reasoning'"):
        cot.response_schema({"type": "object", "properties": {"reasoning": {"type": "string"}}})


def test_sequence_prompt_schema_and_parse():
    seq = get_method("sequence", k=3)
    system = seq.conversation("Name a fruit", None)[0]["content"]
    assert "generate 3 different responses" in system and '"responses"' in system and "probability" not in system
    schema = seq.response_schema(ITEM_SCHEMA)
    good = {"responses": [{"name": c, "year": i} for i, c in enumerate("abc")]}
    jsonschema.validate(good, schema)
    for bad in (
        {"responses": good["responses"][:2]},  # k is exact
        {"responses": [*good["responses"][:2], {"name": "c", "year": 3, "probability": 0.2}]},  # no probabilities
        {"responses": good["responses"], "extra": 1},
        good["responses"],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    items = seq.parse(json.dumps({"responses": [*good["responses"], "text"]})).items
    assert [i.fields for i in items[:3]] == good["responses"] and all(i.probability is None for i in items)
    assert "not an object" in items[3].error
    assert seq.parse(json.dumps(good["responses"])).items[1].fields == {"name": "b", "year": 1}  # a bare list
    assert seq.parse('{"responses": []}').error == '"responses" is empty'
    assert seq.parse('{"name": "a"}').error == 'no "responses" list in the answer'


def test_multi_turn_prompt_schema_and_parse():
    mt = get_method("multi_turn", k=3)
    assert mt.turns == 3 and mt.items_per_call == 3
    # the first turn asks normally, exactly as direct prompting does
    direct = get_method("direct")
    assert mt.conversation("Name a fruit", "Be brief.") == direct.conversation("Name a fruit", "Be brief.")
    follow_up = mt.follow_up(1)
    assert "one alternative response" in follow_up and "same JSON format" in follow_up
    assert mt.follow_up(2) == follow_up
    for turn in (None, 0, 2):
        schema = mt.response_schema(ITEM_SCHEMA, turn=turn)
        jsonschema.validate({"name": "Ada", "year": 1815}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "Ada"}, schema)
    assert mt.parse('{"name": "Ada", "year": 1815}').items[0].fields == {"name": "Ada", "year": 1815}
    assert mt.parse("nope").error == "no JSON object in completion"


def test_vs_cot_prompt_schema_and_parse():
    vs = get_method("vs_cot", k=2, probability_threshold=0.5)
    system = vs.conversation("Name a fruit", None)[0]["content"]
    assert system.index('"reasoning"') < system.index('"responses"')
    assert "generate 2 possible responses" in system and "below 0.5" in system and "step by step" in system
    schema = vs.response_schema(ITEM_SCHEMA)
    assert list(schema["properties"]) == ["reasoning", "responses"]
    responses = [{"name": "a", "year": 1, "probability": 0.4}, {"name": "b", "year": 2, "probability": 0.6}]
    jsonschema.validate({"reasoning": "r", "responses": responses}, schema)
    for bad in (
        {"responses": responses},  # the reasoning is required
        {"reasoning": "r", "responses": responses[:1]},
        {"reasoning": "r", "responses": [responses[0], {"name": "b", "year": 2}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    items = vs.parse(json.dumps({"reasoning": "r", "responses": responses})).items
    assert [(i.fields, i.probability) for i in items] == [
        ({"name": "a", "year": 1}, 0.4),
        ({"name": "b", "year": 2}, 0.6),
    ]
    assert vs.parse('{"reasoning": "r"}').error == 'no "responses" list in the answer'


def test_vs_multi_split_prompts_and_schemas():
    vs = get_method("vs_multi", k=5, turns=2, probability_threshold=0.1)
    assert vs.sizes == [3, 2] and vs.turns == 2 and vs.items_per_call == 5
    assert get_method("vs_multi", k=7, turns=3).sizes == [3, 2, 2]
    assert get_method("vs_multi", k=3, turns=3).sizes == [1, 1, 1]
    system = vs.conversation("Name a fruit", None)[0]["content"]
    assert "generate 3 possible responses" in system and "below 0.1" in system
    follow_up = vs.follow_up(1)
    assert "Generate 2 more possible responses" in follow_up and "different from every response" in follow_up
    assert "below 0.1" in follow_up and '"probability"' in follow_up
    assert "1 more possible response " in get_method("vs_multi", k=3, turns=2).follow_up(1)  # singular
    item = {"name": "a", "year": 1, "probability": 0.2}
    first, second, either = (vs.response_schema(ITEM_SCHEMA, turn=t) for t in (0, 1, None))
    jsonschema.validate({"responses": [item] * 3}, first)
    jsonschema.validate({"responses": [item] * 2}, second)
    for answer in ({"responses": [item] * 2}, {"responses": [item] * 3}):
        jsonschema.validate(answer, either)
    for schema, bad in ((first, [item] * 2), (second, [item] * 3), (either, [item] * 4), (either, [item])):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"responses": bad}, schema)
    assert vs.parse(json.dumps({"responses": [item] * 2})).items[1].probability == 0.2
    with pytest.raises(ValueError, match="turns must be <= k"):
        get_method("vs_multi", k=2, turns=3)


DEFINITION_PHRASES = {
    "explicit": "if the query were asked many times, as a share of the full distribution",
    "implicit": '"probability": how likely this response is, from 0.0 to 1.0.',
    "relative": "compared with the other responses in your list",
    "percentage": "as a percentage, from 0 to 100",
    "confidence": "your confidence, from 0.0 to 1.0, that this response is a good answer",
}


@pytest.mark.parametrize("definition", list(DEFINITION_PHRASES))
@pytest.mark.parametrize("name", ["vs_standard", "vs_cot", "vs_multi"])
def test_probability_definition_wording(name, definition):
    method = get_method(name, k=2, turns=2, probability_definition=definition)
    system = method.conversation("q", None)[0]["content"]
    assert DEFINITION_PHRASES[definition] in system
    for other, phrase in DEFINITION_PHRASES.items():
        assert other == definition or phrase not in system
    if name == "vs_multi":
        assert DEFINITION_PHRASES[definition] in method.follow_up(1)
    maximum = method.response_schema(ITEM_SCHEMA, turn=0)["properties"]["responses"]["items"]["properties"]
    assert maximum["probability"]["maximum"] == (100 if definition == "percentage" else 1)


def test_unknown_probability_definition_refused():
    with pytest.raises(ValueError, match="probability_definition"):
        get_method("vs_standard", probability_definition="vibes")


def test_percentage_is_parsed_into_unit_interval():
    vs = get_method("vs_standard", k=3, probability_definition="percentage", probability_threshold=0.05)
    assert "below 5 percent" in vs.conversation("q", None)[0]["content"]
    responses = [{"name": "a", "probability": 40}, {"name": "b", "probability": 2.5}, {"name": "c", "probability": 150}]
    text = json.dumps({"responses": responses})
    items = vs.parse(text).items
    assert [i.probability for i in items[:2]] == [0.4, 0.025]
    assert items[2].probability is None and "less than or equal to 100" in items[2].error
    answer = {"responses": [{"name": "a", "year": 1, "probability": 70}] * 3}
    jsonschema.validate(answer, vs.response_schema(ITEM_SCHEMA))
    # the other definitions keep the 0-1 scale: 40 is out of range there
    relative = get_method("vs_standard", probability_definition="relative")
    assert "less than or equal to 1" in relative.parse(text).items[0].error


def test_vs_refuses_record_schema_with_probability_field():
    schema = {"type": "object", "properties": {"probability": {"type": "number"}}}
    for name in ("vs_standard", "vs_cot", "vs_multi"):
        with pytest.raises(ValueError, match="field 'probability'"):
            get_method(name, k=2).response_schema(schema)


vs_items = st.lists(
    st.dictionaries(
        st.sampled_from(["name", "year", "probability", "reasoning", "responses"]),
        st.none()
        | st.booleans()
        | st.floats()
        | st.integers()
        | st.text(max_size=5)
        | st.lists(st.integers(), max_size=2),
        max_size=4,
    )
    | st.integers()
    | st.text(max_size=5),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(vs_items, st.booleans())
def test_parsers_never_raise_on_response_lists(responses, wrap):
    text = json.dumps({"reasoning": "r", "responses": responses} if wrap else responses, allow_nan=True)
    for method in ALL_METHODS:
        result = method.parse(text)
        assert (result.error is None) == bool(result.items)
        for item in result.items:
            assert item.error is not None or item.fields is not None
            assert item.probability is None or 0 <= item.probability <= 1


# --- selection: how a VS answer becomes records ---------------------------------------------------------------------


def test_selection_all_keeps_every_response():
    vs = get_method("vs_standard", k=3)
    assert vs.selection.apply([0.1, 0.0, 0.9], seed=0, call_id="c0") == [None, None, None]
    assert vs.items_per_call == 3


def test_selection_sample_is_one_seeded_draw_by_weight():
    vs = get_method("vs_standard", k=2, selection="sample")
    assert vs.items_per_call == 1 and get_method("vs_multi", k=4, turns=2, selection="sample").items_per_call == 2
    verdicts = vs.selection.apply([0.6, 0.3, 0.1], seed=7, call_id="c1-p0-s0")
    assert sum(v is None for v in verdicts) == 1
    dropped = [v for v in verdicts if v is not None]
    assert {v.reason for v in dropped} == {"not_sampled"} and "sampled by verbalized weight" in dropped[0].detail
    # deterministic given the seed and the call id; other call ids draw independently
    assert vs.selection.apply([0.6, 0.3, 0.1], seed=7, call_id="c1-p0-s0") == verdicts
    picks = [vs.selection.apply([0.8, 0.2], seed=1, call_id=f"c{i}").index(None) for i in range(2000)]
    assert 0.75 < picks.count(0) / len(picks) < 0.85  # follows the normalised weights
    picks_other_seed = [vs.selection.apply([0.8, 0.2], seed=2, call_id=f"c{i}").index(None) for i in range(2000)]
    assert picks != picks_other_seed
    # weights need not sum to 1 (small models rarely make them): 3 and 1 behave like 0.75 and 0.25
    picks = [vs.selection.apply([0.3, 0.1], seed=1, call_id=f"c{i}").index(None) for i in range(2000)]
    assert 0.70 < picks.count(0) / len(picks) < 0.80
    # no usable weight: uniform; a zero weight is never drawn while another is positive
    picks = [vs.selection.apply([0.0, 0.0], seed=1, call_id=f"c{i}").index(None) for i in range(400)]
    assert 0.4 < picks.count(0) / 400 < 0.6
    assert all(vs.selection.apply([0.0, 0.5, 0.0], seed=1, call_id=f"c{i}")[1] is None for i in range(200))
    assert vs.selection.apply([], seed=1, call_id="c") == []


def test_selection_threshold_with_min_keep():
    vs = get_method("vs_standard", k=4, selection="threshold", selection_threshold=0.2, min_keep=2)
    verdicts = vs.selection.apply([0.5, 0.1, 0.2, 0.05], seed=0, call_id="c")
    assert [v is None for v in verdicts] == [True, False, True, False]  # at or above the threshold stays
    assert verdicts[1].reason == "below_threshold"
    assert verdicts[1].detail == "verbalized probability 0.1 < threshold 0.2"
    # fewer than min_keep pass: the most probable are kept (ties go to the earlier response)
    verdicts = vs.selection.apply([0.1, 0.05, 0.15, 0.1], seed=0, call_id="c")
    assert [v is None for v in verdicts] == [True, False, True, False]
    assert [v is None for v in vs.selection.apply([0.01], seed=0, call_id="c")] == [True]
    with pytest.raises(ValueError, match="selection_threshold"):
        get_method("vs_standard", selection="threshold")


def test_non_vs_methods_keep_every_record_and_refuse_vs_options():
    for name in ("direct", "cot", "sequence", "multi_turn"):
        method = get_method(name, k=3)
        assert method.selection.apply([None, None, None], seed=0, call_id="c") == [None, None, None]
        with pytest.raises(ValueError, match="apply to Verbalized Sampling methods"):
            get_method(name, k=3, selection="sample")
