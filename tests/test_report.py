"""write_report on a tiny hand-made run: files, figures, strict JSON, real PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image

from polyculture.preflight import parse_spec
from polyculture.report.reference_dataset import load_report_reference
from polyculture.report.write import RecordSet, ReportInputs, write_report
from polyculture.spec import BuildSpec, SpecError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "job": {"type": "string"},
        "mood": {"type": "string"},
        "bio": {"type": "string"},
    },
    "required": ["name", "age", "job", "bio"],
}


def make_spec(tmp_path: Path, **extra: Any) -> BuildSpec:
    (tmp_path / "person.schema.json").write_text(json.dumps(SCHEMA))
    return parse_spec(
        {
            "name": "people",
            "description": "Tiny people for tests.",
            "prompt": {"template": "Describe a {{ job }}."},
            "record": {"schema": "person.schema.json", "text_field": "bio"},
            "attributes": [
                {"name": "job", "values": ["doctor", "teacher"], "weights": [3, 2]},
                {"name": "mood", "values": ["happy", "sad"], "source": "field"},
            ],
            "target_size": 5,
            "seed": 3,
            **extra,
        },
        base_dir=tmp_path,
    )


def records(rows: list[tuple[str, str, str | None, str]]) -> pl.DataFrame:
    """Records frame per the contract in stages/__init__.py, from (name, job, mood, bio) tuples."""
    out: list[dict[str, Any]] = []
    for i, (name, job, mood, bio) in enumerate(rows):
        record = {"name": name, "age": 30 + i, "job": job, "mood": mood, "bio": bio}
        out.append(
            {
                "record_id": f"c{i}-0",
                "call_id": f"c{i}",
                "cell_id": 0 if job == "doctor" else 1,
                "cell_key": f"job={job}",
                "item_index": 0,
                "method": "vs_standard",
                "model": "smollm2-135m-instruct",
                "verbalized_probability": 0.2 if i % 2 else None,
                "record_json": json.dumps(record),
                "text": bio,
                "job": job,
                "mood": mood,
            }
        )
    return pl.DataFrame(out, schema_overrides={"verbalized_probability": pl.Float64, "mood": pl.String})


FINAL_ROWS = [
    ("Ana", "doctor", "happy", "a b"),
    ("Bo", "doctor", "happy", "c d"),
    ("Cy", "doctor", "sad", "e f"),
    ("Di", "teacher", None, "g h"),
]
# Validated = final + two exact copies of the first record's text.
VALIDATED_ROWS = FINAL_ROWS + [("Ed", "doctor", "angry", "a b"), ("Fe", "teacher", "sad", "a b")]


def run_report(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    spec = make_spec(tmp_path)
    final_emb = np.eye(4, dtype=np.float32)  # orthogonal: semantic diversity 100
    validated_emb = np.vstack([final_emb, final_emb[:1], final_emb[:1]])  # 3 of 15 pairs identical: 80
    rejects = pl.DataFrame(
        {
            "record_id": [None, None, "c9-i1"],
            "call_id": ["c7", "c8", "c9"],
            "stage": ["parse", "parse", "schema"],
            "reason": ["unparseable", "unparseable", "schema_violation"],
            "detail": ["no JSON found: hello", "no JSON found: hi", "age: 'x' | is not of type 'integer'"],
        },
        schema={
            "record_id": pl.String,
            "call_id": pl.String,
            "stage": pl.String,
            "reason": pl.String,
            "detail": pl.String,
        },
    )
    cells = pl.DataFrame(
        {
            "cell_key": ["job=doctor", "job=teacher"],
            "job": ["doctor", "teacher"],
            "target": [3, 2],
            "available": [5, 1],
            "kept": [3, 1],
            "deficit": [0, 1],
            "reason": [None, "not enough valid candidates after 2 top-up rounds"],
        }
    )
    counts = {"planned": 5, "completions": 3, "candidates": 9, "valid": 6, "after_exact_dedup": 5,
              "after_semantic_dedup": 4, "final": 4}  # fmt: skip
    out_dir = tmp_path / "run" / "report"
    report = write_report(
        spec,
        ReportInputs(
            run_id="run-1",
            counts=counts,
            validated=RecordSet(records(VALIDATED_ROWS), validated_emb),
            final=RecordSet(records(FINAL_ROWS), final_emb),
            rejects=rejects,
            cells=cells,
            usage={"generated_tokens": 1234, "generation_seconds": 2.5, "tokens_per_second": float("nan")},
        ),
        out_dir,
    )
    return report.to_dict(), out_dir


def _no_constants(name: str) -> None:
    raise AssertionError(f"report.json holds {name}")


def test_report_files_and_figures(tmp_path: Path) -> None:
    report, out_dir = run_report(tmp_path)
    text = (out_dir / "report.json").read_text()
    loaded = json.loads(text, parse_constant=_no_constants)  # strict JSON: no NaN/Infinity
    assert loaded == report
    assert list(loaded["counts"]) == ["planned", "completions", "candidates", "valid", "after_exact_dedup",
                                      "after_semantic_dedup", "final"]  # fmt: skip
    assert loaded["usage"]["tokens_per_second"] is None  # NaN became null
    assert loaded["usage"]["generated_tokens"] == 1234

    before, after = loaded["diversity"]["before"], loaded["diversity"]["after"]
    assert before["rows"] == 6 and after["rows"] == 4
    assert after["semantic_diversity"] == pytest.approx(100.0)
    assert before["semantic_diversity"] == pytest.approx(80.0)
    assert after["distinct_1"] == pytest.approx(1.0) and after["distinct_2"] == pytest.approx(1.0)
    assert before["distinct_1"] == pytest.approx(8 / 12) and before["distinct_2"] == pytest.approx(4 / 6)
    assert loaded["headline"]["semantic_diversity_after"] == pytest.approx(100.0)
    assert loaded["headline"]["records"] == 4 and loaded["headline"]["short_cells"] == 1
    assert loaded["diversity"]["after_dedup"] is None  # no pool given
    # Vendi: 4 orthogonal records count as 4; three copies of e0 plus e1..e3 as sqrt(12) (kernel eigenvalues 3,1,1,1).
    assert after["vendi_score"] == pytest.approx(4.0) and before["vendi_score"] == pytest.approx(12**0.5)
    assert loaded["headline"]["vendi_score_after"] == pytest.approx(4.0)
    # Self-BLEU: final texts share no word (0); before, the three "a b" copies score sqrt(0.1) each (1-, 2-grams
    # match, 3- and 4-grams smoothed to 0.1), the other three 0.
    assert after["self_bleu"] == 0.0 and before["self_bleu"] == pytest.approx(3 * 0.1**0.5 / 6)
    assert before["compression_ratio"] > 0 and after["compression_ratio"] > 0
    assert after["near_duplicate_share"] == 0.0 and before["near_duplicate_share"] == pytest.approx(0.5)
    assert after["mean_nearest_neighbour_similarity"] == pytest.approx(0.0)
    # Call ids "c0".."c5" name no prompt: every record is its own individual, so conceptual diversity is undefined.
    assert after["conceptual"]["internal_variability"] is None and "at least 2 prompts" in after["conceptual"]["reason"]
    # VS method (the spec's default): calibration over the records with a probability (odd rows), keyed by mood.
    calib = after["calibration"]
    assert calib["keyed_by"] == "mood" and (calib["calls"], calib["items"]) == (2, 2)
    assert calib["raw_sum"]["mean"] == pytest.approx(0.2)
    assert {v["value"] for v in calib["per_value"]} == {"happy", "(missing)"}
    assert loaded["monoculture"] is None
    assert loaded["attributes"]["job"]["after"]["js_bits"] is not None

    job = loaded["attributes"]["job"]
    assert job["source"] == "prompt"
    assert job["target_counts"] == {"doctor": 3, "teacher": 2}  # summed from the cells
    assert job["after"]["counts"] == {"doctor": 3, "teacher": 1}
    assert job["before"]["counts"] == {"doctor": 4, "teacher": 2}
    assert job["after"]["target_share"] == pytest.approx({"doctor": 0.6, "teacher": 0.4})
    mood = loaded["attributes"]["mood"]
    assert mood["target_counts"] == {"happy": 3, "sad": 2}  # field attribute: largest remainder of 5 over 1:1
    assert mood["after"]["counts"] == {"happy": 2, "sad": 1} and mood["after"]["other"] == 1
    assert mood["before"]["other"] == 2  # the null and "angry"

    by_reason = loaded["rejects"]["by_reason"]
    assert loaded["rejects"]["total"] == 3
    assert [(g["stage"], g["reason"], g["count"]) for g in by_reason] == [
        ("parse", "unparseable", 2),
        ("schema", "schema_violation", 1),
    ]
    assert by_reason[0]["examples"] == ["no JSON found: hello", "no JSON found: hi"]
    assert [c["cell_key"] for c in loaded["short_cells"]] == ["job=teacher"]
    assert loaded["short_cells"][0]["deficit"] == 1


def test_report_markdown_and_plots(tmp_path: Path) -> None:
    report, out_dir = run_report(tmp_path)
    md = (out_dir / "report.md").read_text()
    assert md.startswith("# Diversity report: people")
    assert "| after_semantic_dedup | 4 | 80% |" in md
    # validated 4, before rebalancing 4 (no pool given: the validated records), final 3
    assert "| doctor | 60.0% | 3 | 4 | 4 | 3 | 75.0% |" in md
    assert "![job: target vs final share](plots/attribute_job.png)" in md
    assert "plots/attribute_mood.png" in md
    assert "job=teacher" in md and "not enough valid candidates" in md
    assert "age: 'x' \\| is not of type" in md  # pipes in details cannot break the table
    assert "| metric | validated | final |" in md  # no pool: no after-dedup column
    assert "| Vendi score (effective number of distinct records in the sample) | 3.5 | 4.0 |" in md
    assert "Not computed: needs at least 2 prompts" in md
    assert "![embedding map](plots/embedding_map.png)" in md
    assert "![nearest-neighbour similarity per stage](plots/similarity.png)" in md
    for figure in ("similarity", "embedding_map"):
        assert report["figures"][figure] == f"plots/{figure}.png"
        assert (out_dir / "plots" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out_dir / "report.html").read_text()
    assert "Diversity report: people" in html and html.count('src="data:image/png;base64,') == 4
    for name in ("job", "mood"):
        png = out_dir / "plots" / f"attribute_{name}.png"
        assert report["plots"][name] == f"plots/attribute_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert not list(out_dir.glob(".*.tmp"))


def test_report_refuses_misaligned_embeddings(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    frame = records(FINAL_ROWS)
    with pytest.raises(ValueError, match="4 records but embeddings of shape"):
        inputs = ReportInputs(
            run_id="r", counts={}, validated=RecordSet(frame, np.eye(3)), final=RecordSet(frame, np.eye(4)),
            rejects=pl.DataFrame(), cells=pl.DataFrame(), usage={},
        )  # fmt: skip
        write_report(spec, inputs, tmp_path / "o")


def write_reference_file(tmp_path: Path) -> None:
    rows = [
        {"review": "a b", "feeling": "happy"},
        {"review": "q r", "feeling": "sad"},
        {"review": "s t", "feeling": "angry"},
        {"review": "u v", "feeling": "calm"},
        {"review": "", "feeling": "calm"},  # no text: left out
    ]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_three_stages_reference_and_tsne_map(tmp_path: Path) -> None:
    write_reference_file(tmp_path)
    reference_spec = {"path": "reviews.jsonl", "text_field": "review", "fields": {"mood": "feeling"}}
    spec = make_spec(tmp_path, report={"reference": reference_spec, "map": "tsne", "sample": 10})
    validated = records(VALIDATED_ROWS)
    final_emb = np.eye(4, dtype=np.float32)
    validated_emb = np.vstack([final_emb, final_emb[:1], final_emb[:1]])
    reference = load_report_reference(spec)
    assert reference is not None and reference.height == 4 and reference.columns == ["text", "mood"]
    reference_emb = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    out_dir = tmp_path / "run"
    inputs = ReportInputs(
        run_id="r3", counts={"valid": 6, "after_semantic_dedup": 5, "final": 4},
        validated=RecordSet(validated, validated_emb), pool=RecordSet(validated.head(5), validated_emb[:5]),
        final=RecordSet(validated.head(4), final_emb), rejects=pl.DataFrame(), cells=pl.DataFrame(), usage={},
        reference=RecordSet(reference, reference_emb),
    )  # fmt: skip
    report = write_report(spec, inputs, out_dir).to_dict()

    stages = report["diversity"]
    assert [stages[k]["rows"] for k in ("before", "after_dedup", "after")] == [6, 5, 4]
    # The pool is e0, e1, e2, e3, e0: 1 of 10 pairs identical -> semantic diversity 90.
    assert stages["after_dedup"]["semantic_diversity"] == pytest.approx(90.0)

    mono = report["monoculture"]
    assert mono["reference"]["rows"] == 4 and mono["reference"]["path"] == "reviews.jsonl"
    assert mono["reference"]["attributes"]["mood"]["entropy_bits"] == pytest.approx(2.0)  # 4 moods, once each
    final_mood = mono["stages"]["after"]["attributes"]["mood"]
    h = -(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3))  # happy, happy, sad (the null left out)
    assert final_mood["generated"]["entropy_bits"] == pytest.approx(h)
    assert final_mood["entropy_ratio"] == pytest.approx(h / 2.0) and final_mood["narrower"] is True
    ref_div = mono["reference"]["text"]["semantic_diversity"]
    assert mono["stages"]["after"]["text"]["semantic_diversity"] == pytest.approx(100.0)
    assert mono["stages"]["after"]["text"]["semantic_diversity_ratio"] == pytest.approx(100.0 / ref_div)

    assert report["figures"] == {"similarity": "plots/similarity.png", "embedding_map": "plots/embedding_map.png"}
    with Image.open(out_dir / "plots" / "embedding_map.png") as image:
        assert image.width > 1000  # two panels: by fate and by the first attribute
    md = (out_dir / "report.md").read_text()
    assert "| metric | validated | after dedup | final |" in md
    assert "## Against the reference dataset (monoculture)" in md
    assert "| final | 0.92 | 2 | happy (67%) | 0.46x |" in md


def test_report_survives_empty_and_single_record_stages(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    one = records(FINAL_ROWS[:1])
    for final, final_emb in ((one.head(0), np.zeros((0, 4))), (pl.DataFrame(), np.zeros((0, 384)))):
        out_dir = tmp_path / f"run-{final.width}"
        inputs = ReportInputs(
            run_id="r", counts={}, validated=RecordSet(one, np.eye(4)[:1]), final=RecordSet(final, final_emb),
            rejects=pl.DataFrame(), cells=pl.DataFrame(), usage={},
        )  # fmt: skip
        report = write_report(spec, inputs, out_dir).to_dict()
        after, before = report["diversity"]["after"], report["diversity"]["before"]
        assert after["rows"] == 0 and after["vendi_score"] is None and after["self_bleu"] is None
        assert after["compression_ratio"] is None and after["calibration"] is None
        assert before["rows"] == 1 and before["vendi_score"] == pytest.approx(1.0) and before["self_bleu"] is None
        assert before["conceptual"]["reason"]
        assert report["figures"] == {"similarity": None, "embedding_map": None}
        assert report["attributes"]["job"]["after"]["n"] == 0
        json.loads((out_dir / "report.json").read_text(), parse_constant=_no_constants)
        assert "Too few records to draw" in (out_dir / "report.html").read_text()


def test_load_report_reference_samples_and_refuses_bad_columns(tmp_path: Path) -> None:
    assert load_report_reference(make_spec(tmp_path)) is None
    pl.DataFrame({"review": [f"text {i}" if i % 10 else None for i in range(40)], "feeling": ["happy"] * 40}).write_csv(
        tmp_path / "reviews.csv"
    )
    spec = make_spec(
        tmp_path,
        report={
            "reference": {"path": "reviews.csv", "text_field": "review", "fields": {"mood": "feeling"}, "max_rows": 10}
        },
    )
    sampled = load_report_reference(spec)
    assert sampled is not None and sampled.height == 10 and sampled.columns == ["text", "mood"]
    assert sampled["text"].null_count() == 0 and sampled.equals(load_report_reference(spec))  # seeded

    folder = tmp_path / "published"
    (folder / "data").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for name, n in (("data/a.parquet", 3), ("data/b.parquet", 2), (".cache/x.parquet", 5)):
        pl.DataFrame({"text": [f"{name} {i}" for i in range(n)]}).write_parquet(folder / name)
    from_folder = load_report_reference(make_spec(tmp_path, report={"reference": {"path": "published"}}))
    assert from_folder is not None and from_folder.height == 5  # hidden folders skipped

    bad = {
        "report.reference.text_field: .* has no column 'body'": {"path": "reviews.csv", "text_field": "body"},
        r"report.reference.fields.mood: .* has no column 'tone'": {
            "path": "reviews.csv", "text_field": "review", "fields": {"mood": "tone"}},
        r"report.reference.fields: \['colour'\] are not attributes": {
            "path": "reviews.csv", "text_field": "review", "fields": {"colour": "feeling"}},
        "report.reference.path: .* does not exist": {"path": "missing.parquet"},
    }  # fmt: skip
    for message, reference in bad.items():
        with pytest.raises(SpecError, match=message):
            load_report_reference(make_spec(tmp_path, report={"reference": reference}))
