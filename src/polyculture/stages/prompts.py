"""prompts: what is asked of the model. The plan's cells rendered into chat prompts (Jinja2, strict), the hint lines
a top-up cell adds for attributes the pipeline cannot set, and the JSON Schema the answer is constrained to.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import polars as pl

from polyculture.index.benchmarks import CHAMP, read_champ
from polyculture.index.sources import SourceError, read_texts
from polyculture.index.text import names_seed
from polyculture.methods.base import Method
from polyculture.spec import BuildSpec
from polyculture.spec.build import EXEMPLARS_VARIABLE, template_variables

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
    pool = exemplar_texts(spec)
    appended = pool is not None and EXEMPLARS_VARIABLE not in template_variables(spec.prompt)
    requests = []
    for cell in cells.iter_rows(named=True):
        values = {name: cell[name] for name in names}
        # Top-up cells of field/extract attributes steer the model with a hint line per attribute.
        hints = json.loads(cell.get(HINTS_COLUMN) or "{}")
        hint = hint_lines(spec, hints) if hints else ""
        for index in range(cell["n_prompts"]):
            variables: dict[str, Any] = {**values, "k": method.k, "index": index}
            if pool is not None:
                variables[EXEMPLARS_VARIABLE] = sample_exemplars(spec, pool, cell["cell_key"], index)
            user = user_template.render(variables).strip()
            if appended:
                user = f"{user}\n{exemplar_block(variables[EXEMPLARS_VARIABLE])}"
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


def exemplar_texts(spec: BuildSpec) -> list[str] | None:
    """prompt.exemplars' source texts (distinct, in file order), or None when the spec has none."""
    exemplars = spec.prompt.exemplars
    if exemplars is None:
        return None
    if exemplars.source == CHAMP:
        texts = list(read_champ().texts)
    else:
        located = spec.located_files.get("prompt.exemplars.source")
        _, texts = read_texts(Path(str(located or exemplars.source)), exemplars.field)
    distinct = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if not distinct:
        raise SourceError(f"prompt.exemplars.source: '{exemplars.source}' holds no text in '{exemplars.field}'")
    return distinct


def sample_exemplars(spec: BuildSpec, pool: list[str], cell_key: str, prompt_index: int) -> list[str]:
    """The examples of one prompt: drawn without replacement, seeded by the run's seed, the cell and the prompt's
    index, so a re-rendered plan (resume) shows each prompt the same examples."""
    assert spec.prompt.exemplars is not None
    rng = random.Random(names_seed(str(spec.seed), EXEMPLARS_VARIABLE, cell_key, str(prompt_index)))
    return rng.sample(pool, min(spec.prompt.exemplars.per_prompt, len(pool)))


def exemplar_block(examples: list[str]) -> str:
    """What a template that does not place the examples itself gets appended to its user message."""
    lines = "\n".join(f"Example {i}: {text}" for i, text in enumerate(examples, 1))
    return f"For inspiration only (write something new, not a copy or a rewording):\n{lines}"


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
