"""The quality stage: fluency on the real embedded model, expressions evaluated safely, user functions in worker
processes that may fail, raise, hang or die, rebalancing that prefers passing records, and a tiny real build."""

from __future__ import annotations

import importlib
import json
import random
import re
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest

from polyculture.spec import ExpressionCheck, FluencyCheck, PythonCheck
from polyculture.stages.quality import PASSED_COLUMN, cache_frame, cache_from_frame, quality
from polyculture.stages.quality_expression import evaluate

# stdlib objects whose docstrings open with a plain English sentence (Python 3.11)
PROSE_SOURCES = [
    "os.path.join", "os.path.exists", "shutil.copyfile", "shutil.rmtree", "random.shuffle", "random.choice",
    "textwrap.wrap", "glob.glob", "heapq.heappush", "heapq.merge", "bisect.insort", "collections.Counter",
    "math.isclose", "zipfile.is_zipfile", "copy.deepcopy", "calendar.isleap", "gzip.open", "inspect.getsource",
    "statistics.median", "threading.Thread", "subprocess.run", "logging.getLogger", "queue.Queue", "uuid.uuid4",
]  # fmt: skip


def prose_sentences(n: int = 20) -> list[str]:
    """The first sentence of stdlib docstrings, the first `n` that read as prose."""
    found = []
    for dotted in PROSE_SOURCES:
        module, _, name = dotted.rpartition(".")
        doc = getattr(importlib.import_module(module), name).__doc__ or ""
        sentence = re.split(r"(?<=\.)\s", " ".join(doc.strip().split("\n\n")[0].split()))[0]
        if len(sentence.split()) >= 4 and sentence.endswith(".") and "(" not in sentence:
            found.append(sentence)
    assert len(found) >= n, found
    return found[:n]


def shuffled(text: str, seed: int) -> str:
    chars = list(text)
    random.Random(seed).shuffle(chars)
    return "".join(chars)


def records_of(rows: list[dict]) -> pl.DataFrame:
    """A records frame (the columns quality reads) whose record i is rows[i]; its text is the `bio` field."""
    return pl.DataFrame(
        {
            "record_id": [f"c{i}-0" for i in range(len(rows))],
            "call_id": [f"c{i}" for i in range(len(rows))],
            "record_json": [json.dumps(r) for r in rows],
            "text": [str(r.get("bio", "")) for r in rows],
        }
    )


def auc(positive: list[float], negative: list[float]) -> float:
    return sum((p > q) + 0.5 * (p == q) for p in positive for q in negative) / (len(positive) * len(negative))


# -- fluency on the real model ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fluency_separates_prose_from_its_shuffled_characters(one_torch_thread):
    from polyculture.engines.factory import create_engine
    from polyculture.spec import ModelSpec

    prose = prose_sentences(20)
    noise = [shuffled(s, i) for i, s in enumerate(prose)]
    frame = records_of([{"bio": t} for t in prose + noise])
    engine = create_engine(ModelSpec(engine="transformers"), seed=0)
    try:
        known: dict = {}
        half = FluencyCheck(name="fluent", kind="fluency", quantile=0.5)
        result = quality(frame, np.zeros((40, 4), dtype=np.float32), [half], engine=engine, known=known)
    finally:
        engine.close()
    scores = result.scores["score"].to_list()
    good, bad = scores[:20], scores[20:]
    print(f"fluency AUC {auc(good, bad):.3f}; prose {min(good):.2f}..{max(good):.2f}, shuffled {min(bad):.2f}..{max(bad):.2f}")
    assert auc(good, bad) == 1.0  # measured: prose -6.95..-3.38, shuffled -10.01..-7.53 (mean token log-prob)
    # the run's median splits them: the lower half rejected is exactly the shuffled half, the score in the reason
    assert result.records["record_id"].to_list() == [f"c{i}-0" for i in range(20)]
    assert result.rejects["record_id"].to_list() == [f"c{i}-0" for i in range(20, 40)]
    assert set(result.rejects["stage"]) == {"quality"} and set(result.rejects["reason"]) == {"failed_check"}
    assert all(d.startswith("fluent: mean token log-prob ") and "quantile" in d for d in result.rejects["detail"])
    # An absolute threshold in the gap, over the cached scores: no model needed (engine None would raise if anything
    # were scored again), the same split, and the kept scores at or above it.
    cut = (min(good) + max(bad)) / 2
    absolute = FluencyCheck(name="fluent", kind="fluency", threshold=cut)
    again = quality(frame, np.zeros((40, 4), dtype=np.float32), [absolute], engine=None, known=known)
    assert again.rejects["record_id"].to_list() == [f"c{i}-0" for i in range(20, 40)]
    assert (again.records["_quality_fluent"] >= cut).all() and again.counts[0].threshold == cut


