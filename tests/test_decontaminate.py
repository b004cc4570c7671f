"""The decontaminate stage on real components: the CHAMP problems file of champ-dataset, the MiniLM embedder, FAISS,
user benchmark files read by index.sources, and the spec's refusals through the real preflight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import small_spec_dict

from polyculture.index.benchmarks import read_champ
from polyculture.preflight import parse_spec
from polyculture.spec import DecontaminateSpec, SpecError
from polyculture.stages.decontaminate import decontaminate, load_benchmarks

UNRELATED = [
    "Amara Okafor is a doctor in Lagos who runs a night clinic for fishermen and their families.",
    "Tom has 12 marbles. Aisha gives Tom 7 more. How many marbles does Tom have now?",
    "Return the greatest common divisor of the specified integer arguments.",
    "A farmer in Peru grows six kinds of potato on terraces his grandfather built.",
]


@pytest.fixture(scope="module")
def champ():
    return read_champ()


def _records(texts: list[str], fields: list[dict] | None = None) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "record_id": [f"r{i}" for i in range(len(texts))],
            "call_id": [f"c{i}" for i in range(len(texts))],
            "record_json": [json.dumps(f) for f in fields] if fields else ["{}"] * len(texts),
            "text": texts,
        }
    )


def _text(champ, item_id: str) -> str:
    return champ.texts[champ.item_ids.index(item_id)]


def test_champ_is_the_270_problems_of_the_package(champ):
    assert len(champ.texts) == 270 and len(set(champ.item_ids)) == 270
    assert _text(champ, "P_Number-Theory_24") == "Find 2^32+1 mod 641."
    categories = {i.rsplit("_", 1)[0] for i in champ.item_ids}
    assert categories == {f"P_{c}" for c in ("Number-Theory", "Inequality", "Polynomial", "Sequence", "Combinatorics")}


def test_copies_and_ngram_overlaps_are_rejected_naming_benchmark_and_item(champ, embedder):
    copy = _text(champ, "P_Combinatorics_6")
    # 9 words of a long problem inside text of our own: one shared 8-gram, too little for the embedding test.
    window = " ".join(_text(champ, "P_Sequence_21").split()[:9])
    texts = [copy, f"Here is a warm-up. {window} Now tell me a story about a dragon.", "Exercise: find 2^32+1 mod 641.", *UNRELATED]
    records = _records(texts)
    embeddings = embedder.encode(texts)
    result = decontaminate(records, embeddings, DecontaminateSpec(benchmarks=["champ"], ngram=8), [champ], embedder)

    rejects = {row["record_id"]: row for row in result.rejects.iter_rows(named=True)}
    assert sorted(rejects) == ["r0", "r1", "r2"]
    assert {row["stage"] for row in rejects.values()} == {"decontaminate"}
    assert {row["reason"] for row in rejects.values()} == {"ngram_overlap"}
    assert "champ item P_Combinatorics_6 'In how many ways" in rejects["r0"]["detail"]
    assert "nearest cosine 1.000" in rejects["r0"]["detail"]
    assert "shares 1 word 8-gram with champ item P_Sequence_21" in rejects["r1"]["detail"]
    # A problem shorter than n words is matched whole.
    assert "holds champ item P_Number-Theory_24 'Find 2^32+1 mod 641.' whole" in rejects["r2"]["detail"]

    # The unrelated texts are kept, with their own embeddings.
    assert result.kept["record_id"].to_list() == [f"r{i}" for i in range(3, len(texts))]
    np.testing.assert_array_equal(result.kept_embeddings, embeddings[3:])
    [row] = result.benchmarks
    assert (row.benchmark, row.items, row.records_checked) == ("champ", 270, len(texts))
    assert row.flagged == 3 and row.flagged_ngram == 3
    assert row.flagged == row.flagged_ngram + row.flagged_embedding - row.flagged_both
    assert row.flagged_embedding == row.flagged_both == 2  # the copy and the short problem also embed as near-copies
    assert [(e.record_id, e.item_id, e.test) for e in row.examples] == [
        ("r0", "P_Combinatorics_6", "both"), ("r1", "P_Sequence_21", "ngram"), ("r2", "P_Number-Theory_24", "both"),
    ]  # fmt: skip


def test_a_paraphrase_is_caught_by_the_embedding_test_at_the_default_threshold(champ, embedder):
    # Renamed variables (P_Polynomial_10: x, y, n -> u, v, k; MiniLM cosine 0.895) and a changed number
    # (P_Number-Theory_11: 57 -> 39; 0.907): no 13-gram left in either. The default threshold 0.85 sits between
    # these and the most similar unrelated text bench/decontamination.py found (0.755 of 1,000).
    texts = [
        "For an antisymmetric polynomial g(u, v) (i.e., g(u, v)=-g(v, u)) of total degree k (i.e., the maximum value "
        "of i+j in u^i*v^j is k), what are possible values of the remainder of g(u, v) divided by u-v?",
        "Which is the smallest positive integer that becomes 39 times smaller when its first digit is removed?",
        *UNRELATED,
    ]
    records, embeddings = _records(texts), embedder.encode(texts)
    settings = DecontaminateSpec(benchmarks=["champ"], ngram=13)
    assert settings.embedding_threshold == 0.85
    result = decontaminate(records, embeddings, settings, [champ], embedder)
    rejects = result.rejects.sort("record_id").to_dicts()
    assert [(r["record_id"], r["reason"]) for r in rejects] == [("r0", "embedding_neighbour"), ("r1", "embedding_neighbour")]
    assert "to champ item P_Polynomial_10 'For an antisymmetric" in rejects[0]["detail"]
    assert "to champ item P_Number-Theory_11 'Which is the smallest" in rejects[1]["detail"]
    cosines = [float(r["detail"].split()[1]) for r in rejects]
    assert all(0.85 <= c < 0.95 for c in cosines), cosines
    [row] = result.benchmarks
    assert (row.flagged_ngram, row.flagged_embedding, row.flagged_both, row.flagged) == (0, 2, 0, 2)

    # A stricter threshold keeps them: the threshold, not the n-gram test, decided.
    strict = decontaminate(records, embeddings, settings.model_copy(update={"embedding_threshold": 0.95}), [champ], embedder)
    assert strict.rejects.height == 0 and strict.kept.height == len(texts)


def test_checked_fields_are_each_tested_on_their_own(champ, embedder):
    problem = _text(champ, "P_Inequality_41")
    fields = [
        {"question": "What is 2 plus 2?", "solution": problem},  # leaked in the field not checked
        {"question": problem, "solution": "By AM-GM the minimum is 2^n/(n+1)."},
        {"question": UNRELATED[1], "solution": None},
    ]
    records = _records([json.dumps(f) for f in fields], fields)
    settings = DecontaminateSpec(benchmarks=["champ"], fields=["question"])
    result = decontaminate(records, embedder.encode(records["text"].to_list()), settings, [champ], embedder)
    [reject] = result.rejects.to_dicts()
    assert reject["record_id"] == "r1" and "P_Inequality_41" in reject["detail"] and "field question" in reject["detail"]
    both = decontaminate(
        records, embedder.encode(records["text"].to_list()), settings.model_copy(update={"fields": ["question", "solution"]}),
        [champ], embedder,
    )  # fmt: skip
    assert sorted(both.rejects["record_id"].to_list()) == ["r0", "r1"]
    assert "field solution" in both.rejects.filter(pl.col("record_id") == "r0")["detail"][0]


def test_user_benchmark_files_parquet_and_jsonl(spec_dir, embedder):
    exams = spec_dir / "bench" / "exam.parquet"
    exams.parent.mkdir()
    pl.DataFrame(
        {
            "qid": ["q-17", "q-18"],
            "question": [
                "A ladder 13 metres long leans against a vertical wall with its foot 5 metres from the wall; how high up "
                "the wall does it reach?",
                "Name the capital city of the country with the longest coastline in the world.",
            ],
        }
    ).write_parquet(exams)
    quiz = spec_dir / "quiz.jsonl"
    pl.DataFrame({"text": ["The quick brown fox jumps over the lazy dog near the old river bank at dawn."]}).write_ndjson(quiz)
    spec = parse_spec(
        small_spec_dict(
            decontaminate={
                "benchmarks": [{"path": "bench/exam.parquet", "text_column": "question", "id_column": "qid"},
                               {"path": "quiz.jsonl", "name": "quiz"}],
            }
        ),
        spec_dir,
    )  # fmt: skip
    assert spec.located_files["decontaminate.benchmarks.0.path"] == str(exams.resolve())
    benchmarks = load_benchmarks(spec.decontaminate, spec.base_dir)
    assert [(b.name, b.item_ids) for b in benchmarks] == [("exam", ("q-17", "q-18")), ("quiz", ("quiz:0",))]

    texts = [
        "Puzzle: a ladder 13 metres long leans against a vertical wall with its foot 5 metres from the wall. Height?",
        "At dawn the quick brown fox jumps over the lazy dog near the old river bank, and runs off.",
        UNRELATED[0],
    ]
    result = decontaminate(_records(texts), embedder.encode(texts), spec.decontaminate, benchmarks, embedder)
    details = dict(zip(result.rejects["record_id"].to_list(), result.rejects["detail"].to_list(), strict=True))
    assert sorted(details) == ["r0", "r1"]
    assert "exam item q-17 'A ladder 13 metres" in details["r0"]
    assert "quiz item quiz:0 'The quick brown fox" in details["r1"]
    table = {row.benchmark: row for row in result.benchmarks}
    assert (table["exam"].items, table["exam"].flagged, table["quiz"].flagged) == (2, 1, 1)
    assert table["exam"].source == str(exams.resolve())


def _refusal(spec_dir: Path, section: dict) -> str:
    with pytest.raises(SpecError) as refused:
        parse_spec(small_spec_dict(decontaminate=section), spec_dir)
    return str(refused.value)


def test_refusals_name_the_field(spec_dir):
    pl.DataFrame({"question": ["a b c d e f g h"]}).write_parquet(spec_dir / "exam.parquet")
    missing = _refusal(spec_dir, {"benchmarks": [{"path": "nowhere.parquet"}]})
    assert "decontaminate.benchmarks.0.path: 'nowhere.parquet' not found" in missing
    column = _refusal(spec_dir, {"benchmarks": ["champ", {"path": "exam.parquet", "text_column": "problem"}]})
    assert "decontaminate.benchmarks.1.text_column" in column and "no column 'problem'" in column
    assert "question" in column  # the columns it does have
    assert "decontaminate.ngram" in _refusal(spec_dir, {"benchmarks": ["champ"], "ngram": 3})
    for threshold in (0, 1.5):
        assert "decontaminate.embedding_threshold" in _refusal(
            spec_dir, {"benchmarks": ["champ"], "embedding_threshold": threshold}
        )
    field = _refusal(spec_dir, {"benchmarks": ["champ"], "fields": ["bio", "question"]})
    assert "decontaminate.fields: 'question' is not in the record schema's properties" in field
    built_in = _refusal(spec_dir, {"benchmarks": ["gsm8k"]})
    assert "decontaminate.benchmarks" in built_in and "'gsm8k' is not a built-in benchmark ['champ']" in built_in
    assert "decontaminate.benchmarks" in _refusal(spec_dir, {"benchmarks": []})
    assert "decontaminate.unknown" in _refusal(spec_dir, {"benchmarks": ["champ"], "unknown": 1})


def test_check_command_refuses_a_missing_column_with_exit_2(spec_dir):
    pl.DataFrame({"question": ["a b c d e f g h"]}).write_ndjson(spec_dir / "exam.jsonl")
    spec_path = spec_dir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec_dict(decontaminate={"benchmarks": [{"path": "exam.jsonl"}]})))
    refused = subprocess.run(
        [str(Path(sys.executable).parent / "polyculture"), "check", str(spec_path)], capture_output=True, text=True
    )
    assert refused.returncode == 2, refused.stderr
    assert "decontaminate.benchmarks.0.text_column" in refused.stderr and "no column 'text'" in refused.stderr


def test_the_resolved_spec_keeps_the_fingerprint_and_names_benchmarks_by_absolute_path(spec_dir, tmp_path):
    from polyculture.runs.resolved import resolved_spec_text

    pl.DataFrame({"text": ["a b c d e f g h"]}).write_parquet(spec_dir / "exam.parquet")
    data = small_spec_dict(decontaminate={"benchmarks": ["champ", {"path": "exam.parquet"}]})
    spec = parse_spec(data, spec_dir)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "record.schema.json").write_text((spec_dir / "record.schema.json").read_text())
    resolved = yaml.safe_load(resolved_spec_text(spec, json.loads(json.dumps(data))))
    assert resolved["decontaminate"]["benchmarks"] == ["champ", {"path": str((spec_dir / "exam.parquet").resolve())}]
    assert parse_spec(resolved, moved).fingerprint() == spec.fingerprint()
    # The section decides what is published: it is part of the fingerprint; without it, the hash is as before.
    plain = parse_spec(small_spec_dict(), spec_dir)
    assert plain.fingerprint() != spec.fingerprint()
    assert "decontaminate" not in plain.model_dump(exclude_none=True)


@pytest.mark.slow
def test_a_tiny_build_rejects_benchmark_overlaps_and_reports_them(spec_dir, tmp_path, prefect_server, one_torch_thread):
    """The real flow on the embedded model: champ and a user file of generic biography sentences (the model cannot be
    made to copy a benchmark, so a low threshold makes the file flag some records); a top-up round checks its new
    records too. The table, the rejects, the funnel, result.json, report.md/.html and the card agree."""
    from polyculture.flows.build_dataset import build_dataset
    from polyculture.report.model import Report

    pl.DataFrame(
        {
            "sentence": [
                "She is a doctor who works long hours at the city hospital caring for her patients.",
                "He is a farmer who grows wheat and raises cattle on the land his family has worked for years.",
                "The weather report says it will rain tomorrow afternoon in the northern districts.",
            ]
        }
    ).write_csv(spec_dir / "generic.csv")
    spec = small_spec_dict(
        decontaminate={
            "benchmarks": ["champ", {"path": "generic.csv", "text_column": "sentence"}],
            "embedding_threshold": 0.2,  # the model writes poor bios: at 0.2 some sit this near a generic sentence
        },
        target_size=6,  # with many first-round records flagged a cell runs short: its top-up records are checked too
        rebalance={"top_up_rounds": 1},
    )
    spec_path = spec_dir / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = build_dataset(str(spec_path), run_id="run-1", output_root=str(tmp_path / "out"))
    run_dir = Path(result["run_dir"])

    counts = result["counts"]
    rejects = pl.read_parquet(run_dir / "rejects.parquet").filter(pl.col("stage") == "decontaminate")
    assert counts["after_semantic_dedup"] >= counts["after_decontaminate"] >= counts["final"]
    assert rejects.height == counts["after_semantic_dedup"] - counts["after_decontaminate"]
    assert set(rejects["reason"].to_list()) <= {"ngram_overlap", "embedding_neighbour"}
    assert all(" item " in d and ("champ" in d or "generic" in d) for d in rejects["detail"].to_list())

    report = json.loads((run_dir / "report.json").read_text())
    assert Report.from_dict(report).to_dict() == report
    contamination = report["contamination"]
    assert (contamination["ngram"], contamination["embedding_threshold"]) == (8, 0.2)
    assert contamination["rejected"] == rejects.height
    table = {row["benchmark"]: row for row in contamination["benchmarks"]}
    assert list(table) == ["champ", "generic"] and (table["champ"]["items"], table["generic"]["items"]) == (270, 3)
    for row in table.values():  # the last round's pool: every round's records, top-up rounds included
        assert row["records_checked"] == counts["after_semantic_dedup"]
        assert row["flagged"] == row["flagged_ngram"] + row["flagged_embedding"] - row["flagged_both"]
        assert len(row["examples"]) == min(3, row["flagged"])
    # A record flagged by both benchmarks is one reject.
    assert max(r["flagged"] for r in table.values()) <= rejects.height <= sum(r["flagged"] for r in table.values())
    assert result["contamination"] == contamination["benchmarks"]
    assert json.loads((run_dir / "result.json").read_text())["contamination"] == contamination["benchmarks"]

    markdown = (run_dir / "report.md").read_text()
    assert "## Contamination" in markdown and "| generic | 3 |" in markdown
    assert "after_decontaminate" in markdown
    assert 'id="contamination"' in (run_dir / "report.html").read_text()
    card = (Path(result["dataset_dir"]) / "README.md").read_text()
    assert "| decontamination | against `champ`" in card and "### Contamination" in card
