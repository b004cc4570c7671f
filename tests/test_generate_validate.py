"""generate + validate on the real transformers engine, and validate's reject reasons on hand-made completions."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import small_spec_dict

from polyculture.engines.base import create_engine
from polyculture.methods import get_method
from polyculture.spec import parse_spec
from polyculture.stages.generate import generation_schema, generate, render_prompts
from polyculture.stages.plan import plan
from polyculture.stages.validate import validate


def _completions(spec, method, texts, finish="stop"):
    rows = [
        {"call_id": f"c0-p{i}-s0", "cell_id": 0, "cell_key": "occupation=doctor", "occupation": "doctor",
         "prompt_index": i, "sample_index": 0, "system": None, "user": "u", "completion": text,
         "prompt_tokens": 5, "completion_tokens": 9, "finish_reason": finish, "method": method,
         "model": "m", "engine": "e"}
        for i, text in enumerate(texts)
    ]  # fmt: skip
    return pl.DataFrame(rows, schema_overrides={"system": pl.String})


def test_render_prompts_and_generation_schema(spec_dir):
    spec = parse_spec(small_spec_dict(), spec_dir)
    requests = render_prompts(spec, plan(spec), get_method("direct"))
    assert [r.user for r in requests][:1] == ["Write a short biography of a fictional doctor."]
    assert {r.attributes["occupation"] for r in requests} == {"doctor", "farmer"}
    schema = generation_schema(spec)
    # the conditioned attribute is the pipeline's to set: the model is not asked for it
    assert "occupation" not in schema["properties"] and "occupation" not in schema["required"]
    assert spec.record_schema["properties"]["occupation"]  # the record schema itself is untouched


def test_validate_sets_conditioned_fields_and_counts_rejects(spec_dir):
    spec = parse_spec(small_spec_dict(), spec_dir)
    good = {"name": "Ada Obi", "birth_year": 1950, "bio": "A doctor who ran a clinic for forty years."}
    texts = [
        json.dumps(good | {"occupation": "pilot"}),  # the model's occupation is overridden by the cell's
        json.dumps(good | {"birth_year": 1850}),  # outside the schema's bounds
        '{"name": "Ada", "birth_year": 19',  # truncated JSON
        "I cannot do that.",
    ]
    result = validate(spec, _completions(spec, "direct", texts), get_method("direct"))
    assert result.records.height == 1
    record = json.loads(result.records["record_json"][0])
    assert record["occupation"] == "doctor" and result.records["occupation"][0] == "doctor"
    assert list(record) == ["name", "birth_year", "occupation", "bio"]  # schema property order
    assert result.records["text"][0] == good["bio"]
    reasons = dict(result.rejects.group_by("reason").len().iter_rows())
    assert reasons == {"schema_violation": 1, "unparseable": 2}
    assert "birth_year" in result.rejects.filter(pl.col("reason") == "schema_violation")["detail"][0]


def test_validate_vs_items_and_truncation(spec_dir):
    spec = parse_spec(small_spec_dict(method={"name": "vs_standard", "k": 2}), spec_dir)
    item = {"name": "Ada Obi", "birth_year": 1950, "bio": "A doctor who ran a clinic for forty years."}
    texts = [
        json.dumps({"responses": [item | {"probability": 0.7}, item | {"name": "B", "probability": 0.3}]}),
        '{"responses": [{"name": "Ada"',
    ]
    frame = _completions(spec, "vs_standard", texts)
    frame = frame.with_columns(pl.Series("finish_reason", ["stop", "length"]))
    result = validate(spec, frame, get_method(spec.method))
    assert result.records["verbalized_probability"].to_list() == [0.7]
    assert result.records["record_id"].to_list() == ["c0-p0-s0-0"]
    reasons = sorted(result.rejects["reason"].to_list())
    assert reasons == ["schema_violation", "truncated"]  # "B" is shorter than minLength 2


def test_generate_writes_shards_and_resumes(spec_dir, tmp_path):
    spec = parse_spec(small_spec_dict(sampling={"max_tokens": 60, "n": 2}, model={"batch_size": 1}), spec_dir)
    cells = plan(spec)
    engine = create_engine(spec.model, seed=spec.seed)
    method = get_method("direct")
    seen = []
    completions = generate(spec, cells, engine, method, tmp_path / "shards", on_batch=lambda d, t: seen.append((d, t)))
    prompts = int(cells["n_prompts"].sum())
    assert completions.height == prompts * 2
    assert seen[-1] == (prompts, prompts) and len(seen) == prompts
    assert len(list((tmp_path / "shards").glob("shard-*.parquet"))) == prompts
    assert completions["completion_tokens"].min() > 0 and completions["engine"].unique().to_list() == ["transformers"]
    result = validate(spec, completions, method)
    assert result.records.height + result.rejects.height >= completions.height
    assert result.records.height > 0  # constrained decoding makes most of these parse

    class Refusing:
        name = "refusing"

        def generate(self, *args, **kwargs):
            raise AssertionError("a finished shard was generated again")

    again = generate(spec, cells, Refusing(), method, tmp_path / "shards")  # type: ignore[arg-type]
    assert again.equals(completions)
