"""The method interface and the tolerant JSON reading every parser shares, including the complete responses read
from an answer cut short."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import ijson

from polyculture.engines.base import Conversation
from polyculture.methods.selection import Selection

# Keys that describe a schema document rather than constrain a value; dropped when a schema is nested.
_SCHEMA_META_KEYS = ("$schema", "$id", "title", "description", "examples")
# Deeper nesting in a cut answer is not read back (no record nests this deep; a builder per level would be costly).
MAX_SALVAGE_DEPTH = 256


@dataclass(frozen=True)
class ParsedItem:
    """One candidate read from a completion: its fields, or the reason it could not be read."""

    fields: dict[str, Any] | None
    probability: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ParseResult:
    items: list[ParsedItem] = field(default_factory=list)
    error: str | None = None  # the completion as a whole could not be read
    # The JSON was cut short (e.g. at the token limit): `items` are the complete responses before the cut, salvaged;
    # the response that was being written when it stopped is lost.
    truncated: bool = False


class Method(Protocol):
    """A prompting method. One *call* is one thread: the first turn's conversation, then `turns - 1` follow-ups,
    each appended after the model's previous answer. Every turn's completion is an answer of its own."""

    name: str
    k: int  # responses the method asks for per call, over all its turns (the template variable `k`)
    items_per_call: int  # records one call is expected to yield after selection (for planning)
    turns: int  # 1 for single-turn methods
    selection: Selection  # how an answer's parsed responses become records (VS methods; "all" for the others)

    def conversation(self, user: str, system: str | None) -> Conversation:
        """The first turn's messages."""
        ...

    def follow_up(self, turn: int) -> str:
        """The user message of turn `turn` (1 <= turn < turns), sent after the model's previous answer."""
        ...

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        """The JSON Schema of a whole completion, given the schema of one record (for constrained decoding).

        With `turn`, that turn's exact answer (vs_multi asks for different counts per turn); without, a schema that
        every turn's answer satisfies."""
        ...

    def parse(self, text: str) -> ParseResult:
        """Never raises: anything malformed becomes an error with a reason."""
        ...


class SingleTurn:
    """Mixin: one turn, every response kept."""

    turns = 1
    selection = Selection()

    def follow_up(self, turn: int) -> str:
        raise ValueError(f"method '{getattr(self, 'name', '?')}' has a single turn; there is no turn {turn}")


def nested_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema without the keys that describe a schema document, ready to be nested inside another schema."""
    return {k: v for k, v in schema.items() if k not in _SCHEMA_META_KEYS}


def with_leading_field(item_schema: dict[str, Any], name: str, field_schema: dict[str, Any]) -> dict[str, Any]:
    """The record schema with one more required property placed first (constrained decoding writes it first)."""
    item = nested_schema(item_schema)
    properties = item.get("properties", {})
    if name in properties:
        raise ValueError(f"the record schema has a field '{name}', which this method uses for itself; rename it")
    return {
        **item,
        "properties": {name: field_schema, **properties},
        "required": [name, *[r for r in item.get("required", []) if r != name]],
    }


def load_json_object(text: str) -> tuple[Any, str | None]:
    """Parse JSON, tolerating prose or code fences around one JSON value; returns (value, error)."""
    stripped = text.strip()
    if not stripped:
        return None, "empty completion"
    try:
        return json.loads(stripped), None
    except json.JSONDecodeError as exc:
        first_error = f"invalid JSON: {exc.msg} at char {exc.pos}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    start = min((i for i in (stripped.find("{"), stripped.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None, "no JSON object in completion"
    try:
        value, _ = json.JSONDecoder().raw_decode(stripped[start:])
        return value, None
    except json.JSONDecodeError:
        return None, first_error
    except RecursionError:
        return None, "invalid JSON: nested too deeply"


def read_responses(text: str) -> tuple[list[Any] | None, bool, str | None]:
    """The responses of a list answer: (responses, truncated, None), or (None, False, reason).

    JSON cut short yields the complete responses before the cut (truncated True) when there is at least one."""
    value, error = load_json_object(text)
    if error is None:
        responses, error = responses_list(value)
        return responses, False, error
    salvaged = cut_responses(text)
    return (salvaged, True, None) if salvaged else (None, False, error)


def cut_responses(text: str) -> list[Any]:
    """The complete items of the responses list (under the root object's "responses" key, or the root list) of JSON
    cut short, in order. [] when the text is complete JSON, is malformed before its end, or holds no complete item.

    ijson reads the text as a stream of parse events: a syntax error raises while the text is read, a cut only when
    the parser is closed, so only a valid JSON prefix is salvaged. A value still open at the cut yields no event
    (a number waits for the character after it), so an item that is itself cut is dropped."""
    stripped = text.strip()
    start = min((i for i in (stripped.find("{"), stripped.find("[")) if i >= 0), default=-1)
    if start < 0:
        return []
    events = ijson.sendable_list()
    parser = ijson.basic_parse_coro(events, use_float=True)
    try:
        parser.send(stripped[start:].encode("utf-8"))
    except (ijson.JSONError, UnicodeError):
        return []
    before_cut = len(events)  # closing flushes a number still open at the cut; it may have gone on
    try:
        parser.close()
    except ijson.IncompleteJSONError:
        return _list_items(iter(events[:before_cut]))
    except ijson.JSONError:
        return []
    return []  # complete JSON: nothing was cut


def _list_items(events: Iterator[tuple[str, Any]]) -> list[Any]:
    """The complete items of the responses list, from the parse events of a JSON prefix."""
    event, _ = next(events, ("", None))
    if event == "start_map":
        depth = 1
        for event, value in events:
            if depth == 1 and event == "map_key" and value == "responses":
                event, _ = next(events, ("", None))
                return _array_items(events) if event == "start_array" else []
            depth += _depth_change(event)
            if depth > MAX_SALVAGE_DEPTH:
                return []
        return []
    return _array_items(events) if event == "start_array" else []


def _array_items(events: Iterator[tuple[str, Any]]) -> list[Any]:
    """Each value completed inside the array just opened, until it closes or the events end (the cut)."""
    items: list[Any] = []
    builder, depth = ijson.ObjectBuilder(), 0
    for event, value in events:
        if depth == 0 and event == "end_array":
            break
        builder.event(event, value)
        depth += _depth_change(event)
        if depth > MAX_SALVAGE_DEPTH:
            break
        if depth == 0:
            items.append(builder.value)
            builder = ijson.ObjectBuilder()
    return items


def _depth_change(event: str) -> int:
    return 1 if event in ("start_map", "start_array") else -1 if event in ("end_map", "end_array") else 0


def responses_list(value: Any) -> tuple[list[Any] | None, str | None]:
    """The list under "responses" (or a bare list of responses); (None, reason) when there is none or it is empty."""
    responses = value.get("responses") if isinstance(value, dict) else value
    if not isinstance(responses, list):
        return None, 'no "responses" list in the answer'
    if not responses:
        return None, '"responses" is empty'
    return responses, None