# -- expression --------------------------------------------------------------------------------------------------------

EXPRESSION_CASES = [  # (expression, claimed, passes, what the reason says)
    ("3 * (4 + 5)", 27, True, None),
    ("10 / 4", 2.5, True, None),
    ("0.1 + 0.2", 0.3, True, None),  # within the float tolerance
    ("sqrt(16) + 1", 5, True, None),
    ("3 > 2", True, True, None),
    ("2 ** 10", 1000, False, "1024 != claimed 1000"),
    ("3 > 2", 1, False, "type mismatch: bool result, int claimed"),
    ("3 * (4 + 5)", "27", False, "claimed value is a str"),
    ("2 +* 3", 5, False, "does not parse"),
    ("__import__('os').system('true')", 0, False, "not defined"),
    ("(1).__class__", 0, False, "FeatureNotAvailable"),
    ("9 ** 9 ** 9", 1, False, "bits (max_bits 4096)"),
    ("4000000 ** 4000000", 1, False, "bits (max_bits 4096)"),  # simpleeval's own bound lets this one through
    ("10 ** 1000 * 10 ** 1000", 1, False, "an intermediate integer has"),
    ("1 / 0", 1, False, "ZeroDivisionError"),
    ("'ab' * 10 ** 9", 1, False, "IterableTooLong"),
    (None, 1, False, "formula holds no expression"),
]


def test_expression_checks_pass_fail_and_refuse_safely():
    rows = [{"formula": e, "answer": v} for e, v, _, _ in EXPRESSION_CASES]
    check = ExpressionCheck(name="math", kind="expression", expression_field="formula", value_field="answer")
    result = quality(records_of(rows), np.zeros((len(rows), 2), dtype=np.float32), [check])
    passing = [f"c{i}-0" for i, case in enumerate(EXPRESSION_CASES) if case[2]]
    assert result.records["record_id"].to_list() == passing
    assert result.records["_quality_math"].to_list() == [1.0] * len(passing)
    assert result.embeddings.shape == (len(passing), 2)
    details = dict(zip(result.rejects["record_id"], result.rejects["detail"], strict=True))
    for i, (_, _, passes, reason) in enumerate(EXPRESSION_CASES):
        if not passes:
            assert details[f"c{i}-0"].startswith("math: ") and reason in details[f"c{i}-0"], (i, details[f"c{i}-0"])
            assert details[f"c{i}-0"].endswith("(score 0)")
    counts = result.counts[0]
    assert (counts.checked, counts.passed, counts.failed) == (len(rows), len(passing), len(rows) - len(passing))


def test_an_informational_check_scores_without_rejecting():
    rows = [{"formula": "1 + 1", "answer": 2}, {"formula": "1 + 1", "answer": 3}]
    check = ExpressionCheck(name="math", kind="expression", expression_field="formula", value_field="answer", gate=False)
    result = quality(records_of(rows), np.zeros((2, 2), dtype=np.float32), [check])
    assert result.rejects.height == 0 and result.records.height == 2
    assert result.records["_quality_math"].to_list() == [1.0, 0.0]
    assert result.records[PASSED_COLUMN].to_list() == [True, False]
    assert result.counts[0].failed == 1


def test_no_checks_leave_the_records_untouched():
    frame = records_of([{"bio": "A doctor."}])
    result = quality(frame, np.zeros((1, 2), dtype=np.float32), [])
    assert result.records.equals(frame) and result.rejects.height == 0 and result.counts == ()


def test_evaluation_limits_are_settings():
    assert evaluate("2 ** 100", max_bits=128) == 2**100
    with pytest.raises(ValueError, match="max_bits 64"):
        evaluate("2 ** 100", max_bits=64)
    with pytest.raises(ValueError, match="max_length 5"):
        evaluate("1 + 2 + 3", max_length=5)


# -- python ------------------------------------------------------------------------------------------------------------

