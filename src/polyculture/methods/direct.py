"""Direct prompting: the user prompt as is, one record per completion (a baseline for the VS methods)."""

from __future__ import annotations

from typing import Any

from polyculture.engines.base import Conversation
from polyculture.methods.base import (
    ParsedItem,
    ParseResult,
    SingleTurn,
    load_json_object,
    nested_schema,
)


def plain_conversation(user: str, system: str | None) -> Conversation:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}]


def parse_record(text: str) -> ParseResult:
    """One JSON object, the record itself."""
    value, error = load_json_object(text)
    if error is not None:
        return ParseResult(error=error)
    if not isinstance(value, dict):
        return ParseResult(error=f"expected a JSON object, got {type(value).__name__}")
    return ParseResult(items=[ParsedItem(fields=value)])


class Direct(SingleTurn):
    name = "direct"
    k = 1
    items_per_call = 1

    def conversation(self, user: str, system: str | None) -> Conversation:
        return plain_conversation(user, system)

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        return nested_schema(item_schema)

    def parse(self, text: str) -> ParseResult:
        return parse_record(text)
