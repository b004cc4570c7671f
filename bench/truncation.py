"""Why do answers run into max_tokens under vLLM's structured output, although the schema bounds every string and list?

Generates the first shards of two specs on the engine as a build does (biographies: the demo spec, VS-Standard k=5,
max_tokens 900; recipes: an array of ingredient strings, VS-Standard k=4, max_tokens 800) and, per completion cut by
max_tokens, reads what the cut answer holds: complete items, strings that reached their schema maxLength, lists that
reached maxItems, a looping tail (the last 240 characters compress below 0.25 of their size). It also prints the
schema's worst-case answer size in characters (every string and list at its maximum) and the characters per token the
model actually wrote, which give the token budget that the schema allows. Variant `bound` re-runs the same prompts
with max_tokens at that budget: if the grammar holds the limits, nothing is cut any more.

    .venv/bin/python bench/truncation.py --prompts 16 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

RECIPE_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 3, "maxLength": 80},
        "cuisine": {"type": "string", "minLength": 3, "maxLength": 30},
        "ingredients": {
            "type": "array", "minItems": 2, "maxItems": 12,
            "items": {"type": "string", "minLength": 2, "maxLength": 60},
        },
        "steps": {"type": "string", "minLength": 20, "maxLength": 300},
    },
    "required": ["title", "cuisine", "ingredients", "steps"],
    "additionalProperties": False,
}  # fmt: skip

RECIPES_SPEC = {
    "name": "recipes",
    "prompt": {
        "system": "You write recipes from home kitchens around the world.",
        "template": "Write a {{ course }} recipe from {{ region }}: a title, the cuisine, the ingredients and the steps.",
    },
    "record": {"schema": "recipe.schema.json", "text_field": "steps"},
    "attributes": [
        {"name": "course", "values": ["breakfast", "soup", "main course", "dessert"]},
        {"name": "region", "values": ["West Africa", "South Asia", "the Andes", "Scandinavia"]},
    ],
    "target_size": 64,
    "method": {"name": "vs_standard", "k": 4},
    "model": {"name": "smollm2-135m-instruct", "engine": "vllm"},
    "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 800, "n": 2},
    "seed": 7,
}


def max_chars(schema: dict[str, Any]) -> float:
    """Characters of the longest compact JSON value the schema admits (inf when a string or list is unbounded);
    escapes aside, which the model rarely writes."""
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return schema.get("maxLength", math.inf) + 2
    if kind == "integer" or kind == "number":
        bounds = [schema[k] for k in ("minimum", "maximum") if k in schema]
        return max(len(str(b)) for b in bounds) if len(bounds) == 2 else 20
    if kind == "boolean":
        return 5
    if kind == "array":
        return 2 + schema.get("maxItems", math.inf) * (max_chars(schema.get("items", {})) + 1)
    if kind == "object":
        fields = schema.get("properties", {})
        return 2 + sum(len(json.dumps(k)) + 1 + max_chars(v) + 1 for k, v in fields.items())
    return math.inf


def _strings(value: Any, schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(string, its schema) for every string inside a value, and ("<list>", schema) for each list."""
    if isinstance(value, str):
        return [(value, schema)]
    if isinstance(value, list):
        items = schema.get("items", {})
        return [("<list>", {**schema, "_len": len(value)})] + [s for v in value for s in _strings(v, items)]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return [s for k, v in value.items() for s in _strings(v, props.get(k, {}))]
    return []


def _open_at_cut(text: str) -> str:
    """What the answer was writing when max_tokens cut it: a string, a number (digits run on), or JSON between values."""
    if re.search(r"[-+0-9.eE]{10,}$", text):
        return "number"
    quotes = len(re.findall(r'(?<!\\)"', text))
    return "string" if quotes % 2 else "between values"


def _looping(text: str) -> bool:
    tail = text[-240:].encode()
    return len(tail) >= 200 and len(zlib.compress(tail, 9)) < 0.25 * len(tail) + 20


