"""Multi-turn prompting (a baseline for the VS methods): k turns in one conversation, one record per turn.

The first turn asks as direct prompting does; each later turn follows the model's previous answers with a request
for one alternative response.
"""

from __future__ import annotations

from typing import Any

from polyculture.engines.base import Conversation
from polyculture.methods.base import ParseResult, nested_schema
from polyculture.methods.direct import parse_record, plain_conversation
from polyculture.methods.selection import Selection

MULTI_TURN_FOLLOW_UP = (
    "Generate one alternative response to the original request, different from your previous responses. "
    "Answer in the same JSON format."
)


class MultiTurn:
    name = "multi_turn"
    selection = Selection()

    def __init__(self, k: int = 5) -> None:
        self.k = k
        self.turns = k
        self.items_per_call = k

    def conversation(self, user: str, system: str | None) -> Conversation:
        return plain_conversation(user, system)

    def follow_up(self, turn: int) -> str:
        if not 1 <= turn < self.turns:
            raise ValueError(f"multi_turn has turns 0..{self.turns - 1}; turn {turn} has no follow-up")
        return MULTI_TURN_FOLLOW_UP

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        return nested_schema(item_schema)

    def parse(self, text: str) -> ParseResult:
        return parse_record(text)
