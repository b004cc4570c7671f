"""plan: exact quotas (largest remainder), joint cells, and the plan of a parsed spec."""

from __future__ import annotations

import json
import math
import random

import polars as pl
import pytest

from polyculture.preflight import parse_spec
from polyculture.spec import Attribute
from polyculture.stages.plan import cell_key, joint_targets, largest_remainder, plan


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (100, [0.5, 0.3, 0.2], [50, 30, 20]),
        (10, [1, 1, 1], [4, 3, 3]),  # a tie in the remainders goes to the earlier entry
        (7, [2, 0, 5], [2, 0, 5]),
        (0, [1, 2], [0, 0]),
        (1, [1, 1, 1, 1], [1, 0, 0, 0]),
    ],
)
def test_largest_remainder_examples(total, weights, expected):
    assert largest_remainder(total, weights) == expected


def test_largest_remainder_sums_exactly_and_is_proportional():
    rng = random.Random(7)
    for _ in range(200):
        weights = [rng.random() * rng.choice([1, 10, 1000]) for _ in range(rng.randint(1, 12))]
        total = rng.randint(0, 10_000)
        counts = largest_remainder(total, weights)
        assert sum(counts) == total
        exact = [total * w / sum(weights) for w in weights]
        # each count is its exact share rounded down or up: never off by a whole record
        assert all(math.floor(x) <= c <= math.floor(x) + 1 for c, x in zip(counts, exact, strict=True))


def test_largest_remainder_refuses_bad_input():
    with pytest.raises(ValueError, match="total"):
        largest_remainder(-1, [1.0])
    with pytest.raises(ValueError, match="weights"):
        largest_remainder(5, [0.0, 0.0])


def test_joint_targets():
    occupation = Attribute(name="occupation", values=["doctor", "teacher", "pilot"], weights=[0.5, 0.3, 0.2])
    continent = Attribute(name="continent", values=["Asia", "Europe"])
    targets = joint_targets([occupation, continent], 100)
    assert [(cell_key(v), n) for v, n in targets] == [
        ("occupation=doctor|continent=Asia", 25),
        ("occupation=doctor|continent=Europe", 25),
        ("occupation=teacher|continent=Asia", 15),
        ("occupation=teacher|continent=Europe", 15),
        ("occupation=pilot|continent=Asia", 10),
        ("occupation=pilot|continent=Europe", 10),
    ]
    odd = joint_targets([occupation, continent], 7)
    assert sum(n for _, n in odd) == 7
    assert joint_targets([], 42) == [({}, 42)]
    assert cell_key({}) == "all"


def _spec(tmp_path, **overrides):
    schema = {
        "type": "object",
        "properties": {
            "occupation": {"type": "string"},
            "continent": {"type": "string"},
            "tone": {"type": "string"},
            "bio": {"type": "string"},
        },
        "required": ["occupation", "continent", "bio"],
    }
    (tmp_path / "person.schema.json").write_text(json.dumps(schema))
    data = {
        "name": "people",
        "prompt": {"template": "Write {{ k }} short bios of a {{ occupation }} born in {{ continent }}."},
        "record": {"schema": "person.schema.json", "text_field": "bio"},
        "attributes": [
            {"name": "occupation", "values": ["doctor", "teacher", "pilot"], "weights": [0.5, 0.3, 0.2]},
            {"name": "continent", "values": ["Asia", "Europe"]},
            {"name": "tone", "values": ["dry", "warm"], "source": "field"},
        ],
        "target_size": 100,
        "method": {"name": "vs_standard", "k": 5},
        "sampling": {"n": 2},
        "generation": {"oversample": 1.5},
    } | overrides
    return parse_spec(data, base_dir=tmp_path)


def test_plan_on_a_parsed_spec(tmp_path):
    cells = plan(_spec(tmp_path))
    # cells span the prompt attributes only; the field attribute is measured later, by rebalance
    assert cells.columns == ["cell_id", "cell_key", "occupation", "continent", "quota", "n_prompts"]
    assert cells.schema["cell_id"] == pl.Int64 and cells.schema["quota"] == pl.Int64
    assert cells["cell_id"].to_list() == list(range(6))
    assert cells["quota"].to_list() == [25, 25, 15, 15, 10, 10]
    assert cells["quota"].sum() == 100
    # VS with k=5 and n=2: 10 records per prompt; oversample 1.5 -> ceil(ceil(quota * 1.5) / 10)
    assert cells["n_prompts"].to_list() == [4, 4, 3, 3, 2, 2]
    assert cells.row(0, named=True)["cell_key"] == "occupation=doctor|continent=Asia"


def test_plan_direct_method_and_no_prompt_attributes(tmp_path):
    spec = _spec(
        tmp_path,
        prompt={"template": "Write a short bio."},
        attributes=[{"name": "tone", "values": ["dry", "warm"], "source": "field"}],
        method={"name": "direct"},
        target_size=7,
    )
    cells = plan(spec)
    assert cells.to_dicts() == [{"cell_id": 0, "cell_key": "all", "quota": 7, "n_prompts": 6}]  # ceil(ceil(10.5)/2)


def test_joint_targets_keep_every_marginal_exact():
    # Rounding joint cells one by one drifts marginals (Europe 40 instead of 44 here); every marginal must be exact.
    rng = random.Random(3)
    for _ in range(150):
        attrs = []
        for i in range(rng.choice([2, 3])):
            values = [f"v{j}" for j in range(rng.randint(1, 6))]
            weights = [rng.choice([0, 0.5, 1, 2, 3, rng.random()]) for _ in values]
            attrs.append(Attribute(name=f"a{i}", values=values, weights=weights if sum(weights) > 0 else None))
        total = rng.randint(0, 400)
        targets = joint_targets(attrs, total)
        assert sum(count for _, count in targets) == total
        for attr in attrs:
            want = largest_remainder(total, list(attr.target_distribution().values()))
            got = [sum(c for values, c in targets if values[attr.name] == v) for v in attr.values]
            assert got == want


def test_joint_targets_demo_marginals():
    occupation = Attribute(name="occupation", values=[f"o{i}" for i in range(8)])
    continent = Attribute(name="continent", values=list("ABCDEF"), weights=[3, 3, 2, 1, 1, 1])
    targets = joint_targets([occupation, continent], 240)
    per_continent = [sum(c for v, c in targets if v["continent"] == x) for x in "ABCDEF"]
    assert per_continent == [65, 65, 44, 22, 22, 22]
    assert all(sum(c for v, c in targets if v["occupation"] == o) == 30 for o in occupation.values)
