"""VS-CoT (Verbalized Sampling): a "reasoning" field first, then the k VS responses with their probabilities."""

from __future__ import annotations

from typing import Any

from polyculture.methods.vs_standard import (
    VSStandard,
    responses_schema,
    vs_instructions,
    vs_item_schema,
)


class VSCoT(VSStandard):
    name = "vs_cot"

    def instructions(self) -> str:
        return vs_instructions(self.k, self.probability_threshold, self.probability_definition, reasoning=True)

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        item = vs_item_schema(item_schema, self.probability_definition)
        return {
            "type": "object",
            "properties": {"reasoning": {"type": "string"}, "responses": responses_schema(item, self.k, self.k)},
            "required": ["reasoning", "responses"],
            "additionalProperties": False,
        }

    # parse: VS-Standard's; the reasoning is ignored (a bare list of responses is accepted too). An answer cut short
    # yields the responses completed before the cut, so none while the reasoning written first is still open.
