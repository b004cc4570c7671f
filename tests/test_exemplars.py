"""prompt.exemplars: examples from a source sampled into each prompt, seeded; refused when the source is also a
decontamination benchmark, missing, or lacks its column."""

from __future__ import annotations

import json

import pytest
from conftest import small_spec_dict

from polyculture.index.benchmarks import read_champ
from polyculture.methods import get_method
from polyculture.preflight import parse_spec
from polyculture.spec import SpecError
from polyculture.stages.plan import plan
from polyculture.stages.prompts import render_prompts

EXAMPLES = [f"Example problem number {i}: how many apples are left after {i} are eaten?" for i in range(12)]


def _source(spec_dir, name="seeds.jsonl", column="problem"):
    path = spec_dir / name
    path.write_text("".join(json.dumps({column: text, "other": 1}) + "\n" for text in EXAMPLES))
    return path


def _spec(spec_dir, exemplars, **overrides):
    return parse_spec(small_spec_dict(prompt={"exemplars": exemplars}, **overrides), spec_dir)


def test_each_prompt_gets_its_seeded_sample_appended_when_the_template_does_not_place_them(spec_dir):
    _source(spec_dir)
    spec = _spec(spec_dir, {"source": "seeds.jsonl", "field": "problem", "per_prompt": 3})
    requests = render_prompts(spec, plan(spec), get_method("direct"))
    assert len(requests) >= 2
    shown = []
    for request in requests:
        assert request.user.startswith("Write a short biography of a fictional ")
        lines = [line for line in request.user.splitlines() if line.startswith("Example ")]
        assert len(lines) == 3
        texts = [line.split(": ", 1)[1] for line in lines]
        assert set(texts) <= set(EXAMPLES) and len(set(texts)) == 3  # drawn without replacement
        shown.append(tuple(texts))
    assert len(set(shown)) > 1  # prompts differ in their examples
    # the same spec renders the same examples (resume re-renders the plan); another seed draws others
    again = render_prompts(_spec(spec_dir, {"source": "seeds.jsonl", "field": "problem", "per_prompt": 3}),
                           plan(spec), get_method("direct"))
    assert [r.user for r in again] == [r.user for r in requests]
    other = _spec(spec_dir, {"source": "seeds.jsonl", "field": "problem", "per_prompt": 3}, seed=4)
    assert [r.user for r in render_prompts(other, plan(other), get_method("direct"))] != [r.user for r in requests]


def test_a_template_places_the_examples_itself(spec_dir):
    _source(spec_dir)
    template = "Inspired by: {% for e in exemplars %}[{{ e }}]{% endfor %} write about a {{ occupation }}."
    spec = parse_spec(small_spec_dict(prompt={"template": template, "exemplars": {"source": "seeds.jsonl",
                                                                                 "field": "problem",
                                                                                 "per_prompt": 2}}), spec_dir)
    request = render_prompts(spec, plan(spec), get_method("direct"))[0]
    assert request.user.startswith("Inspired by: [Example problem number ")
    assert request.user.count("[") == 2 and "For inspiration only" not in request.user


def test_champ_as_a_source_draws_champ_problems(spec_dir):
    spec = _spec(spec_dir, {"source": "champ", "per_prompt": 1})
    request = render_prompts(spec, plan(spec), get_method("direct"))[0]
    shown = request.user.split("Example 1: ", 1)[1]
    assert shown in {t.strip() for t in read_champ().texts}


def test_the_template_variable_needs_the_setting(spec_dir):
    with pytest.raises(SpecError, match=r"prompt.template: uses undefined variables \['exemplars'\]"):
        parse_spec(small_spec_dict(prompt={"template": "{{ exemplars }} {{ occupation }}"}), spec_dir)


def test_a_source_that_is_also_a_benchmark_is_refused(spec_dir):
    _source(spec_dir)
    with pytest.raises(SpecError, match=r"prompt.exemplars.source: 'champ' is also a decontaminate benchmark"):
        _spec(spec_dir, {"source": "champ"}, decontaminate={"benchmarks": ["champ"]})
    # the same file spelt two ways: caught where the paths are resolved
    benchmark = {"benchmarks": [{"path": str(spec_dir / "seeds.jsonl"), "text_column": "problem", "name": "mine"}]}
    with pytest.raises(SpecError, match=r"prompt.exemplars.source: .*also the decontaminate benchmark 'mine'"):
        _spec(spec_dir, {"source": "seeds.jsonl", "field": "problem"}, decontaminate=benchmark)
    # another file is fine
    _source(spec_dir, "other.jsonl")
    benchmark = {"benchmarks": [{"path": "other.jsonl", "text_column": "problem"}]}
    assert _spec(spec_dir, {"source": "seeds.jsonl", "field": "problem"}, decontaminate=benchmark).prompt.exemplars


def test_a_missing_source_or_column_is_refused_naming_the_field(spec_dir):
    with pytest.raises(SpecError, match=r"prompt.exemplars.source: 'nowhere.jsonl' not found"):
        _spec(spec_dir, {"source": "nowhere.jsonl"})
    _source(spec_dir)
    with pytest.raises(SpecError, match=r"prompt.exemplars.field: .* has no column 'text'"):
        _spec(spec_dir, {"source": "seeds.jsonl"})
    with pytest.raises(SpecError, match=r"prompt.exemplars.per_prompt"):
        _spec(spec_dir, {"source": "seeds.jsonl", "field": "problem", "per_prompt": 0})
