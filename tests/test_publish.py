"""publish_local: a folder that `datasets` loads, a card whose YAML holds the configs, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import polars as pl
import pytest
import yaml
from huggingface_hub import DatasetCard

from polyculture.preflight import parse_spec
from polyculture.report.card import render_card
from polyculture.report.model import Report
from polyculture.report.write import RecordSet, ReportInputs, write_report
from polyculture.spec import BuildSpec
from polyculture.stages import publish
from polyculture.stages.publish import PublishError, dataset_folder_name, publish_local, record_fields, size_category
from polyculture.stages.rejects import rejects_frame

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "birth_year": {"type": "integer"},
        "height_m": {"type": "number"},
        "job": {"type": "string", "enum": ["doctor", "teacher"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "bio": {"type": ["string", "null"]},
    },
    "required": ["name", "birth_year", "job"],
}
COLUMNS = ["name", "birth_year", "height_m", "job", "tags", "bio", "_record_id", "_method", "_model",
           "_verbalized_probability"]  # fmt: skip


def spec_dict(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "people",
        "description": "Tiny fictional people, balanced over jobs.",
        "prompt": {"template": "Describe a {{ job }}."},
        "record": {"schema": "person.schema.json", "text_field": "bio"},
        "attributes": [{"name": "job", "values": ["doctor", "teacher"]}],
        "target_size": 3,
        "method": {"name": "vs_standard", "k": 4},
        "sampling": {"temperature": 0.9, "n": 2},
        **overrides,
    }


def make_spec(tmp_path: Path, **overrides: Any) -> BuildSpec:
    (tmp_path / "person.schema.json").write_text(json.dumps(SCHEMA))
    return parse_spec(spec_dict(**overrides), base_dir=tmp_path)


def final_frame() -> pl.DataFrame:
    # Keys deliberately out of schema order, and birth_year once as 1990.0 (valid JSON Schema integer).
    records: list[dict[str, Any]] = [
        {"bio": "Heals people.", "name": "Ana", "birth_year": 1980, "height_m": 1.7, "job": "doctor", "tags": ["a"]},
        {"name": "Bo", "birth_year": 1990.0, "height_m": 2, "job": "teacher", "tags": [], "bio": None},
        {"name": "Cy", "birth_year": 2001, "job": "doctor", "tags": ["b", "c"], "bio": "Teaches."},
    ]
    return pl.DataFrame(
        {
            "record_id": ["c0-i0", "c0-i1", "c1-i0"],
            "call_id": ["c0", "c0", "c1"],
            "cell_id": [0, 1, 0],
            "cell_key": ["job=doctor", "job=teacher", "job=doctor"],
            "item_index": [0, 1, 0],
            "method": ["vs_standard"] * 3,
            "model": ["smollm2-135m-instruct"] * 3,
            "verbalized_probability": [0.5, None, 0.25],
            "record_json": [json.dumps(r) for r in records],
            "text": [r["bio"] or "" for r in records],
            "job": [r["job"] for r in records],
        },
        schema_overrides={"verbalized_probability": pl.Float64},
    )


def report_dir(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    folder = tmp_path / "report"
    (folder / "plots").mkdir(parents=True)
    report = {
        "run_id": "run-7",
        "spec_fingerprint": "f" * 64,
        "headline": {"records": 3, "target_size": 3, "semantic_diversity_after": 41.25, "rejects": 2},
    }
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "report.md").write_text("# Diversity report: people\n\n| stage | records |\n|---|---:|\n| final | 3 |\n"
                                      "\n![job](plots/attribute_job.png)\n")  # fmt: skip
    (folder / "plots" / "attribute_job.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return report, folder


def card_body(spec: BuildSpec, report: dict[str, Any], rdir: Path, final: pl.DataFrame) -> str:
    """The card body a build hands publish_local: the (hand-made) report and the report.md beside it."""
    model = Report.from_dict(report, partial=True)
    return render_card(model, spec, record_fields(spec, final), final.height, (rdir / "report.md").read_text())


def test_publish_loads_with_datasets(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    report, rdir = report_dir(tmp_path)
    out = tmp_path / "published" / "people"
    assert publish_local(spec, final_frame(), card_body(spec, report, rdir, final_frame()), rdir, out) == out

    assert (out / "data" / "train-00000-of-00001.parquet").is_file()
    for name in ("README.md", "report.json", "report.md", "plots/attribute_job.png"):
        assert (out / name).is_file(), name
    assert (out / "report.json").read_text() == (rdir / "report.json").read_text()

    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf-cache"))
    assert list(ds) == ["train"]  # report.json / report.md are not picked up as data
    train = ds["train"]
    assert train.num_rows == 3
    assert train.column_names == COLUMNS
    features = train.features
    assert features["birth_year"].dtype == "int64"
    assert features["height_m"].dtype == "float64"
    assert features["name"].dtype == "string"
    assert features["_verbalized_probability"].dtype == "float64"
    assert train["birth_year"] == [1980, 1990, 2001]
    assert train["height_m"] == [1.7, 2.0, None]
    assert train["tags"] == [["a"], [], ["b", "c"]]
    assert train["bio"] == ["Heals people.", None, "Teaches."]
    assert train["_record_id"] == ["c0-i0", "c0-i1", "c1-i0"]
    assert train["_verbalized_probability"] == [0.5, None, 0.25]
    assert train["_method"] == ["vs_standard"] * 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["people"]  # no staging folder left


def _front_matter(readme: Path) -> dict[str, Any]:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_yaml_defaults_and_body(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    report, rdir = report_dir(tmp_path)
    out = publish_local(spec, final_frame(), card_body(spec, report, rdir, final_frame()), rdir, tmp_path / "people")
    meta = _front_matter(out / "README.md")
    assert meta == {
        "annotations_creators": ["machine-generated"],
        "language_creators": ["machine-generated"],
        "language": ["en"],
        "license": "other",
        "multilinguality": "monolingual",
        "size_categories": ["n<1K"],
        "source_datasets": ["original"],
        "task_categories": ["text-generation"],
        "pretty_name": "people",
        "tags": ["synthetic", "polyculture", "verbalized-sampling"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    }
    card = DatasetCard.load(out / "README.md")
    assert card.data.to_dict() == meta  # what huggingface_hub reads back is what was meant
    body = card.text
    assert "Tiny fictional people, balanced over jobs." in body
    assert "smollm2-135m-instruct" in body and "vllm" in body
    assert "Verbalized Sampling, k=4" in body and "temperature 0.9" in body
    assert "| semantic diversity after | 41.250 |" in body
    assert "## Diversity by stage" not in body  # this report has no per-stage figures
    assert 'load_dataset("path/or/repo_id", split="train")' in body
    assert "## Diversity report: people" in body  # report.md embedded, headings demoted under the card title
    assert "![job](plots/attribute_job.png)" in body


def test_card_metadata_follows_the_spec(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        method={"name": "direct"},
        prompt={"template": "Describe a {{ job }}. Answer as ```json``` only."},  # a fence inside the spec
        publish={
            "license": "cc-by-4.0",
            "language": ["en", "fr"],
            "task_categories": ["text-generation", "question-answering"],
            "tags": ["biographies", "synthetic"],
            "hub": {"repo_id": "alice/people"},
        },
    )
    report, rdir = report_dir(tmp_path)
    report["diversity"] = {
        "before": {"rows": 9, "distinct_2": 0.5, "semantic_diversity": 30.0},
        "after": {"rows": 3, "distinct_2": 0.75, "semantic_diversity": 41.25},
    }
    out = publish_local(spec, final_frame(), card_body(spec, report, rdir, final_frame()), rdir, tmp_path / "people")
    meta = _front_matter(out / "README.md")
    assert meta["license"] == "cc-by-4.0"
    assert meta["language"] == ["en", "fr"] and meta["multilinguality"] == "multilingual"
    assert meta["task_categories"] == ["text-generation", "question-answering"]
    assert meta["tags"] == ["synthetic", "polyculture", "biographies"]  # no duplicate, no VS tag for direct
    assert DatasetCard.load(out / "README.md").data.to_dict() == meta

    body = DatasetCard.load(out / "README.md").text
    assert 'load_dataset("alice/people", split="train")' in body
    assert "| stage | rows | distinct 2 | semantic diversity |" in body
    assert "| before | 9 | 0.500 | 30.000 |" in body and "| after | 3 | 0.750 | 41.250 |" in body
    # The spec block is the resolved spec, parseable back to the same values; the record schema follows it.
    spec_block = body.split("````yaml\n")[1].split("\n````")[0]
    assert yaml.safe_load(spec_block) == spec.model_dump(mode="json", by_alias=True)
    schema_block = body.split("```json\n")[1].split("\n```")[0]
    assert json.loads(schema_block) == SCHEMA
    # Still a dataset folder `datasets` loads, YAML additions and all.
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 3 and ds.column_names == COLUMNS


def test_refuses_non_empty_folder_and_accepts_empty_one(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    report, rdir = report_dir(tmp_path)
    root = tmp_path / "out"
    taken = root / "people"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(PublishError, match="already exists and is not empty"):
        publish_local(spec, final_frame(), card_body(spec, report, rdir, final_frame()), rdir, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    empty = root / "empty"
    empty.mkdir()
    publish_local(spec, final_frame(), card_body(spec, report, rdir, final_frame()), rdir, empty)
    assert (empty / "README.md").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["empty", "people"]


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec(tmp_path)
    report, rdir = report_dir(tmp_path)
    card = card_body(spec, report, rdir, final_frame())
    root = tmp_path / "out"
    root.mkdir()

    def broken_card(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(publish, "dataset_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        publish_local(spec, final_frame(), card, rdir, root / "people")
    assert list(root.iterdir()) == []

    monkeypatch.undo()
    (rdir / "report.md").unlink()
    with pytest.raises(PublishError, match="report.md"):
        publish_local(spec, final_frame(), card, rdir, root / "people")
    assert list(root.iterdir()) == []


def test_bad_record_is_refused_naming_it(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    report, rdir = report_dir(tmp_path)
    frame = final_frame().with_columns(
        pl.when(pl.col("record_id") == "c1-i0")
        .then(pl.lit(json.dumps({"name": "Cy", "birth_year": "2001", "job": "doctor"})))
        .otherwise(pl.col("record_json"))
        .alias("record_json")
    )
    with pytest.raises(PublishError, match=r"record c1-i0, field 'birth_year': expected an integer"):
        publish_local(spec, frame, card_body(spec, report, rdir, frame), rdir, tmp_path / "people")
    assert not (tmp_path / "people").exists()


def test_publish_after_real_report(tmp_path: Path) -> None:
    # write_report -> publish_local with no rejects and no cells (empty frames): real PNG plots travel along.
    spec = make_spec(tmp_path)
    final = final_frame()
    rdir = tmp_path / "run" / "report"
    inputs = ReportInputs(
        run_id="run-8", counts={"planned": 3, "final": 3}, validated=RecordSet(final, np.eye(3)),
        final=RecordSet(final, np.eye(3)), rejects=rejects_frame(), cells=pl.DataFrame(), usage={},
    )  # fmt: skip
    model = write_report(spec, inputs, rdir)
    report = model.to_dict()
    assert report["attributes"]["job"]["target_counts"] == {"doctor": 2, "teacher": 1}
    out = publish_local(spec, final, render_card(model, spec, record_fields(spec, final), final.height), rdir,
                        tmp_path / "people")  # fmt: skip
    assert (out / "plots" / "attribute_job.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = DatasetCard.load(out / "README.md")
    assert "![job: target vs final share](plots/attribute_job.png)" in card.text
    assert "| semantic diversity after | 100.000 |" in card.text
    assert json.loads((out / "report.json").read_text()) == report


def test_size_categories() -> None:
    assert size_category(0) == "n<1K"
    assert size_category(999) == "n<1K"
    assert size_category(1_000) == "1K<n<10K"
    assert size_category(250_000) == "100K<n<1M"
    assert size_category(2_000_000_000) == "n>1B"


def test_two_runs_load_their_own_rows(tmp_path: Path) -> None:
    # datasets caches a local folder by its basename and config name only: runs must not share a folder name.
    spec = make_spec(tmp_path)
    report, rdir = report_dir(tmp_path)
    cache = str(tmp_path / "hf-cache")
    first = publish_local(spec, final_frame(), card_body(spec, report, rdir, final_frame()), rdir,
                          tmp_path / "a" / dataset_folder_name("people", "run-1"))  # fmt: skip
    second = publish_local(
        spec,
        final_frame()[:1],
        card_body(spec, report, rdir, final_frame()[:1]),
        rdir,
        tmp_path / "b" / dataset_folder_name("people", "run-2"),
    )
    assert first.name != second.name
    assert datasets.load_dataset(str(first), split="train", cache_dir=cache).num_rows == 3
    assert datasets.load_dataset(str(second), split="train", cache_dir=cache).num_rows == 1
