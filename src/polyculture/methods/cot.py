"""CoT prompting (a baseline for the VS methods): one record, with a "reasoning" field written before the record's
fields.

The reasoning only serves the model; the parser drops it from the record.
"""

from __future__ import annotations

from typing import Any

from polyculture.engines.base import Conversation
from polyculture.methods.base import (
    ParsedItem,
    ParseResult,
    SingleTurn,
    load_json_object,
    with_leading_field,
)

COT_INSTRUCTIONS = (
    "Think step by step before you answer. Answer in JSON: first a \"reasoning\" field (a string) with your "
    "step-by-step thinking about the query, then the response's fields."
)


class CoT(SingleTurn):
    name = "cot"
    k = 1
    items_per_call = 1

    def conversation(self, user: str, system: str | None) -> Conversation:
        system_text = f"{system}\n\n{COT_INSTRUCTIONS}" if system else COT_INSTRUCTIONS
        return [{"role": "system", "content": system_text}, {"role": "user", "content": user}]

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        return with_leading_field(item_schema, "reasoning", {"type": "string"})

    def parse(self, text: str) -> ParseResult:
        value, error = load_json_object(text)
        if error is not None:
            return ParseResult(error=error)
        if not isinstance(value, dict):
            return ParseResult(error=f"expected a JSON object, got {type(value).__name__}")
        fields = {k: v for k, v in value.items() if k != "reasoning"}
        if not fields:
            return ParseResult(items=[ParsedItem(fields=None, error="only a reasoning, no record fields")])
        return ParseResult(items=[ParsedItem(fields=fields)])