def analyse(frame, item_schema: dict[str, Any], k: int) -> dict[str, Any]:
    from polyculture.methods.base import cut_responses

    rows = frame.to_dicts()
    cut = [r for r in rows if r["finish_reason"] == "length"]
    per_token = [len(r["completion"]) / r["completion_tokens"] for r in rows if r["completion_tokens"]]
    capped_strings = strings = capped_lists = lists = 0
    items_before_cut = []
    for r in cut:
        items = [i for i in cut_responses(r["completion"]) if isinstance(i, dict)]
        items_before_cut.append(len(items))
        for item in items:
            for value, schema in _strings(item, item_schema):
                if value == "<list>":
                    lists += 1
                    capped_lists += schema["_len"] == schema.get("maxItems", -1)
                else:
                    strings += 1
                    capped_strings += len(value) == schema.get("maxLength", -1)
    return {
        "completions": len(rows),
        "cut_by_max_tokens": len(cut),
        "cut_rate": round(len(cut) / len(rows), 3) if rows else None,
        "median_chars_per_token": round(statistics.median(per_token), 2) if per_token else None,
        "min_chars_per_token": round(min(per_token), 2) if per_token else None,
        "cut_answers": {
            "complete_items_before_cut_median": statistics.median(items_before_cut) if items_before_cut else None,
            "items_asked": k,
            "strings_at_maxLength": f"{capped_strings}/{strings}",
            "lists_at_maxItems": f"{capped_lists}/{lists}",
            "looping_tail": sum(_looping(r["completion"]) for r in cut),
            "open_at_cut": dict(Counter(_open_at_cut(r["completion"]) for r in cut)),
            "tails": [r["completion"][-120:] for r in cut[:3]],
            "median_chars": statistics.median(len(r["completion"]) for r in cut) if cut else None,
        },
    }


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per spec (n=2 completions each)")
    parser.add_argument("--specs", default="biographies,recipes")
    parser.add_argument("--variants", default="as-is,bound", help="as-is: the spec's max_tokens; bound: the schema's")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import yaml

    from polyculture.engines.factory import create_engine
    from polyculture.methods import get_method
    from polyculture.preflight import load_spec
    from polyculture.stages.generate import plan_shards, run_shard
    from polyculture.stages.plan import plan
    from polyculture.stages.prompts import generation_schema

    folder = Path(tempfile.mkdtemp(prefix="truncation-"))
    (folder / "recipe.schema.json").write_text(json.dumps(RECIPE_SCHEMA))
    (folder / "recipes.yaml").write_text(yaml.safe_dump(RECIPES_SPEC))
    paths = {"biographies": Path("configs/biographies.yaml"), "recipes": folder / "recipes.yaml"}
    report: dict[str, Any] = {"prompts": args.prompts, "specs": {}}
    engine = None
    for name in args.specs.split(","):
        spec = load_spec(paths[name])
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"batch_size": args.prompts})})
        method = get_method(spec.method)
        item_schema = generation_schema(spec)
        answer_chars = 2 + len('"responses":[]') + method.k * (
            max_chars(item_schema) + len(',"probability":0.0000') + 1
        )
        shard = plan_shards(spec, plan(spec), method, folder / name)[0]
        if engine is None:
            started = time.perf_counter()
            engine = create_engine(spec.model, seed=spec.seed, base_dir=spec.base_dir)
            report["engine_load_s"] = round(time.perf_counter() - started, 1)
        entry: dict[str, Any] = {"k": method.k, "schema_max_answer_chars": answer_chars}
        chars_per_token = None
        for variant in args.variants.split(","):
            max_tokens = spec.sampling.max_tokens
            if variant == "bound":
                # the budget the schema allows at the lowest characters per token seen in the as-is run
                max_tokens = min(4096, math.ceil(answer_chars / (chars_per_token or 1.5)))
            run_spec = spec.model_copy(
                update={"sampling": spec.sampling.model_copy(update={"max_tokens": max_tokens})}
            )
            started = time.perf_counter()
            frame = run_shard(run_spec, shard, engine, method)
            result = analyse(frame, item_schema, method.k)
            result.update(max_tokens=max_tokens, seconds=round(time.perf_counter() - started, 1),
                          generated_tokens=int(frame["completion_tokens"].sum()))  # fmt: skip
            chars_per_token = chars_per_token or result["min_chars_per_token"]
            entry[variant] = result
            print(json.dumps({name: {variant: result}}), file=sys.stderr, flush=True)  # as it goes: runs are long
        report["specs"][name] = entry
    if engine is not None:
        engine.close()
    print(json.dumps(report, indent=2) if args.json else report)


if __name__ == "__main__":
    main()
