"""generate + validate on the real transformers engine, and validate's reject reasons on hand-made completions."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import small_spec_dict

from polyculture.engines.factory import create_engine
from polyculture.methods import get_method
from polyculture.preflight import parse_spec
from polyculture.stages.generate import generate, plan_calls, plan_shards
from polyculture.stages.plan import plan
from polyculture.stages.prompts import generation_schema, render_prompts
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


@pytest.fixture(scope="module")
def engine():
    """One real transformers engine for the module's generation tests.

    One torch thread while it runs: on the shared 2-core machines, two threads competing with other processes made
    a 60-token call take 15-200 s instead of ~6 s (thread oversubscription); the setting is restored afterwards.
    """
    import torch

    from polyculture.spec import ModelSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = create_engine(ModelSpec(name="smollm2-135m-instruct", engine="transformers"), seed=3)
    yield engine
    engine.close()
    torch.set_num_threads(threads)


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
    result = validate(_completions(spec, "direct", texts), spec, get_method("direct"))
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
    result = validate(frame, spec, get_method(spec.method))
    assert result.records["verbalized_probability"].to_list() == [0.7]
    assert result.records["record_id"].to_list() == ["c0-p0-s0-0"]
    reasons = sorted(result.rejects["reason"].to_list())
    assert reasons == ["schema_violation", "truncated"]  # "B" is shorter than minLength 2


def test_generate_writes_shards_and_resumes(spec_dir, tmp_path, engine):
    spec = parse_spec(small_spec_dict(sampling={"max_tokens": 60, "n": 2}, model={"batch_size": 1}), spec_dir)
    cells = plan(spec)
    method = get_method("direct")
    seen = []
    completions = generate(spec, cells, engine, method, tmp_path / "shards", on_batch=lambda d, t: seen.append((d, t)))
    prompts = int(cells["n_prompts"].sum())
    assert completions.height == prompts * 2
    assert seen[-1] == (prompts, prompts) and len(seen) == prompts
    assert len(list((tmp_path / "shards").glob("shard-*.parquet"))) == prompts
    assert completions["completion_tokens"].min() > 0 and completions["engine"].unique().to_list() == ["transformers"]
    result = validate(completions, spec, method)
    assert result.records.height + result.rejects.height >= completions.height
    assert result.records.height > 0  # constrained decoding makes most of these parse

    class Refusing:
        name = "refusing"

        def generate(self, *args, **kwargs):
            raise AssertionError("a finished shard was generated again")

    again = generate(spec, cells, Refusing(), method, tmp_path / "shards")  # type: ignore[arg-type]
    assert again.equals(completions)


def test_shards_joined_into_engine_calls_resume_to_the_completions_of_an_uninterrupted_run(spec_dir, tmp_path, engine):
    # One prompt per shard, 3 prompts (6 sequences) per engine call: the call is the unit of sampling, the shard of resume.
    spec = parse_spec(
        small_spec_dict(sampling={"max_tokens": 40, "n": 2}, model={"batch_size": 1, "sequences_per_call": 6}),
        spec_dir,
    )
    cells, method = plan(spec), get_method("direct")
    shards = plan_shards(spec, cells, method, tmp_path / "a")
    calls = plan_calls(spec, shards)
    assert len(shards) >= 4, "needs a second call"
    assert [[s.index for s in call] for call in calls] == [list(range(i, min(i + 3, len(shards))))
                                                          for i in range(0, len(shards), 3)]  # fmt: skip
    recording = _Recording(engine)
    straight = generate(spec, cells, recording, method, tmp_path / "a")  # type: ignore[arg-type]
    assert [len(conversations) for conversations, _, _ in recording.calls] == [len(c) for c in calls]
    # each call samples from its first shard's seed; the shards' rows come back split, each in its own file
    assert [p.seed for _, p, _ in recording.calls] == [call[0].seeds[0] for call in calls]
    assert sorted(straight["shard"].unique().to_list()) == [s.index for s in shards]

    # A crash after the first call's shard 0 was written and before shards 1 and 2 were: resume runs that whole call
    # again (and nothing else), writes the missing shards, leaves shard 0 alone, and ends with the same completions.
    folder = tmp_path / "a"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    for index in (1, 2):
        (folder / f"shard-{index:05d}.parquet").unlink()
    recording.calls.clear()
    resumed = generate(spec, cells, recording, method, folder)  # type: ignore[arg-type]
    assert [len(conversations) for conversations, _, _ in recording.calls] == [3]
    assert resumed.drop("batch_seconds").equals(straight.drop("batch_seconds"))  # all but the timing
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.parquet")}
    assert {name: after[name] for name in kept if name not in ("shard-00001.parquet", "shard-00002.parquet")} == {
        name: mtime for name, mtime in kept.items() if name not in ("shard-00001.parquet", "shard-00002.parquet")
    }


# --- selection and turns in validate (hand-made completions) --------------------------------------------------------


def _vs_answer(*probabilities, name="Ada Obi"):
    item = {"name": name, "birth_year": 1950, "bio": "A doctor who ran a clinic for forty years."}
    responses = [item | {"name": f"{name} {i}", "probability": p} for i, p in enumerate(probabilities)]
    return json.dumps({"responses": responses})


def test_validate_selection_sample_keeps_one_per_answer_and_counts_the_rest(spec_dir):
    spec = parse_spec(small_spec_dict(method={"name": "vs_standard", "k": 3, "selection": "sample"}), spec_dir)
    method = get_method(spec.method)
    frame = _completions(spec, "vs_standard", [_vs_answer(0.5, 0.3, 0.2), _vs_answer(0.9, 0.05, 0.05)])
    result = validate(frame, spec, method)
    assert result.records.height == 2 and result.records["call_id"].to_list() == ["c0-p0-s0", "c0-p1-s0"]
    dropped = result.rejects.filter(pl.col("stage") == "select")
    assert dropped.height == 4 and set(dropped["reason"]) == {"not_sampled"}
    # every candidate is accounted for: kept or rejected with its record id
    assert sorted(result.records["record_id"].to_list() + dropped["record_id"].to_list()) == [
        f"c0-p{p}-s0-{i}" for p in range(2) for i in range(3)
    ]
    assert validate(frame, spec, method).records.equals(result.records)  # seeded: the same draw every time
    even = _completions(spec, "vs_standard", [_vs_answer(0.34, 0.33, 0.33)] * 8)
    reseeded = parse_spec(small_spec_dict(method=spec.method.model_dump(), seed=11), spec_dir)
    draws = {tuple(validate(even, s, method).records["record_id"]) for s in (spec, reseeded)}
    assert len(draws) == 2  # the spec seed decides the draws


def test_validate_selection_threshold_and_schema_failures_first(spec_dir):
    method_spec = {"name": "vs_standard", "k": 3, "selection": "threshold", "selection_threshold": 0.3, "min_keep": 1}
    spec = parse_spec(small_spec_dict(method=method_spec), spec_dir)
    bad_item = {"name": "X", "birth_year": 1950, "bio": "too short name", "probability": 0.9}  # minLength 2 fails
    answer = json.loads(_vs_answer(0.5, 0.2))
    answer["responses"].append(bad_item)
    texts = [json.dumps(answer), _vs_answer(0.1, 0.05)]
    result = validate(_completions(spec, "vs_standard", texts), spec, get_method(spec.method))
    assert result.records["record_id"].to_list() == ["c0-p0-s0-0", "c0-p1-s0-0"]  # min_keep keeps the most probable
    assert result.records["verbalized_probability"].to_list() == [0.5, 0.1]
    by_id = {r["record_id"]: (r["stage"], r["reason"]) for r in result.rejects.iter_rows(named=True)}
    assert by_id == {
        "c0-p0-s0-1": ("select", "below_threshold"),
        "c0-p0-s0-2": ("schema", "schema_violation"),  # never selected: only valid records compete
        "c0-p1-s0-1": ("select", "below_threshold"),
    }


def test_validate_percentage_and_turns(spec_dir):
    method_spec = {"name": "vs_multi", "k": 2, "turns": 2, "probability_definition": "percentage"}
    spec = parse_spec(small_spec_dict(method=method_spec), spec_dir)
    frame = _completions(spec, "vs_multi", [_vs_answer(60), _vs_answer(30, name="Bo Li")])
    frame = frame.with_columns(
        pl.Series("call_id", ["c0-p0-s0-t0", "c0-p0-s0-t1"]), pl.Series("turn", [0, 1], dtype=pl.Int64)
    )
    result = validate(frame, spec, get_method(spec.method))
    assert result.records["turn"].to_list() == [0, 1]
    assert result.records["verbalized_probability"].to_list() == [0.6, 0.3]
    assert result.records["record_id"].to_list() == ["c0-p0-s0-t0-0", "c0-p0-s0-t1-0"]
    # frames without a turn column (single-turn methods before it existed) read as turn 0
    assert validate(frame.drop("turn"), spec, get_method(spec.method)).records["turn"].to_list() == [0, 0]


# --- multi-turn generation on the real engine ----------------------------------------------------------------------

FRUIT_SCHEMA = {
    "type": "object",
    "properties": {"fruit": {"type": "string", "minLength": 1, "maxLength": 20}},
    "required": ["fruit"],
    "additionalProperties": False,
}


def _fruit_spec(tmp_path, method, **overrides):
    (tmp_path / "fruit.schema.json").write_text(json.dumps(FRUIT_SCHEMA))
    spec = {
        "name": "fruits",
        "prompt": {"template": "Name a fruit."},
        "record": {"schema": "fruit.schema.json", "text_field": "fruit"},
        "target_size": 2,
        "method": method,
        "model": {"name": "smollm2-135m-instruct", "engine": "transformers", "batch_size": 1},
        "sampling": {"temperature": 1.0, "max_tokens": 40, "n": 2},
        "generation": {"oversample": 1.0},
        "seed": 5,
    } | overrides
    return parse_spec(spec, tmp_path)


class _Recording:
    """The real engine, keeping every conversation and parameter set it was sent."""

    def __init__(self, engine):
        self.engine, self.name, self.calls = engine, engine.name, []

    def generate(self, conversations, params, json_schema=None):
        self.calls.append((conversations, params, json_schema))
        return self.engine.generate(conversations, params, json_schema=json_schema)


class _Refusing:
    name = "refusing"

    def generate(self, *args, **kwargs):
        raise AssertionError("a finished shard was generated again")


def _check_threads(completions, turns, method):
    """Each thread's rows: turns 0..turns-1, and every later turn's prompt holds the previous answer."""
    for _, thread in completions.sort("turn").group_by(["cell_id", "prompt_index", "sample_index"]):
        assert thread["turn"].to_list() == list(range(turns))
        base = thread["call_id"][0].removesuffix("-t0")
        assert thread["call_id"].to_list() == [f"{base}-t{t}" for t in range(turns)]
        previous = None
        for row in thread.iter_rows(named=True):
            messages = json.loads(row["messages"])
            if row["turn"] == 0:
                assert messages == method.conversation(row["user"], row["system"])
            else:
                assert messages[:-2] == previous["messages"]  # the whole history so far
                assert messages[-2] == {"role": "assistant", "content": previous["completion"]}
                assert messages[-1] == {"role": "user", "content": method.follow_up(row["turn"])}
                assert row["prompt_tokens"] > previous["prompt_tokens"]
            previous = row | {"messages": messages}


def test_multi_turn_generate_threads_shards_resume_and_validate(tmp_path, engine):
    spec = _fruit_spec(tmp_path, {"name": "multi_turn", "k": 2}, target_size=8)  # 2 items per sample x n=2: two prompts
    cells, method = plan(spec), get_method(spec.method)
    engine = _Recording(engine)
    completions = generate(spec, cells, engine, method, tmp_path / "shards")  # type: ignore[arg-type]
    prompts = int(cells["n_prompts"].sum())
    assert prompts == 2 and len(list((tmp_path / "shards").glob("shard-*.parquet"))) == prompts  # one shard per batch
    assert completions.height == prompts * spec.sampling.n * 2
    assert completions.schema["turn"] == pl.Int64 and completions["call_id"].n_unique() == completions.height
    # per batch: turn 0 samples n per prompt; turn 1 continues each sample as its own thread with n=1
    assert [(len(c), p.n) for c, p, _ in engine.calls] == [(1, 2), (2, 1)] * prompts
    sent_turn1 = [json.loads(r) for r in completions.filter(pl.col("turn") == 1)["messages"]]
    assert [c for conversations, p, _ in engine.calls if p.n == 1 for c in conversations] == sent_turn1
    _check_threads(completions, 2, method)

    again = generate(spec, cells, _Refusing(), method, tmp_path / "shards")  # type: ignore[arg-type]
    assert again.equals(completions)

    result = validate(completions, spec, method)
    per_turn = dict(result.records.group_by("turn").len().iter_rows())
    assert set(per_turn) <= {0, 1} and per_turn.get(1, 0) > 0  # the alternatives validate as records of their own
    assert result.records.height + result.rejects.height == completions.height  # one record per completion
    for record in result.records.iter_rows(named=True):
        assert record["call_id"].endswith(f"-t{record['turn']}") and record["method"] == "multi_turn"
        assert record["verbalized_probability"] is None


def test_vs_multi_generate_asks_each_turn_for_its_share(tmp_path, engine):
    sampling = {"temperature": 1.0, "max_tokens": 48, "n": 2}
    spec = _fruit_spec(tmp_path, {"name": "vs_multi", "k": 2, "turns": 2}, sampling=sampling)
    cells, method = plan(spec), get_method(spec.method)
    engine = _Recording(engine)
    completions = generate(spec, cells, engine, method, tmp_path / "shards")  # type: ignore[arg-type]
    assert completions.height == 4 and sorted(completions["turn"].to_list()) == [0, 0, 1, 1]
    # each turn is constrained to its own share of k (here one response per turn)
    schemas = [schema for _, _, schema in engine.calls]
    assert schemas == [method.response_schema(generation_schema(spec), turn=t) for t in (0, 1)]
    assert [s["properties"]["responses"]["maxItems"] for s in schemas] == [1, 1]
    _check_threads(completions, 2, method)
    follow_up = json.loads(completions.filter(pl.col("turn") == 1)["messages"][0])[-1]["content"]
    assert "1 more possible response" in follow_up

    result = validate(completions, spec, method)
    assert result.records.height > 0
    assert result.records["verbalized_probability"].is_not_null().all()
    counted = result.records.height + result.rejects.filter(pl.col("record_id").is_not_null()).height
    parsed = completions.height - result.rejects.filter(pl.col("record_id").is_null()).height
    assert counted == parsed  # one response per answer: each parsed answer is one record or one counted reject


def test_resume_reads_shards_written_before_turns(spec_dir, tmp_path):
    spec = parse_spec(small_spec_dict(model={"batch_size": 64}, sampling={"n": 1}), spec_dir)
    method = get_method("direct")
    cells = plan(spec).head(1).with_columns(pl.lit(1, dtype=pl.Int64).alias("n_prompts"))  # one prompt: c0-p0-s0
    old = _completions(spec, "direct", ['{"name": "Ada"}']).with_columns(
        pl.lit(0, dtype=pl.Int64).alias("shard"), pl.lit(1.5).alias("batch_seconds")
    )
    (tmp_path / "shards").mkdir()
    old.write_parquet(tmp_path / "shards" / "shard-00000.parquet")  # no checksum, no turn, no messages
    frame = generate(spec, cells, _Refusing(), method, tmp_path / "shards")  # type: ignore[arg-type]
    assert frame["turn"].to_list() == [0] and frame.schema["turn"] == pl.Int64
    assert json.loads(frame["messages"][0]) == [{"role": "user", "content": "u"}]
    assert frame["completion"].to_list() == ['{"name": "Ada"}']
