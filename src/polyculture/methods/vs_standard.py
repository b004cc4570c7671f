"""VS-Standard (Zhang et al. 2025): ask for k responses with their verbalized probabilities in one JSON answer.

For structured records each response item is the record's fields plus `probability`; the constrained-decoding
schema is built from the record schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polyculture.engines.base import Conversation
from polyculture.methods.base import ParsedItem, ParseResult, load_json_object, nested_schema


def vs_instructions(k: int, probability_threshold: float | None) -> str:
    if probability_threshold is None:
        sampling = "Sample them at random from the full distribution of plausible responses."
    else:
        sampling = (
            "Sample them at random from the tails of the distribution, such that the probability of each "
            f"response is below {probability_threshold:g}."
        )
    return (
        f"For each query, generate {k} possible responses. {sampling} "
        'Answer in JSON with the key "responses": a list of objects. Each object holds one response\'s fields '
        'and "probability": your estimate, from 0.0 to 1.0, of how likely this response is given the query, '
        "relative to the full distribution of responses."
    )


class VSStandard:
    name = "vs_standard"

    def __init__(self, k: int = 5, probability_threshold: float | None = None) -> None:
        self.k = k
        self.items_per_call = k
        self.probability_threshold = probability_threshold

    def conversation(self, user: str, system: str | None) -> Conversation:
        instructions = vs_instructions(self.k, self.probability_threshold)
        system_text = f"{system}\n\n{instructions}" if system else instructions
        return [{"role": "system", "content": system_text}, {"role": "user", "content": user}]

    def response_schema(self, item_schema: dict[str, Any]) -> dict[str, Any]:
        item = nested_schema(item_schema)
        properties = {**item.get("properties", {}), "probability": {"type": "number", "minimum": 0, "maximum": 1}}
        required = [*item.get("required", []), "probability"]
        return {
            "type": "object",
            "properties": {
                "responses": {
                    "type": "array",
                    "items": {**item, "properties": properties, "required": required},
                    "minItems": self.k,
                    "maxItems": self.k,
                }
            },
            "required": ["responses"],
            "additionalProperties": False,
        }

    def parse(self, text: str) -> ParseResult:
        value, error = load_json_object(text)
        if error is not None:
            return ParseResult(error=error)
        responses = value.get("responses") if isinstance(value, dict) else value
        if not isinstance(responses, list):
            return ParseResult(error='no "responses" list in the answer')
        if not responses:
            return ParseResult(error='"responses" is empty')
        return ParseResult(items=[_item(r) for r in responses])


class VSResponse(BaseModel):
    """One VS response item: the record's fields (kept as extras) plus its verbalized probability."""

    model_config = ConfigDict(extra="allow")
    probability: float = Field(ge=0, le=1, allow_inf_nan=False)


def _item(response: Any) -> ParsedItem:
    if not isinstance(response, dict):
        return ParsedItem(fields=None, error=f"response is a {type(response).__name__}, not an object")
    try:
        item = VSResponse.model_validate(response)
    except ValidationError as exc:
        fields = {k: v for k, v in response.items() if k != "probability"}
        first = exc.errors()[0]
        return ParsedItem(fields=fields, error=f"probability: {first['msg']} (got {first.get('input')!r})")
    return ParsedItem(fields=dict(item.model_extra or {}), probability=item.probability)
