"""compare-methods: the metric functions on hand-made inputs, the compare stage on hand-made frames, and one small
real run of the compare_methods flow (transformers engine, embedded SmolLM2, direct vs VS-Standard)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import PROJECT

from polyculture import progress
from polyculture.compare.budget import ALL_METHODS, allocate_prompts, method_spec, parse_methods
from polyculture.compare.metrics import comparison_report, failed_method, method_metrics
from polyculture.compare.render import write_comparison
from polyculture.metrics.answers import answer_summary, canonical_answers
from polyculture.metrics.calibration import calibration
from polyculture.metrics.overlap import (
    mean_pairwise_rouge_l,
    pair_from_index,
    rouge_l,
    sample_pairs,
)
from polyculture.preflight import load_spec, parse_spec
from polyculture.spec import SpecError
from polyculture.stages.rejects import reject, rejects_frame
from polyculture.stages.validate import records_schema

NUMBERS = PROJECT / "configs" / "random_numbers.yaml"
STATES = PROJECT / "configs" / "us_states.yaml"


# ---- ROUGE-L ---------------------------------------------------------------------------------------------------------


def test_rouge_l_exact_values():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 of 6 tokens each way: F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS "a c" (2) of 3 and 2 tokens: P = 2/3, R = 1, F = 2 * (2/3) / (5/3) = 0.8.
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert rouge_l("The Cat!", "the cat") == 1.0  # case and punctuation are not words
    assert rouge_l("Über café", "über Café") == 1.0  # non-ASCII words count (rouge-score's default drops them)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("dog", "cat") == 0.0


def test_mean_pairwise_rouge_l():
    texts = ["the cat sat on the mat", "the cat lay on the mat", "a dog"]
    assert mean_pairwise_rouge_l(texts) == pytest.approx((5 / 6 + 0 + 0) / 3)
    assert mean_pairwise_rouge_l(["same words", "same words", "same words"]) == 1.0
    assert mean_pairwise_rouge_l(["only one"]) is None and mean_pairwise_rouge_l([]) is None


def test_pair_sampling_is_exhaustive_or_seeded():
    for n in (2, 3, 7, 40):
        pairs = list(itertools.combinations(range(n), 2))
        assert [pair_from_index(k, n) for k in range(len(pairs))] == pairs
    with pytest.raises(ValueError):
        pair_from_index(3, 3)
    assert sample_pairs(5, 10) == list(itertools.combinations(range(5), 2))
    big = sample_pairs(1000, 300, seed=4)
    assert len(big) == len(set(big)) == 300 and all(0 <= i < j < 1000 for i, j in big)
    assert big == sample_pairs(1000, 300, seed=4) != sample_pairs(1000, 300, seed=5)
    # a large set is scored on the sample, deterministically
    texts = [f"word{i % 7} shared" for i in range(200)]
    assert mean_pairwise_rouge_l(texts, max_pairs=50) == mean_pairwise_rouge_l(texts, max_pairs=50)


# ---- calibration -----------------------------------------------------------------------------------------------------


def test_calibration_exact_values():
    # call 1 verbalizes a=0.6, b=0.2 (raw sum 0.8 -> 0.75, 0.25); call 2 a=0.5, c=0.5 (sum 1.0).
    # verbalized shares: a=(0.75+0.5)/2=0.625, b=0.125, c=0.25; observed: a=2/4, b=1/4, c=1/4.
    result = calibration(["c1", "c1", "c2", "c2"], ["a", "b", "a", "c"], [0.6, 0.2, 0.5, 0.5])
    assert result["calls"] == 2 and result["items"] == 4 and result["values"] == 3
    assert result["total_variation"] == pytest.approx(0.5 * (0.125 + 0.125 + 0.0))
    # ranks: q (a, b, c) = (3, 1, 2), o = (3, 1.5, 1.5) -> rho = 1.5 / sqrt(2 * 1.5)
    assert result["spearman"] == pytest.approx(1.5 / math.sqrt(3.0))
    raw = result["raw_sum"]
    assert (raw["mean"], raw["median"], raw["min"], raw["max"]) == pytest.approx((0.9, 0.9, 0.8, 1.0))
    assert raw["share_summing_to_1"] == 0.5
    by_value = {v["value"]: v for v in result["per_value"]}
    assert [v["value"] for v in result["per_value"]] == ["a", "c", "b"]  # by count, then verbalized share
    assert by_value["a"]["verbalized_share"] == pytest.approx(0.625) and by_value["a"]["observed_share"] == 0.5
    assert by_value["a"]["mean_probability"] == pytest.approx(0.625)  # mean of 0.75 and 0.5
    assert by_value["a"]["mean_raw_probability"] == pytest.approx(0.55)


def test_calibration_edge_cases():
    assert calibration(["c1"], ["a"], [None]) is None
    # a perfectly calibrated model: verbalized = observed, TV 0; a single value has no rank correlation
    perfect = calibration(["c1", "c1", "c2", "c2"], ["a", "b", "a", "b"], [0.5, 0.5, 0.5, 0.5])
    assert perfect["total_variation"] == 0.0 and perfect["spearman"] is None  # both sides constant
    # a call whose probabilities are all 0 spreads its mass evenly; None items are skipped
    zero = calibration(["c1", "c1", "c1"], ["a", "b", "x"], [0.0, 0.0, None])
    assert [v["verbalized_share"] for v in zero["per_value"]] == [0.5, 0.5] and zero["raw_sum"]["max"] == 0.0
    assert len(calibration(["c"] * 5, list("abcde"), [0.1] * 5, max_values=2)["per_value"]) == 2
    with pytest.raises(ValueError):
        calibration(["c1"], ["a", "b"], [0.1])


# ---- the compare stage -----------------------------------------------------------------------------------------------


def test_methods_and_method_spec():
    assert parse_methods("direct, vs_standard,direct") == ["direct", "vs_standard"]
    assert parse_methods(list(ALL_METHODS)) == list(ALL_METHODS) and len(ALL_METHODS) == 7
    with pytest.raises(SpecError, match="unknown method.*'vs_magic'.*allowed: direct"):
        parse_methods("direct,vs_magic")
    with pytest.raises(SpecError, match="at least one"):
        parse_methods(" , ")
    spec = load_spec(NUMBERS)
    swapped = method_spec(spec, "direct")
    assert swapped.method.name == "direct" and swapped.method.k == spec.method.k == 5
    assert swapped.record_schema == spec.record_schema and swapped.base_dir == spec.base_dir
    assert spec.method.name == "vs_standard"  # the original is untouched
    data = yaml.safe_load(NUMBERS.read_text())
    data["method"] = {"name": "vs_standard", "k": 2, "turns": 3}
    with pytest.raises(SpecError, match="vs_multi.*turns"):
        method_spec(parse_spec(data, NUMBERS.parent), "vs_multi")


def test_allocate_prompts_is_proportional_and_house_monotone():
    assert allocate_prompts([3, 1], [0, 0], 4) == [3, 1]
    assert allocate_prompts([1, 1, 0], [0, 0, 0], 5) == [3, 2, 0]  # ties go to the earlier cell; weight 0 gets none
    weights = [3, 3, 2, 1, 1, 1]
    at_once = allocate_prompts(weights, [0] * 6, 36)
    first = allocate_prompts(weights, [0] * 6, 10)
    rest = allocate_prompts(weights, first, 26)
    assert [a + b for a, b in zip(first, rest, strict=True)] == at_once == [10, 10, 7, 3, 3, 3]  # 36 x 3/11 = 9.8
    with pytest.raises(ValueError):
        allocate_prompts([0, 0], [0, 0], 1)


def test_shipped_specs_load():
    numbers, states = load_spec(NUMBERS), load_spec(STATES)
    assert numbers.record_schema["properties"]["number"] == {
        "type": "integer", "minimum": 1, "maximum": 10, "description": "The number drawn."
    }  # fmt: skip
    assert [a.values for a in numbers.field_attributes] == [[str(i) for i in range(1, 11)]]
    assert len(states.field_attributes[0].values) == 50 and "enum" not in states.record_schema["properties"]["state"]
    assert {s.model.name for s in (numbers, states)} == {"smollm2-135m-instruct"}


def test_answer_summary_matches_after_normalisation():
    target = {"California": 1, "Texas": 1, "Ohio": 1}
    values = ["california", "Texas.", "Puerto Rico", None, " texas"]
    assert canonical_answers(values, list(target)) == ["California", "Texas", "Puerto Rico", None, "Texas"]
    summary = answer_summary(values, target)
    assert summary["counts"] == {"California": 1, "Texas": 2, "Ohio": 0}
    assert summary["coverage"] == pytest.approx(2 / 3) and summary["distinct_in_set"] == 2
    assert summary["in_set"] == 3 and summary["in_set_rate"] == pytest.approx(3 / 5)
    assert (summary["top_answer"], summary["top_share"]) == ("Texas", pytest.approx(2 / 5))
    # entropy over the allowed values only: counts (1, 2) -> H = log2(3) - 2/3
    assert summary["entropy_bits"] == pytest.approx(math.log2(3) - 2 / 3)
    assert summary["normalized_entropy"] == pytest.approx((math.log2(3) - 2 / 3) / math.log2(3))
    empty = answer_summary([], target)
    assert empty["n"] == 0 and empty["in_set_rate"] is None and empty["top_answer"] is None


def _frames(spec):
    """Two VS calls (3 and 4 items; one rejected by the schema, one not selected) and one call that did not parse."""
    completions = pl.DataFrame(
        {
            "call_id": ["r0-c0-p0-s0", "r0-c0-p0-s1", "r1-c0-p0-s0"],
            "prompt_tokens": [50, 50, 50],
            "completion_tokens": [60, 70, 120],
            "round": [0, 0, 1],
            "shard": [0, 0, 0],
            "batch_seconds": [2.0, 2.0, 3.0],
        }
    )
    rows = [  # call, item, number, verbalized probability
        ("r0-c0-p0-s0", 0, 7, 0.5), ("r0-c0-p0-s0", 1, 3, 0.3),
        ("r0-c0-p0-s1", 0, 7, 0.9), ("r0-c0-p0-s1", 1, 2, 0.1), ("r0-c0-p0-s1", 2, 7, 0.2),
    ]  # fmt: skip
    records = pl.DataFrame(
        [
            {
                "record_id": f"{call}-{item}", "call_id": call, "cell_id": 0, "cell_key": "all", "item_index": item,
                "method": "vs_standard", "model": "m", "verbalized_probability": p,
                "record_json": json.dumps({"number": n}), "text": str(n), "number": str(n),
            }
            for call, item, n, p in rows
        ],
        schema=records_schema(spec),
    )  # fmt: skip
    rejects = rejects_frame(
        [
            reject("r0-c0-p0-s0-2", "r0-c0-p0-s0", "schema", "schema_violation", "number: 12 is greater than 10"),
            reject(None, "r1-c0-p0-s0", "parse", "truncated", "invalid JSON"),
            reject("r0-c0-p0-s1-3", "r0-c0-p0-s1", "select", "below_threshold", "probability 0.01 < 0.05"),
        ]
    )
    # numbers 7, 3, 7, 2, 7: three distinct unit vectors, so the pairwise cosines are exactly 0 or 1
    basis = {"7": [1.0, 0.0, 0.0], "3": [0.0, 1.0, 0.0], "2": [0.0, 0.0, 1.0]}
    embeddings = np.array([basis[t] for t in records["text"].to_list()], dtype=np.float32)
    return completions, records, rejects, embeddings


def test_method_metrics_on_hand_made_frames():
    spec = load_spec(NUMBERS)
    completions, records, rejects, embeddings = _frames(spec)
    m = method_metrics(
        spec, method="vs_standard", completions=completions, records=records, rejects=rejects,
        embeddings=embeddings, budget_tokens=200, rounds=2,
    )  # fmt: skip
    assert m["status"] == "ok" and m["tokens_used"] == 250 and m["prompt_tokens"] == 150 and m["rounds"] == 2
    assert m["counts"] == {
        "calls": 3, "parse_failures": 1, "candidates": 7, "valid_items": 6, "valid": 5, "unique_valid": 3,
        "salvaged": 0,
    }  # fmt: skip
    # the item the selection dropped was valid: 6 of 7 parsed items passed the schema
    assert m["valid_rate"] == pytest.approx(6 / 7) and m["parse_failure_rate"] == pytest.approx(1 / 3)
    assert m["unique_valid_per_1k_tokens"] == pytest.approx(1000 * 3 / 250)
    assert m["generation_seconds"] == 5.0  # one 2 s shard in round 0 and one 3 s shard in round 1
    assert m["generated_tokens_per_second"] == pytest.approx(50.0)
    # 10 pairs; the 3 pairs among the three 7s have cosine 1, the other 7 have cosine 0: 100 * 7/10
    assert m["semantic_diversity"] == pytest.approx(70.0)
    assert m["mean_rouge_l"] == pytest.approx(0.3) and m["rouge_l_pairs"] == 10  # same-word pairs only
    assert m["distinct_1"] == pytest.approx(3 / 5) and m["distinct_2"] is None  # one-word answers have no bigram
    numbers = m["answers"]["number"]
    assert numbers["coverage"] == pytest.approx(0.3) and numbers["in_set_rate"] == 1.0
    assert (numbers["top_answer"], numbers["top_share"]) == ("7", pytest.approx(0.6))
    kl = sum(p * math.log2(p / 0.1) for p in (0.6, 0.2, 0.2))
    assert numbers["kl_bits"] == pytest.approx(kl)
    cal = m["calibration"]
    # call 1: 7=0.5/0.8, 3=0.3/0.8; call 2: 7=(0.9+0.2)/1.2, 2=0.1/1.2; mean over the 2 calls
    q7 = (0.5 / 0.8 + 1.1 / 1.2) / 2
    q3, q2 = (0.3 / 0.8) / 2, (0.1 / 1.2) / 2
    assert cal["total_variation"] == pytest.approx(0.5 * (abs(q7 - 0.6) + abs(q3 - 0.2) + abs(q2 - 0.2)))
    assert cal["raw_sum"]["mean"] == pytest.approx(1.0)
    assert cal["spearman"] == pytest.approx(1.5 / math.sqrt(3.0))  # q ranks 7 > 3 > 2, observed 7 > 3 = 2

def test_records_salvaged_from_an_answer_cut_short_are_counted_as_salvaged_and_valid():
    spec = load_spec(NUMBERS)
    completions, records, rejects, embeddings = _frames(spec)
    # the second call was cut at the token limit after its four items: one answer-level parse reject beside them
    cut = rejects_frame([reject(None, "r0-c0-p0-s1", "parse", "truncated", "JSON cut short after 4 complete responses")])
    m = method_metrics(
        spec, method="vs_standard", completions=completions, records=records, rejects=pl.concat([rejects, cut]),
        embeddings=embeddings, budget_tokens=200,
    )  # fmt: skip
    assert m["counts"]["salvaged"] == 3  # its three kept records (its fourth item was not selected)
    assert m["counts"]["valid"] == 5 and m["counts"]["parse_failures"] == 2


def test_method_metrics_without_records_and_for_direct():
    spec = load_spec(NUMBERS)
    completions, records, rejects, embeddings = _frames(spec)
    empty = method_metrics(
        spec, method="direct", completions=completions, records=records.clear(), rejects=rejects,
        embeddings=np.zeros((0, 3), dtype=np.float32), budget_tokens=200,
    )  # fmt: skip
    assert empty["counts"]["valid"] == 0 and empty["valid_rate"] == pytest.approx(1 / 2)  # the unselected item
    assert empty["semantic_diversity"] is None and empty["mean_rouge_l"] is None and empty["calibration"] is None
    assert empty["answers"]["number"]["coverage"] == 0.0
    direct = method_metrics(
        spec, method="direct", completions=completions, records=records, rejects=rejects,
        embeddings=embeddings, budget_tokens=200,
    )  # fmt: skip
    assert direct["calibration"] is None  # only VS methods verbalize probabilities
    with pytest.raises(ValueError, match="embeddings"):
        method_metrics(spec, method="direct", completions=completions, records=records, rejects=rejects,
                       embeddings=embeddings[:2], budget_tokens=200)  # fmt: skip


def test_comparison_files(tmp_path):
    spec = load_spec(NUMBERS)
    completions, records, rejects, embeddings = _frames(spec)
    vs = method_metrics(
        spec, method="vs_standard", completions=completions, records=records, rejects=rejects,
        embeddings=embeddings, budget_tokens=200, rounds=2,
    )  # fmt: skip
    report = comparison_report(
        spec, [vs, failed_method("cot", "method 'cot' is not implemented yet")], run_id="r1", budget_tokens=200
    )
    files = write_comparison(report, tmp_path)
    assert set(files) == {"json", "markdown", "chart"}
    loaded = json.loads((tmp_path / "comparison.json").read_text())
    assert loaded["failed"] == {"cot": "method 'cot' is not implemented yet"} and loaded["files"] == files
    assert [m["method"] for m in loaded["methods"]] == ["vs_standard", "cot"]
    assert loaded["answer_sets"] == {"number": 10} and loaded["budget_tokens"] == 200
    md = (tmp_path / "comparison.md").read_text()
    assert "| figure | vs_standard |" in md and "| tokens used | 250 |" in md and "| number: coverage | 30% |" in md
    assert "## Calibration of verbalized probabilities" in md and "| cot | method 'cot' is not implemented yet |" in md
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_unknown_method_before_any_work():
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"] + "-cli"}
    out = subprocess.run(
        [sys.executable, "-m", "polyculture.cli", "compare-methods", str(NUMBERS), "--methods", "direct,best"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 2 and "unknown method(s) ['best']" in out.stderr and "Traceback" not in out.stderr


# ---- one real run of the flow ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_methods_flow_real_run(tmp_path, prefect_server, one_torch_thread):
    from polyculture.compare.flow import compare_methods

    data = yaml.safe_load(NUMBERS.read_text())
    data["model"] |= {"engine": "transformers", "batch_size": 2}
    data["method"] |= {"k": 3}
    data["sampling"] |= {"n": 1, "max_tokens": 120}
    data["record"]["schema"] = str(PROJECT / "schemas" / "random_number.schema.json")
    spec_path = tmp_path / "numbers.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    seen: list[str] = []
    budget = 40
    with progress.reporting(lambda stage, done, total, note: seen.append(stage)):
        report = compare_methods(
            str(spec_path), methods="direct,vs_standard", budget_tokens=budget, run_id="t", output_root=str(tmp_path)
        )

    run_dir = tmp_path / "random_numbers" / "compare-t"
    assert report["run_dir"] == str(run_dir)
    for name in ("comparison.json", "comparison.md", "comparison.png", "spec.yaml"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "comparison.json").read_text())["methods"] == report["methods"]
    assert {"load model", "gen direct", "gen vs_standard", "report"} <= set(seen)
    assert seen.count("load model") == 2  # one engine (start and done) for both methods
    assert report["failed"] == {}
    for result in report["methods"]:
        method = result["method"]
        assert result["status"] == "ok", result
        # the budget is reached, and only by the last round
        rounds = [pl.read_parquet(run_dir / "methods" / method / "generate" / f"round-{i:03d}")
                  for i in range(result["rounds"])]  # fmt: skip
        tokens = [int(r["completion_tokens"].sum()) for r in rounds]
        assert sum(tokens) == result["tokens_used"] >= budget > sum(tokens[:-1])
        assert (run_dir / "methods" / method / "validated.parquet").is_file()
        counts = result["counts"]
        assert counts["calls"] >= 1 and counts["candidates"] >= counts["valid"] >= counts["unique_valid"] >= 1
        assert 0 < result["valid_rate"] <= 1 and 0 <= result["parse_failure_rate"] <= 1
        assert result["unique_valid_per_1k_tokens"] == pytest.approx(1000 * counts["unique_valid"] / result["tokens_used"])
        numbers = result["answers"]["number"]
        assert numbers["in_set_rate"] == 1.0  # constrained decoding enforces the schema's 1-10 bounds
        assert 0 < numbers["coverage"] <= 1 and numbers["n"] == counts["valid"]
        assert sum(numbers["counts"].values()) == counts["valid"]
        if counts["valid"] >= 2:
            assert 0 <= result["semantic_diversity"] <= 100 and 0 <= result["mean_rouge_l"] <= 1
    direct, vs = report["methods"]
    assert direct["rounds"] >= 2  # a direct call is ~10 tokens: the first round (1 prompt) cannot reach 40
    assert direct["calibration"] is None
    cal = vs["calibration"]
    assert cal["calls"] >= 1 and cal["raw_sum"]["mean"] > 0 and 0 <= cal["total_variation"] <= 1
    assert "| figure | direct | vs_standard |" in (run_dir / "comparison.md").read_text()