CHECK_MODULE = '''
import os
import time


def check(record):
    with open(record["log"], "a") as log:
        log.write(record["kind"] + "\\n")
    kind = record["kind"]
    if kind == "pass":
        return True
    if kind == "fail":
        return False
    if kind == "good score":
        return 0.7
    if kind == "poor score":
        return (0.2, "too short")
    if kind == "raise":
        raise ValueError("boom")
    if kind == "hang":
        time.sleep(600)
    if kind == "stubborn":  # swallows its own timeout: only killing the worker stops it
        while True:
            try:
                time.sleep(600)
            except BaseException:
                pass
    if kind == "die":
        os._exit(3)
    return "yes"
'''

PYTHON_CASES = [  # (kind, passes, what the reason says)
    ("pass", True, None),
    ("fail", False, "p: failed (score 0)"),
    ("good score", True, None),
    ("poor score", False, "score 0.2 < threshold 0.5: too short"),
    ("raise", False, "raised ValueError: boom"),
    ("hang", False, "timed out after 1 s"),
    ("wrong type", False, "returned str; expected a bool, a number or (score, reason)"),
    ("die", False, "the check's worker process died on this record"),
    ("stubborn", False, "hung past timeout_s 1 s; its worker was killed"),
    ("pass", True, None),
]


def test_python_checks_cost_a_record_when_they_fail_raise_hang_or_die(tmp_path):
    module = f"quality_check_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(CHECK_MODULE)
    log = tmp_path / "calls.log"
    rows = [{"kind": kind, "log": str(log)} for kind, _, _ in PYTHON_CASES]
    check = PythonCheck(name="p", kind="python", function=f"{module}:check", threshold=0.5, timeout_s=1, workers=2)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    known: dict = {}
    result = quality(records_of(rows), np.zeros((len(rows), 2), dtype=np.float32), [check], base_dir=tmp_path, known=known)

    passing = [f"c{i}-0" for i, case in enumerate(PYTHON_CASES) if case[1]]
    assert result.records["record_id"].to_list() == passing
    assert result.records["_quality_p"].to_list() == [1.0, 0.7, 1.0]
    details = dict(zip(result.rejects["record_id"], result.rejects["detail"], strict=True))
    for i, (_, passes, reason) in enumerate(PYTHON_CASES):
        if not passes:
            assert reason in details[f"c{i}-0"], (i, details[f"c{i}-0"])
    assert set(result.rejects["stage"]) == {"quality"}
    # the hung and dead workers are gone; what is left is multiprocessing's own resource tracker at most
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    assert all("resource_tracker" in " ".join(p.cmdline()) for p in left), [p.cmdline() for p in left]

    # A second pass (a later round, a resumed run) reuses every score: the function is not called again.
    calls = log.read_text().splitlines()
    again = quality(records_of(rows), np.zeros((len(rows), 2), dtype=np.float32), [check], base_dir=tmp_path, known=known)
    assert log.read_text().splitlines() == calls
    assert again.rejects.equals(result.rejects)
    assert cache_from_frame(cache_frame(known)) == known  # what the run folder keeps reads back the same


# -- rebalance with scores ---------------------------------------------------------------------------------------------


def _scored(texts: list[str], scores: list[float | None], passed: list[bool]) -> pl.DataFrame:
    n = len(texts)
    return pl.DataFrame(
        {
            "record_id": [f"r{i}" for i in range(n)],
            "call_id": [f"c{i}" for i in range(n)],
            "text": texts,
            "verbalized_probability": [None] * n,
            "occupation": ["doctor"] * n,
            "_quality_fluent": pl.Series(scores, dtype=pl.Float64),
            PASSED_COLUMN: passed,
        }
    )


