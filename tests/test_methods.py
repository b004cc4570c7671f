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


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parsers_never_raise_on_arbitrary_text(text):
    for method in (get_method("direct"), get_method("vs_standard", k=3)):
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
    for method in (get_method("direct"), get_method("vs_standard", k=3)):
        result = method.parse(text)
        for item in result.items:
            assert item.error is not None or item.fields is not None


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        get_method("beam")
