"""BuildSpec: the shipped configs load, bad specs are refused naming the field, the JSON Schema is in sync."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import PROJECT, small_spec_dict

from polyculture.preflight import load_spec, parse_spec
from polyculture.spec import SpecError, build_spec_json_schema


def test_shipped_configs_load():
    spec = load_spec(PROJECT / "configs" / "biographies.yaml")
    assert spec.name == "biographies"
    assert spec.record_schema["title"] == "Biography"
    assert [a.name for a in spec.prompt_attributes] == ["occupation", "continent"]
    assert spec.attributes[1].target_distribution()["Africa"] == pytest.approx(3 / 11)


def test_generated_schema_file_is_in_sync():
    on_disk = json.loads((PROJECT / "schemas" / "build-spec.schema.json").read_text())
    assert on_disk == build_spec_json_schema(), "run: polyculture schema -o schemas/build-spec.schema.json"


def test_shipped_config_validates_against_the_json_schema():
    import jsonschema

    data = yaml.safe_load((PROJECT / "configs" / "biographies.yaml").read_text())
    jsonschema.validate(data, build_spec_json_schema())


def test_fingerprint_is_stable_and_sensitive(spec_dir):
    a = parse_spec(small_spec_dict(), spec_dir)
    assert a.fingerprint() == parse_spec(small_spec_dict(), spec_dir).fingerprint()
    assert a.fingerprint() != parse_spec(small_spec_dict(seed=4), spec_dir).fingerprint()


def test_sequences_per_call_is_part_of_the_output_and_unset_keeps_older_fingerprints(spec_dir):
    plain = parse_spec(small_spec_dict(), spec_dir)
    joined = parse_spec(small_spec_dict(model={"sequences_per_call": 64}), spec_dir)
    # which shards share an engine call decides a seeded run's samples; unset hashes as before the field existed
    assert joined.fingerprint() != plain.fingerprint()
    assert "model.sequences_per_call" in _refused(spec_dir, small_spec_dict(model={"sequences_per_call": 0}))


def _refused(spec_dir, data) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, spec_dir)
    return str(info.value)


def test_unknown_key_refused(spec_dir):
    message = _refused(spec_dir, small_spec_dict(sampling={"temprature": 0.7}))
    assert "sampling.temprature: unknown key" in message


def test_top_level_unknown_key_refused(spec_dir):
    assert "colour: unknown key" in _refused(spec_dir, small_spec_dict(colour="red"))


def test_weights_not_matching_values_refused(spec_dir):
    attrs = [{"name": "occupation", "values": ["doctor", "farmer"], "weights": [1, 2, 3]}]
    message = _refused(spec_dir, small_spec_dict(attributes=attrs))
    assert "attributes.0" in message and "weights has 3 entries but values has 2" in message


def test_negative_weight_refused(spec_dir):
    attrs = [{"name": "occupation", "values": ["doctor", "farmer"], "weights": [1, -0.5]}]
    message = _refused(spec_dir, small_spec_dict(attributes=attrs))
    assert "attributes.0" in message and "weights must be finite and >= 0" in message


def test_all_zero_weights_refused(spec_dir):
    attrs = [{"name": "occupation", "values": ["doctor", "farmer"], "weights": [0, 0]}]
    assert "must not all be 0" in _refused(spec_dir, small_spec_dict(attributes=attrs))


def test_missing_schema_file_refused(spec_dir):
    message = _refused(spec_dir, small_spec_dict(record={"schema": "nope.schema.json"}))
    assert "record.schema" in message and "nope.schema.json" in message and "not found" in message


def test_invalid_schema_file_refused(spec_dir):
    (spec_dir / "bad.schema.json").write_text('{"type": "object", "properties": {"a": {"type": 12}}}')
    message = _refused(spec_dir, small_spec_dict(record={"schema": "bad.schema.json"}))
    assert "record.schema" in message and "not a valid JSON Schema" in message


def test_unknown_model_refused(spec_dir):
    message = _refused(spec_dir, small_spec_dict(model={"name": "gpt-17"}))
    assert "model" in message and "unknown model 'gpt-17'" in message and "smollm2-135m-instruct" in message


def test_unknown_engine_and_method_refused(spec_dir):
    message = _refused(spec_dir, small_spec_dict(model={"engine": "llamacpp"}))
    assert "model.engine" in message and "'vllm', 'transformers' or 'openai'" in message and "llamacpp" in message
    assert "method.name" in _refused(spec_dir, small_spec_dict(method={"name": "beam"}))


def test_attribute_field_must_exist_in_record_schema(spec_dir):
    attrs = [{"name": "continent", "values": ["Asia"], "source": "field"}]
    message = _refused(spec_dir, small_spec_dict(attributes=attrs, prompt={"template": "Write a bio."}))
    assert "attributes.continent" in message and "not in the record schema" in message


def test_undefined_template_variable_refused(spec_dir):
    message = _refused(spec_dir, small_spec_dict(prompt={"template": "A {{ occupaton }} from {{ k }} places"}))
    assert "prompt.template" in message and "occupaton" in message


def test_bad_template_syntax_refused(spec_dir):
    message = _refused(spec_dir, small_spec_dict(prompt={"template": "A {{ occupation "}))
    assert "prompt.template" in message and "Jinja2" in message


def test_bad_hub_repo_and_dataset_name_refused(spec_dir):
    assert "publish.hub.repo_id" in _refused(spec_dir, small_spec_dict(publish={"hub": {"repo_id": "not a repo"}}))
    assert "name" in _refused(spec_dir, small_spec_dict(name="../escape"))


def test_reserved_attribute_name_refused(spec_dir):
    attrs = [{"name": "model", "values": ["a"], "field": "occupation"}]
    message = _refused(spec_dir, small_spec_dict(attributes=attrs, prompt={"template": "x"}))
    assert "attributes" in message and "reserved" in message


def test_load_spec_reports_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "list.yaml")


def test_dedup_and_extract_settings_refused_naming_the_field(spec_dir):
    assert "no GPU HNSW index" in _refused(spec_dir, small_spec_dict(dedup={"index": "hnsw", "device": "gpu"}))
    assert "dedup.keep" in _refused(spec_dir, small_spec_dict(dedup={"keep": "random"}))
    extract = {"name": "setting", "values": ["city", "village"], "source": "extract"}
    bad_field = _refused(spec_dir, small_spec_dict(attributes=[{**extract, "extractor": {"from_field": "nope"}}]))
    assert "extractor.from_field: 'nope' is not in the record schema" in bad_field
    assert "must contain '{label}'" in _refused(
        spec_dir, small_spec_dict(attributes=[{**extract, "extractor": {"label_template": "x"}}])
    )
    assert "applies to source 'extract' only" in _refused(
        spec_dir, small_spec_dict(attributes=[{"name": "occupation", "values": ["a"], "extractor": {}}])
    )
    clash = _refused(spec_dir, small_spec_dict(attributes=[{"name": "bio", "values": ["a"], "source": "extract"}]))
    assert "use source: field" in clash


def test_vllm_parallel_settings_default_to_one_device(spec_dir):
    model = parse_spec(small_spec_dict(model={"engine": "vllm"}), spec_dir).model
    assert (model.tensor_parallel_size, model.pipeline_parallel_size, model.data_parallel_size) == (1, 1, 1)
    assert model.gpu_memory_utilization is None and model.engine_args == {}
    wide = {"engine": "vllm", "tensor_parallel_size": 4, "pipeline_parallel_size": 2, "data_parallel_size": 2,
            "gpu_memory_utilization": 1.0, "engine_args": {"enforce_eager": True, "max_num_seqs": 64}}  # fmt: skip
    model = parse_spec(small_spec_dict(model=wide), spec_dir).model
    assert (model.tensor_parallel_size, model.pipeline_parallel_size, model.data_parallel_size) == (4, 2, 2)
    assert model.engine_args == {"enforce_eager": True, "max_num_seqs": 64}


def test_parallel_settings_refused_for_other_engines_and_out_of_range(spec_dir):
    message = _refused(spec_dir, small_spec_dict(model={"engine": "transformers", "tensor_parallel_size": 2}))
    assert "model: tensor_parallel_size=2: for engine 'vllm' only, not 'transformers'" in message
    served = {"engine": "openai", "base_url": "http://127.0.0.1:8000/v1", "data_parallel_size": 2,
              "engine_args": {"enforce_eager": True}}  # fmt: skip
    message = _refused(spec_dir, small_spec_dict(model=served))
    assert "data_parallel_size=2, engine_args: for engine 'vllm' only, not 'openai'" in message
    assert "where it is started" in message
    assert "model.tensor_parallel_size" in _refused(spec_dir, small_spec_dict(model={"tensor_parallel_size": 0}))
    for bad in (0, 1.5):
        message = _refused(spec_dir, small_spec_dict(model={"engine": "vllm", "gpu_memory_utilization": bad}))
        assert "model.gpu_memory_utilization" in message


def test_engine_args_may_not_override_what_polyculture_sets(spec_dir):
    args = {"seed": 1, "structured_outputs_config": {}, "enable_lora": True, "enforce_eager": True}
    message = _refused(spec_dir, small_spec_dict(model={"engine": "vllm", "engine_args": args}))
    assert "model.engine_args" in message and "['seed', 'structured_outputs_config', 'enable_lora']" in message
    assert "seed: the build's seed" in message and "enable_lora: model.adapter" in message
    assert "not keyword argument names" in _refused(
        spec_dir, small_spec_dict(model={"engine": "vllm", "engine_args": {"max num seqs": 1}})
    )


def test_base_url_takes_one_server_or_a_list(spec_dir):
    one = {"engine": "openai", "base_url": "http://127.0.0.1:8000/v1"}
    model = parse_spec(small_spec_dict(model=one), spec_dir).model
    assert model.base_url == "http://127.0.0.1:8000/v1" and model.base_urls == ["http://127.0.0.1:8000/v1"]
    urls = ["http://10.0.0.1:8000/v1", "https://10.0.0.2:8000/v1"]
    model = parse_spec(small_spec_dict(model={**one, "base_url": urls}), spec_dir).model
    assert model.base_urls == urls
    repeated = _refused(spec_dir, small_spec_dict(model={**one, "base_url": [urls[0], urls[0] + "/"]}))
    assert "model.base_url: each server once; repeated: ['http://10.0.0.1:8000/v1']" in repeated
    not_http = _refused(spec_dir, small_spec_dict(model={**one, "base_url": [urls[0], "10.0.0.3:8000"]}))
    assert "model.base_url: '10.0.0.3:8000' is not an http(s) URL" in not_http
    assert "model.base_url: an empty list" in _refused(spec_dir, small_spec_dict(model={**one, "base_url": []}))


def test_json_schema_knows_the_server_list_and_parallel_fields():
    import jsonschema

    data = yaml.safe_load((PROJECT / "configs" / "biographies.yaml").read_text())
    schema = build_spec_json_schema()
    servers = {"name": "m", "engine": "openai", "base_url": ["http://a:8000/v1", "http://b:8000/v1"]}
    jsonschema.validate({**data, "model": servers}, schema)
    wide = {"engine": "vllm", "tensor_parallel_size": 2, "engine_args": {"enforce_eager": True}}
    jsonschema.validate({**data, "model": wide}, schema)
    for bad in ({**servers, "base_url": ["ftp://a"]}, {**servers, "base_url": []}, {"data_parallel_size": 0}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**data, "model": bad}, schema)


def test_a_spec_is_pure_configuration_and_preflight_reads_the_disk(spec_dir, tmp_path):
    from polyculture.preflight import preflight
    from polyculture.spec import BuildSpec

    data = small_spec_dict(record={"schema": "nowhere.json"}, model={"name": "gpt-17", "adapter": "nowhere"})
    spec = BuildSpec.model_validate(data)  # no file, no model registry: nothing to refuse here
    assert spec.record_schema == {} and spec.model.adapter == "nowhere"
    with pytest.raises(SpecError, match=r"model\.adapter: adapter folder 'nowhere' not found"):
        preflight(spec, spec_dir)
    checked = preflight(BuildSpec.model_validate(small_spec_dict()), spec_dir)
    assert checked.base_dir == spec_dir and checked.record_schema["properties"]["bio"]["type"] == "string"
    assert checked.fingerprint() == parse_spec(small_spec_dict(), spec_dir).fingerprint()


def test_every_problem_is_listed_at_once_in_field_order(spec_dir):
    data = small_spec_dict(model={"name": "gpt-17"}, sampling={"temperature": -1}, dedup={"embedding_model": "nope"})
    lines = _refused(spec_dir, {"colour": "red", **data}).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["model", "sampling.temperature", "dedup.embedding_model", "colour"]
    # checks across sections wait for valid fields, and the record schema's come before the prompt's
    both = _refused(spec_dir, small_spec_dict(record={"schema": "nope.json"}, prompt={"template": "{{ nope }}"}))
    assert "record.schema: file 'nope.json' not found" in both and "prompt.template" not in both


def test_quality_checks_refused_naming_the_field(spec_dir):
    fluency = {"name": "fluent", "kind": "fluency", "threshold": -6.0}
    assert "quality.0.kind" in _refused(spec_dir, small_spec_dict(quality=[{**fluency, "kind": "llm_judge"}]))
    assert "quality.0.kind: Unable to extract tag" in _refused(spec_dir, small_spec_dict(quality=[{"name": "x"}]))
    both = _refused(spec_dir, small_spec_dict(quality=[{**fluency, "quantile": 0.2}]))
    assert "quality.0: fluency takes exactly one of threshold" in both
    neither = _refused(spec_dir, small_spec_dict(quality=[{"name": "fluent", "kind": "fluency"}]))
    assert "exactly one of threshold" in neither
    for quantile in (0, 1, 1.5):
        out_of_range = {"name": "fluent", "kind": "fluency", "quantile": quantile}
        assert "quality.0.quantile" in _refused(spec_dir, small_spec_dict(quality=[out_of_range]))
    assert "quality.0.threshold" in _refused(spec_dir, small_spec_dict(quality=[{**fluency, "threshold": 2}]))
    assert "quality.0.name" in _refused(spec_dir, small_spec_dict(quality=[{**fluency, "name": "not a name"}]))
    assert "check names must be distinct; repeated: ['fluent']" in _refused(
        spec_dir, small_spec_dict(quality=[fluency, fluency])
    )
    assert "quality.0.tolerance" in _refused(
        spec_dir,
        small_spec_dict(quality=[{"name": "m", "kind": "expression", "expression_field": "bio",
                                  "value_field": "birth_year", "tolerance": -1}]),  # fmt: skip
    )


def test_judge_checks_refused_naming_the_field(spec_dir):
    judge = {"name": "readable", "kind": "judge", "rubric": "Is this readable English? {{ bio }}", "threshold": 3}
    assert parse_spec(small_spec_dict(quality=[judge]), spec_dir).quality[0].max_score == 5
    cases = {
        "quality.0.rubric: names no record field": {"rubric": "Is it good?"},
        "quality.0.rubric: is not a valid Jinja2 template": {"rubric": "{{ bio"},
        "quality.0: threshold 6 is outside [min_score, max_score] = [1, 5]": {"threshold": 6},
        "quality.0: min_score (5) must be below max_score (5)": {"min_score": 5},
        "quality.0.samples": {"samples": 0},
        "quality.0.threshold: Field required": {"threshold": None},
        "quality.0.model.engine": {"model": {"name": "smollm2-135m-instruct", "engine": "llama.cpp"}},
        # preflight: the rubric's names are record fields, the judge's own model loads here
        "quality.0.rubric: names ['biography'], not in the record schema's properties": {"rubric": "{{ biography }}"},
        "quality.0.model: ": {"model": {"name": "gpt-17", "engine": "transformers"}},
    }
    for expected, change in cases.items():
        check = {k: v for k, v in {**judge, **change}.items() if v is not None}
        assert expected in _refused(spec_dir, small_spec_dict(quality=[check])), expected


def test_quality_fields_and_functions_are_checked_against_the_disk(spec_dir):
    """Preflight: fields must be record fields, a python function must import (beside the spec or on the path)."""
    missing_field = _refused(spec_dir, small_spec_dict(quality=[{"name": "f", "kind": "fluency", "quantile": 0.2,
                                                                 "field": "biography"}]))  # fmt: skip
    assert "quality.0.field: 'biography' is not in the record schema's properties" in missing_field
    expression = {"name": "m", "kind": "expression", "expression_field": "formula", "value_field": "answer"}
    both = _refused(spec_dir, small_spec_dict(quality=[expression]))
    assert "quality.0.expression_field: 'formula' is not" in both and "quality.0.value_field: 'answer' is not" in both
    bad_path = _refused(spec_dir, small_spec_dict(quality=[{"name": "p", "kind": "python", "function": "checks.py"}]))
    assert "quality.0.function: must read 'package.module:function'" in bad_path
    python = {"name": "p", "kind": "python", "function": "no_such_module_for_quality:check"}
    assert "quality.0.function: module 'no_such_module_for_quality' not found" in _refused(
        spec_dir, small_spec_dict(quality=[python])
    )
    (spec_dir / "quality_checks_beside_spec.py").write_text("def check(record):\n    return True\nLIMIT = 3\n")
    beside = {"name": "p", "kind": "python", "function": "quality_checks_beside_spec:check"}
    assert parse_spec(small_spec_dict(quality=[beside]), spec_dir).quality[0].function_name == "check"
    absent = _refused(spec_dir, small_spec_dict(quality=[{**beside, "function": "quality_checks_beside_spec:nope"}]))
    assert "quality.0.function: module 'quality_checks_beside_spec' has no 'nope'" in absent
    not_callable = _refused(spec_dir, small_spec_dict(quality=[{**beside, "function": "quality_checks_beside_spec:LIMIT"}]))
    assert "quality.0.function: 'quality_checks_beside_spec:LIMIT' is a int, not a function" in not_callable
    # a score column may not shadow a record field, nor an attribute the _quality prefix
    (spec_dir / "shadow.schema.json").write_text(json.dumps(
        {"type": "object", "properties": {"bio": {"type": "string"}, "occupation": {"type": "string"},
                                          "_quality_fluent": {"type": "number"}}}))  # fmt: skip
    shadow = small_spec_dict(record={"schema": "shadow.schema.json"}, quality=[{"name": "fluent", "kind": "fluency",
                                                                                 "quantile": 0.2}])  # fmt: skip
    assert "quality.0.name: the score column '_quality_fluent' is also a record field" in _refused(spec_dir, shadow)


def test_fluency_needs_an_engine_that_scores_and_no_quality_keeps_the_fingerprint(spec_dir):
    from polyculture.spec import BuildSpec

    served = {"name": "served-model", "engine": "openai", "base_url": "http://127.0.0.1:9/v1"}
    data = small_spec_dict(model=served, quality=[{"name": "f", "kind": "fluency", "quantile": 0.2}])
    with pytest.raises(Exception, match=r"quality\.0\.kind: fluency scores log-probabilities"):
        BuildSpec.model_validate(data)
    # an empty section is left out of the hash, as before the section existed (runs started then still resume)
    plain = parse_spec(small_spec_dict(), spec_dir)
    assert plain.fingerprint() == parse_spec(small_spec_dict(quality=[]), spec_dir).fingerprint()
    with_check = parse_spec(small_spec_dict(quality=[{"name": "f", "kind": "fluency", "quantile": 0.2}]), spec_dir)
    assert with_check.fingerprint() != plain.fingerprint()


@pytest.mark.parametrize("path", sorted((PROJECT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_the_check(path):
    spec = load_spec(path)
    assert spec.name and spec.target_size > 0
