"""VS-Standard (Verbalized Sampling): ask for k responses with their verbalized probabilities in one JSON answer.

For structured records each response item is the record's fields plus `probability`; the constrained-decoding
schema is built from the record schema. This module also holds what every VS variant shares: the wording of each
probability definition, the tail option, the response-list schema and the tolerant item parser.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polyculture.engines.base import Conversation
from polyculture.methods.base import (
    ParsedItem,
    ParseResult,
    SingleTurn,
    nested_schema,
    read_responses,
)
from polyculture.methods.selection import Selection

# How each probability definition asks for the number. The JSON key is `probability` for all of them; only
# `percentage` uses another scale (0-100), which the parser maps to [0, 1].
PROBABILITY_WORDING = {
    "explicit": (
        '"probability": the probability of this response, from 0.0 to 1.0: how often you would give exactly this '
        "response if the query were asked many times, as a share of the full distribution of responses."
    ),
    "implicit": '"probability": how likely this response is, from 0.0 to 1.0.',
    "relative": (
        '"probability": how likely this response is compared with the other responses in your list, from 0.0 to '
        "1.0 (give the most likely one the highest value and scale the others against it)."
    ),
    "percentage": (
        '"probability": the chance of this response as a percentage, from 0 to 100: how often, in percent, you '
        "would give exactly this response if the query were asked many times."
    ),
    "confidence": '"probability": your confidence, from 0.0 to 1.0, that this response is a good answer to the query.',
}
PROBABILITY_DEFINITIONS = tuple(PROBABILITY_WORDING)


def probability_scale(probability_definition: str) -> float:
    """The largest value the model is asked to write (100 for percentage, else 1)."""
    return 100.0 if probability_definition == "percentage" else 1.0


def _check_definition(probability_definition: str) -> None:
    if probability_definition not in PROBABILITY_WORDING:
        raise ValueError(
            f"probability definition '{probability_definition}' is unknown; allowed: {', '.join(PROBABILITY_WORDING)}"
        )


def possible_responses(n: int, *, more: bool = False) -> str:
    return f"{n} {'more ' if more else ''}possible response" + ("" if n == 1 else "s")


def tail_sentence(probability_threshold: float | None, probability_definition: str = "explicit") -> str:
    if probability_threshold is None:
        return "Sample them at random from the full distribution of plausible responses."
    bound = (
        f"{probability_threshold * 100:g} percent"
        if probability_definition == "percentage"
        else f"{probability_threshold:g}"
    )
    return (
        "Sample them at random from the tails of the distribution: the probability of each response must be "
        f"below {bound}."
    )


def vs_instructions(
    k: int, probability_threshold: float | None, probability_definition: str = "explicit", *, reasoning: bool = False
) -> str:
    _check_definition(probability_definition)
    think = 'first think step by step, in a "reasoning" field, about the range of responses the query admits; then '
    ask = f"{think if reasoning else ''}generate {possible_responses(k)}"
    shape = (
        'Answer in JSON with the key "reasoning" (a string) first, then the key "responses": a list of objects.'
        if reasoning
        else 'Answer in JSON with the key "responses": a list of objects.'
    )
    return (
        f"For each query, {ask}. {tail_sentence(probability_threshold, probability_definition)} {shape} "
        f"Each object holds one response's fields and {PROBABILITY_WORDING[probability_definition]}"
    )


def vs_item_schema(item_schema: dict[str, Any], probability_definition: str) -> dict[str, Any]:
    item = nested_schema(item_schema)
    properties = item.get("properties", {})
    if "probability" in properties:
        raise ValueError("the record schema has a field 'probability', which VS uses for itself; rename it")
    probability = {"type": "number", "minimum": 0, "maximum": probability_scale(probability_definition)}
    return {
        **item,
        "properties": {**properties, "probability": probability},
        "required": [*item.get("required", []), "probability"],
    }


def responses_schema(item_schema: dict[str, Any], min_items: int, max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": item_schema, "minItems": min_items, "maxItems": max_items}


def parse_vs_responses(text: str, probability_definition: str = "explicit") -> ParseResult:
    responses, truncated, error = read_responses(text)
    if responses is None:
        return ParseResult(error=error)
    scale = probability_scale(probability_definition)
    return ParseResult(items=[parse_vs_item(r, scale) for r in responses], truncated=truncated)


class VSStandard(SingleTurn):
    name = "vs_standard"

    def __init__(
        self,
        k: int = 5,
        probability_threshold: float | None = None,
        probability_definition: str = "explicit",
        selection: Selection | None = None,
    ) -> None:
        _check_definition(probability_definition)
        self.k = k
        self.probability_threshold = probability_threshold
        self.probability_definition = probability_definition
        self.selection = selection or Selection()
        self.items_per_call = self.selection.records_per_answer(k)

    def instructions(self) -> str:
        return vs_instructions(self.k, self.probability_threshold, self.probability_definition)

    def conversation(self, user: str, system: str | None) -> Conversation:
        instructions = self.instructions()
        system_text = f"{system}\n\n{instructions}" if system else instructions
        return [{"role": "system", "content": system_text}, {"role": "user", "content": user}]

    def response_schema(self, item_schema: dict[str, Any], turn: int | None = None) -> dict[str, Any]:
        item = vs_item_schema(item_schema, self.probability_definition)
        return {
            "type": "object",
            "properties": {"responses": responses_schema(item, self.k, self.k)},
            "required": ["responses"],
            "additionalProperties": False,
        }

    def parse(self, text: str) -> ParseResult:
        return parse_vs_responses(text, self.probability_definition)


class VSResponse(BaseModel):
    """One VS response item: the record's fields (kept as extras) plus its verbalized probability."""

    model_config = ConfigDict(extra="allow")
    probability: float = Field(ge=0, le=1, allow_inf_nan=False)


class VSPercentResponse(BaseModel):
    """A VS response item whose probability was asked for as a percentage (0-100)."""

    model_config = ConfigDict(extra="allow")
    probability: float = Field(ge=0, le=100, allow_inf_nan=False)


def parse_vs_item(response: Any, scale: float = 1.0) -> ParsedItem:
    """Read one response item; the probability is returned in [0, 1] whatever scale it was asked on."""
    if not isinstance(response, dict):
        return ParsedItem(fields=None, error=f"response is a {type(response).__name__}, not an object")
    model = VSPercentResponse if scale == 100.0 else VSResponse
    try:
        item = model.model_validate(response)
    except ValidationError as exc:
        fields = {k: v for k, v in response.items() if k != "probability"}
        first = exc.errors()[0]
        return ParsedItem(fields=fields, error=f"probability: {first['msg']} (got {first.get('input')!r})")
    return ParsedItem(fields=dict(item.model_extra or {}), probability=item.probability / scale)
