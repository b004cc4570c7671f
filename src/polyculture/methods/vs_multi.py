"""VS-Multi (Verbalized Sampling): the k VS responses asked for over `turns` turns of one conversation.

Turn t asks for ceil or floor of k / turns responses (the larger counts first, so they sum to k); each later turn
sees the earlier answers and asks for more responses, different from all given so far.
"""

from __future__ import annotations

from typing import Any

from polyculture.methods.selection import Selection
from polyculture.methods.vs_standard import (
    PROBABILITY_WORDING,
    VSStandard,
    possible_responses,
    responses_schema,
    tail_sentence,
    vs_instructions,
    vs_item_schema,
)


def responses_per_turn(k: int, turns: int) -> list[int]:
    """k responses over `turns` turns: the first k % turns turns get one more (e.g. 5 over 2: [3, 2])."""
    if not 1 <= turns <= k:
        raise ValueError(f"vs_multi splits k={k} responses over turns={turns}: need 1 <= turns <= k")
    base, extra = divmod(k, turns)
    return [base + 1 if t < extra else base for t in range(turns)]


class VSMulti(VSStandard):
    name = "vs_multi"

    def __init__(
        self,
        k: int = 5,
        turns: int = 2,
        probability_threshold: float | None = None,
        probability_definition: str = "explicit",
        selection: Selection | None = None,
    ) -> None:
        super().__init__(k, probability_threshold, probability_definition, selection)
        self.sizes = responses_per_turn(k, turns)  # responses asked for in each turn
        self.turns = turns
        self.items_per_call = sum(self.selection.records_per_answer(n) for n in self.sizes)

    def instructions(self) -> str:
        return vs_instructions(self.sizes[0], self.probability_threshold, self.probability_definition)

    def follow_up(self, turn: int) -> str:
        if not 1 <= turn < self.turns:
            raise ValueError(f"vs_multi has turns 0..{self.turns - 1}; turn {turn} has no follow-up")
        return (
            f"Generate {possible_responses(self.sizes[turn], more=True)} to the original query, different from every "
            "response you have given so far. "
            f"{tail_sentence(self.probability_threshold, self.probability_definition)} "
            'Answer in the same JSON format: the key "responses", a list of objects, each with one response\'s '
            f"fields and {PROBABILITY_WORDING[self.probability_definition]}"
        )

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        item = vs_item_schema(item_schema, self.probability_definition)
        low, high = (min(self.sizes), max(self.sizes)) if turn is None else (self.sizes[turn],) * 2
        return {
            "type": "object",
            "properties": {"responses": responses_schema(item, low, high)},
            "required": ["responses"],
            "additionalProperties": False,
        }