def test_rebalance_never_keeps_a_failing_record_over_a_passing_one(embedder):
    from polyculture.spec import Attribute, RebalanceSpec
    from polyculture.stages.rebalance import rebalance

    texts = [
        "A doctor treats patients in a hospital.",
        "The surgeon spends weekends sailing across the bay.",  # the most distinct: diversity alone would keep it
        "A doctor treats patients at a hospital.",
        "A doctor treats patients at the hospital.",
    ]
    vectors = embedder.encode(texts)
    doctor = [Attribute(name="occupation", values=["doctor"])]
    # r1 failed an informational check: two passing records fill the quota of 2, so r1 goes despite its distinctness
    frame = _scored(texts, [-3.0, -9.0, -3.5, -4.0], [True, False, True, True])
    for surplus in ("farthest_point", "mmr"):
        kept = rebalance(frame, vectors, RebalanceSpec(surplus=surplus), doctor, 2).kept["record_id"].to_list()
        assert "r1" not in kept and len(kept) == 2, surplus
    # farthest-point starts from the best-scored record (r0), and MMR at full relevance weight keeps the best two
    assert rebalance(frame, vectors, RebalanceSpec(), doctor, 1).kept["record_id"].to_list() == ["r0"]
    best = rebalance(frame, vectors, RebalanceSpec(surplus="mmr", mmr_lambda=1.0), doctor, 2)
    assert best.kept["record_id"].to_list() == ["r0", "r2"]
    assert "passing every quality check first" in best.rejects["detail"][0]
    # scores that rank nobody (a bool check all passed) leave the cut as without quality: the most probable first
    alike = _scored(texts, [1.0] * 4, [True] * 4).with_columns(verbalized_probability=pl.Series([0.1, 0.9, 0.2, 0.3]))
    assert rebalance(alike, vectors, RebalanceSpec(), doctor, 1).kept["record_id"].to_list() == ["r1"]
    # too few passing records: all of them, then the failing ones fill the rest
    few = _scored(texts, [-3.0, -9.0, -3.5, None], [True, False, False, False])
    kept = rebalance(few, vectors, RebalanceSpec(), doctor, 2).kept["record_id"].to_list()
    assert "r0" in kept and len(kept) == 2


# -- a tiny real build ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_with_a_fluency_gate_rejects_and_publishes_scores(spec_dir, tmp_path, prefect_server):
    import datasets
    import yaml
    from conftest import small_spec_dict

    from polyculture.flows.build_dataset import build_dataset

    spec = small_spec_dict(
        sampling={"max_tokens": 100, "n": 2},
        rebalance={"top_up_rounds": 1, "top_up_max_tokens": 400},
        quality=[{"name": "fluent", "kind": "fluency", "quantile": 0.3}],
    )
    spec_path = spec_dir / "fluent.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = build_dataset(str(spec_path), run_id="q1", output_root=str(tmp_path / "out"))
    run_dir = Path(result["run_dir"])
    counts = result["counts"]
    assert counts["after_semantic_dedup"] > counts["after_quality"] >= counts["final"] == result["records"] > 0

    rejects = pl.read_parquet(run_dir / "rejects.parquet")
    gated = rejects.filter(pl.col("stage") == "quality")
    assert gated.height == counts["after_semantic_dedup"] - counts["after_quality"] > 0
    assert set(gated["reason"]) == {"failed_check"} and all(d.startswith("fluent: ") for d in gated["detail"])
    assert rejects.height == counts["candidates"] - counts["final"] + rejects.filter(pl.col("record_id").is_null()).height

    # every published record has its score, at or above the last pass's threshold; every rejected one below it
    thresholds = pl.read_parquet(run_dir / "quality_checks.parquet")
    threshold = thresholds.filter(pl.col("name") == "fluent")["threshold"][0]
    loaded = datasets.load_dataset(result["dataset_dir"], split="train")
    published = loaded["_quality_fluent"]
    assert len(published) == result["records"] and all(s is not None and s >= threshold for s in published)
    cached = pl.read_parquet(run_dir / "quality_scores.parquet")
    rejected = cached.filter(pl.col("record_id").is_in(gated["record_id"].to_list()))["score"]
    assert rejected.len() == gated.height and (rejected < threshold).all()
    card = (Path(result["dataset_dir"]) / "README.md").read_text()
    assert "`_quality_fluent` (fluency)" in card
    # the report reads the same last pass: its threshold, what it checked and what passed
    report = json.loads((run_dir / "report.json").read_text())["quality"]
    fluent = report["checks"][0]
    assert fluent["quantile"] == 0.3 and fluent["threshold"] == pytest.approx(threshold)
    assert report["checked"] == fluent["checked"] == counts["after_semantic_dedup"]
    assert fluent["passed"] == counts["after_quality"] and fluent["stages"]["after"]["pass_rate"] == 1.0
    assert report["diversity"]["after"]["rows"] == counts["final"]  # gated only: every final record passes
    assert "## Quality checks" in card and "| `fluent` | fluency | yes | quantile 0.3 of this run = " in card
