"""Sequence prompting (a baseline for the VS methods): k records at once as a JSON list under "responses", no
probabilities."""

from __future__ import annotations

from typing import Any

from polyculture.engines.base import Conversation
from polyculture.methods.base import (
    ParsedItem,
    ParseResult,
    SingleTurn,
    nested_schema,
    read_responses,
)


def sequence_instructions(k: int) -> str:
    return (
        f"For each query, generate {k} different responses. "
        'Answer in JSON with the key "responses": a list of objects, each holding one response\'s fields.'
    )


class SequenceMethod(SingleTurn):
    name = "sequence"

    def __init__(self, k: int = 5) -> None:
        self.k = k
        self.items_per_call = k

    def conversation(self, user: str, system: str | None) -> Conversation:
        instructions = sequence_instructions(self.k)
        system_text = f"{system}\n\n{instructions}" if system else instructions
        return [{"role": "system", "content": system_text}, {"role": "user", "content": user}]

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "responses": {
                    "type": "array",
                    "items": nested_schema(item_schema),
                    "minItems": self.k,
                    "maxItems": self.k,
                }
            },
            "required": ["responses"],
            "additionalProperties": False,
        }

    def parse(self, text: str) -> ParseResult:
        responses, truncated, error = read_responses(text)
        if responses is None:
            return ParseResult(error=error)
        return ParseResult(
            items=[
                ParsedItem(fields=r)
                if isinstance(r, dict)
                else ParsedItem(fields=None, error=f"response is a {type(r).__name__}, not an object")
                for r in responses
            ],
            truncated=truncated,
        )
