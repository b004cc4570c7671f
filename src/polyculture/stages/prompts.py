"""prompts: what is asked of the model. The plan's cells rendered into chat prompts (Jinja2, strict), the hint lines
a top-up cell adds for attributes the pipeline cannot set, and the JSON Schema the answer is constrained to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2
import polars as pl

from polyculture.methods.base import Method
from polyculture.spec import BuildSpec

# A top-up plan's column: JSON {attribute: value} of the field/extract attributes its prompts steer towards.
HINTS_COLUMN = "hints"


@dataclass(frozen=True)
class PromptRequest:
    cell_id: int
    cell_key: str
    attributes: dict[str, str]
    prompt_index: int
    system: str | None
    user: str


def render_prompts(spec: BuildSpec, cells: pl.DataFrame, method: Method) -> list[PromptRequest]:
    """Every prompt of the plan, in cell order. Templates are strict: an undefined variable is an error."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    user_template = env.from_string(spec.prompt.template)
    system_template = env.from_string(spec.prompt.system) if spec.prompt.system else None
    names = [a.name for a in spec.prompt_attributes]
    requests = []
    for cell in cells.iter_rows(named=True):
        values = {name: cell[name] for name in names}
        # Top-up cells of field/extract attributes steer the model with a hint line per attribute.
        hints = json.loads(cell.get(HINTS_COLUMN) or "{}")
        hint = hint_lines(spec, hints) if hints else ""
        for index in range(cell["n_prompts"]):
            variables = {**values, "k": method.k, "index": index}
            user = user_template.render(variables).strip()
            requests.append(
                PromptRequest(
                    cell_id=cell["cell_id"],
                    cell_key=cell["cell_key"],
                    attributes=values,
                    prompt_index=index,
                    system=system_template.render(variables).strip() if system_template else None,
                    user=f"{user}\n{hint}" if hint else user,
                )
            )
    return requests


def generation_schema(spec: BuildSpec) -> dict[str, Any]:
    """The record schema without the prompt-conditioned fields: the pipeline sets those, the model does not."""
    schema = spec.record_schema
    conditioned = {a.record_field for a in spec.prompt_attributes}
    return {
        **schema,
        "properties": {k: v for k, v in schema["properties"].items() if k not in conditioned},
        "required": [f for f in schema.get("required", []) if f not in conditioned],
    }


def hint_lines(spec: BuildSpec, hints: dict[str, str]) -> str:
    """One line per steered attribute (rebalance.hint), e.g. "Its occupation must be: nurse."."""
    template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(spec.rebalance.hint)
    return "\n".join(template.render(name=name.replace("_", " "), value=value) for name, value in hints.items())


def response_schemas(spec: BuildSpec, method: Method) -> list[dict[str, Any]]:
    """The JSON Schema of the model's whole answer, per turn."""
    item_schema = generation_schema(spec)
    return [method.response_schema(item_schema, turn=t) for t in range(method.turns)]
