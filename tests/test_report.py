"""write_report on a tiny hand-made run: files, figures, strict JSON, real PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image

from polyculture.spec import BuildSpec, parse_spec
from polyculture.stages.report import write_report

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


def make_spec(tmp_path: Path) -> BuildSpec:
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
        schema={"record_id": pl.String, "call_id": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String},
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
        run_id="run-1",
        counts=counts,
        validated=records(VALIDATED_ROWS),
        validated_embeddings=validated_emb,
        final=records(FINAL_ROWS),
        final_embeddings=final_emb,
        rejects=rejects,
        cells=cells,
        usage={"generated_tokens": 1234, "generation_seconds": 2.5, "tokens_per_second": float("nan")},
        out_dir=out_dir,
    )
    return report, out_dir


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
        write_report(
            spec, run_id="r", counts={}, validated=frame, validated_embeddings=np.eye(3), final=frame,
            final_embeddings=np.eye(4), rejects=pl.DataFrame(), cells=pl.DataFrame(), usage={}, out_dir=tmp_path / "o",
        )  # fmt: skip
