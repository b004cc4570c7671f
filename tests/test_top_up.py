"""top_up: sizing a top-up round from observed yields and the token budget, hints for field attributes, and the
story told for a cell left short."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import small_spec_dict

from polyculture.methods import get_method
from polyculture.preflight import parse_spec
from polyculture.stages.plan import plan
from polyculture.stages.prompts import render_prompts
from polyculture.stages.top_up import RoundStats, explain_shortfalls, prompts_by_cell, top_up_cells


def _spec(spec_dir, **overrides):
    attributes = [
        {"name": "occupation", "values": ["doctor", "farmer"]},
        {"name": "birth_year", "values": ["1950", "1990"], "source": "field"},
    ]
    return parse_spec(small_spec_dict(attributes=attributes, target_size=8, **overrides), spec_dir)


def test_top_up_sizes_cells_by_their_yield_and_hints_field_attributes(spec_dir):
    spec = _spec(spec_dir, rebalance={"top_up_oversample": 2.0})
    shortfalls = [({"occupation": "doctor", "birth_year": "1950"}, 2), ({"occupation": "farmer", "birth_year": "1990"}, 1)]
    stats = RoundStats(
        prompts_by_cell={"occupation=doctor|birth_year=1950": 4, "occupation=farmer|birth_year=1990": 4},
        records_by_cell={"occupation=doctor|birth_year=1950": 2, "occupation=farmer|birth_year=1990": 0},
        prompts=8,
        generated_tokens=800,
    )
    cells = top_up_cells(spec, shortfalls, stats, first_cell_id=10, token_budget_left=None)
    assert cells.columns == ["cell_id", "cell_key", "occupation", "quota", "n_prompts", "hints"]
    assert cells["cell_id"].to_list() == [10, 11]
    # doctor/1950: yield 2/4 = 0.5 -> 2 missing * 2.0 / 0.5 = 8 prompts.
    # farmer/1990: nothing landed yet -> yield floored at a quarter of the overall (2/8 * 0.25) -> 1 * 2 / 0.0625 = 32
    assert cells["n_prompts"].to_list() == [8, 32]
    assert [json.loads(h) for h in cells["hints"]] == [{"birth_year": "1950"}, {"birth_year": "1990"}]

    # the prompt carries the pipeline-set occupation and a hint for the field attribute
    requests = render_prompts(spec, cells, get_method(spec.method))
    assert requests[0].user == "Write a short biography of a fictional doctor.\nIts birth year must be: 1950."
    assert requests[0].cell_id == 10 and requests[-1].cell_id == 11

    # a budget of 2,000 tokens at 100 tokens per prompt pays for 20 prompts, split alike
    budgeted = top_up_cells(spec, shortfalls, stats, first_cell_id=10, token_budget_left=2_000)
    assert budgeted["n_prompts"].sum() == 20
    assert budgeted["n_prompts"].to_list() == [4, 16]
    assert top_up_cells(spec, shortfalls, stats, first_cell_id=10, token_budget_left=50).height == 0


def test_prompts_by_cell_counts_first_round_prompts_for_every_joint_cell(spec_dir):
    spec = _spec(spec_dir)
    first = plan(spec)
    cells = pl.DataFrame(
        {
            "cell_key": [f"occupation={o}|birth_year={y}" for o in ("doctor", "farmer") for y in ("1950", "1990")],
            "occupation": ["doctor", "doctor", "farmer", "farmer"],
            "birth_year": ["1950", "1990", "1950", "1990"],
        }
    )
    top_up = top_up_cells(
        spec, [({"occupation": "doctor", "birth_year": "1990"}, 1)],
        RoundStats(prompts_by_cell={}, records_by_cell={}, prompts=0, generated_tokens=0),
        first_cell_id=2, token_budget_left=None,
    )  # fmt: skip
    counts = prompts_by_cell(spec, [first, top_up], cells)
    per_occupation = dict(zip(first["occupation"], first["n_prompts"], strict=True))
    assert counts["occupation=doctor|birth_year=1950"] == per_occupation["doctor"]
    assert counts["occupation=doctor|birth_year=1990"] == per_occupation["doctor"] + top_up["n_prompts"][0]
    assert counts["occupation=farmer|birth_year=1990"] == per_occupation["farmer"]


def test_explain_shortfalls_tells_the_whole_story():
    cells = pl.DataFrame(
        {
            "cell_key": ["a=x", "a=y"],
            "target": [5, 5],
            "available": [5, 2],
            "kept": [5, 2],
            "deficit": [0, 3],
            "reason": [None, "only 2 valid unique records for this cell (target 5)"],
        }
    )
    out = explain_shortfalls(cells, {"a=y": 12}, rounds=4, stop_reason="stopped: all 3 top-up rounds used")
    assert out["reason"].to_list() == [
        None,
        "short by 3: 12 prompts over 4 round(s) left 2 valid unique records in this cell (target 5); "
        "stopped: all 3 top-up rounds used",
    ]


@pytest.mark.parametrize(
    ("rebalance", "message"),
    [
        ({"targets": "table"}, "targets 'table' needs table"),
        ({"table": [{"cell": {"occupation": "doctor", "birth_year": "1950"}, "weight": 1}]}, "applies to targets 'table'"),
        ({"targets": "table", "table": [{"cell": {"occupation": "doctor"}, "weight": 1}]}, "one value for each attribute"),
        ({"targets": "table", "table": [{"cell": {"occupation": "pilot", "birth_year": "1950"}, "weight": 1}]},
         "'pilot' is not one of"),
        ({"top_up_rounds": -1}, "top_up_rounds"),
        ({"surplus": "random"}, "surplus"),
    ],
)
def test_bad_rebalance_settings_are_refused(spec_dir, rebalance, message):
    from polyculture.spec import SpecError

    with pytest.raises(SpecError, match=message):
        _spec(spec_dir, rebalance=rebalance)

