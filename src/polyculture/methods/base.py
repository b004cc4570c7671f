"""The method interface and the tolerant JSON reading every parser shares."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from polyculture.engines.base import Conversation

if TYPE_CHECKING:
    from polyculture.spec import MethodSpec

# Keys that describe a schema document rather than constrain a value; dropped when a schema is nested.
_SCHEMA_META_KEYS = ("$schema", "$id", "title", "description", "examples")


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


class Method(Protocol):
    name: str
    items_per_call: int

    def conversation(self, user: str, system: str | None) -> Conversation: ...

    def response_schema(self, item_schema: dict[str, Any]) -> dict[str, Any]:
        """The JSON Schema of a whole completion, given the schema of one record (for constrained decoding)."""
        ...

    def parse(self, text: str) -> ParseResult:
        """Never raises: anything malformed becomes an error with a reason."""
        ...


def nested_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in _SCHEMA_META_KEYS}


def load_json_object(text: str) -> tuple[Any, str | None]:
    """Parse JSON, tolerating prose or code fences around one JSON value; returns (value, error)."""
    stripped = text.strip()
    if not stripped:
        return None, "empty completion"
    try:
        return json.loads(stripped), None
    except json.JSONDecodeError as exc:
        first_error = f"invalid JSON: {exc.msg} at char {exc.pos}"
    start = min((i for i in (stripped.find("{"), stripped.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None, "no JSON object in completion"
    try:
        value, _ = json.JSONDecoder().raw_decode(stripped[start:])
        return value, None
    except json.JSONDecodeError:
        return None, first_error


def get_method(spec: MethodSpec | str, **options: Any) -> Method:
    """The method a spec's `method:` section describes (or a name plus MethodSpec fields, for tests and benches)."""
    from polyculture.methods.direct import Direct
    from polyculture.methods.vs_standard import VSStandard
    from polyculture.spec import MethodSpec

    if isinstance(spec, str):
        try:
            spec = MethodSpec(name=spec, **options)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"unknown method '{spec}' or bad options {options}: {exc}") from None
    if spec.name == "direct":
        return Direct()
    if spec.name == "vs_standard":
        return VSStandard(k=spec.k, probability_threshold=spec.probability_threshold)
    raise ValueError(f"method '{spec.name}' is not implemented yet")
