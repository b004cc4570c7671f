"""The report's Quality section on a hand-made run: the real quality stage over a score cache (no model), then
write_report and the dataset card; every figure checked against numbers worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image
from test_report import VALIDATED_ROWS, make_spec, records

from polyculture.report.card import render_card
from polyculture.report.model import Report
from polyculture.report.write import RecordSet, ReportInputs, write_report
from polyculture.stages.quality import QualityResult, quality

CHECKS = [
    # gated, relative: the lowest quarter of this run's scores fails
    {"name": "fluent", "kind": "fluency", "quantile": 0.25},
    # informational, absolute
    {"name": "clear", "kind": "fluency", "threshold": -3.5, "gate": False},
]
# (fluent, clear) mean token log-probs of the 5 records dedup kept (c5 was a duplicate); None: c4 could not be scored.
SCORES = {"c0-0": (-3.0, -3.0), "c1-0": (-4.0, -5.0), "c2-0": (-2.0, -1.0), "c3-0": (-6.0, -2.0), "c4-0": (None, None)}
# Validated c0..c5 on unit vectors: c0, c2 and c5 share e0.
VALIDATED_EMB = np.eye(4, dtype=np.float32)[[0, 1, 0, 2, 3, 0]]


def stage_result(spec: Any) -> QualityResult:
    """The quality stage on the deduplicated records c0..c4, every score already in its cache (so no engine)."""
    validated = records(VALIDATED_ROWS)
    known = {}
    for record_id, values in SCORES.items():
        for check, score in zip(("fluent", "clear"), values, strict=True):
            known[(check, record_id)] = (score, None, None) if score is not None else (None, False, "text is empty")
    return quality(validated.head(5), VALIDATED_EMB[:5], spec.quality, engine=None, known=known)


def build(tmp_path: Path) -> tuple[Any, QualityResult, dict[str, Any], Path]:
    spec = make_spec(tmp_path, quality=CHECKS)
    result = stage_result(spec)
    validated = records(VALIDATED_ROWS)
    pool = RecordSet(result.records, result.embeddings)  # c0, c1, c2: c3 and c4 failed the gated check
    out_dir = tmp_path / "run"
    inputs = ReportInputs(
        run_id="q1", counts={"valid": 6, "after_semantic_dedup": 5, "after_quality": 3, "final": 3},
        validated=RecordSet(validated, VALIDATED_EMB), pool=pool, final=pool,
        rejects=result.rejects, cells=pl.DataFrame(), usage={}, quality=result,
    )  # fmt: skip
    report = write_report(spec, inputs, out_dir)
    return spec, result, report, out_dir


def test_quality_stage_over_the_cache_gives_the_inputs_the_report_reads(tmp_path: Path) -> None:
    result = stage_result(make_spec(tmp_path, quality=CHECKS))
    # quantile 0.25 of (-6, -4, -3, -2) = -6 + 0.75 * 2
    assert [(c.name, c.threshold) for c in result.counts] == [("fluent", -4.5), ("clear", -3.5)]
    assert result.records["record_id"].to_list() == ["c0-0", "c1-0", "c2-0"]
    assert result.records["_quality"].to_list() == [True, False, True]  # c1 fails the informational check


def test_report_quality_figures(tmp_path: Path) -> None:
    _, _, model, out_dir = build(tmp_path)
    report = json.loads((out_dir / "report.json").read_text())
    assert report == model.to_dict() and Report.from_dict(report) == model  # the typed model reads it back
    q = report["quality"]
    # c0 and c2 pass both checks, of the 5 checked
    assert (q["checked"], q["passed"], q["pass_rate"]) == (5, 2, pytest.approx(0.4))
    fluent, clear = q["checks"]
    assert (fluent["kind"], fluent["gate"], fluent["quantile"], fluent["threshold"]) == ("fluency", True, 0.25, -4.5)
    assert (clear["gate"], clear["quantile"], clear["threshold"]) == (False, None, -3.5)
    assert (fluent["checked"], fluent["scored"], fluent["passed"]) == (5, 4, 3)  # c4 unscored counts as failed
    assert fluent["pass_rate"] == pytest.approx(0.6) and clear["pass_rate"] == pytest.approx(0.6)  # c0, c2, c3
    # by stage: the mean over the scored records of each stage
    assert fluent["stages"]["before"] == {"checked": 5, "passed": 3, "pass_rate": 0.6, "mean_score": -3.75}
    assert fluent["stages"]["after"] == {"checked": 3, "passed": 3, "pass_rate": 1.0, "mean_score": -3.0}
    assert clear["stages"]["after"]["pass_rate"] == pytest.approx(2 / 3) and clear["stages"]["after"]["mean_score"] == -3.0
    # by cell: c0, c1, c2, c4 are doctors, c3 a teacher
    assert fluent["by_cell"] == {
        "job=doctor": {"checked": 4, "passed": 3, "pass_rate": 0.75},
        "job=teacher": {"checked": 1, "passed": 0, "pass_rate": 0.0},
    }
    assert clear["by_cell"]["job=doctor"]["passed"] == 2 and clear["by_cell"]["job=teacher"]["pass_rate"] == 1.0
    # the scored records in order, with their texts; the unscored one is in neither list
    assert [(e["record_id"], e["score"], e["passed"]) for e in fluent["lowest"]] == [
        ("c3-0", -6.0, False), ("c1-0", -4.0, True), ("c0-0", -3.0, True), ("c2-0", -2.0, True),
    ]  # fmt: skip
    assert [e["record_id"] for e in fluent["highest"]] == ["c2-0", "c0-0", "c1-0", "c3-0"]
    assert fluent["lowest"][0]["text"] == "g h" and fluent["lowest"][0]["cell_key"] == "job=teacher"

    headline = report["headline"]
    assert headline["quality_pass_rate"] == pytest.approx(0.4)
    assert headline["quality_pass_rate_after"] == pytest.approx(2 / 3)  # c1 was kept though it failed `clear`
    assert headline["quality_mean_score_before"] == {"fluent": -3.75, "clear": -2.75}
    assert headline["quality_mean_score_after"] == {"fluent": -3.0, "clear": -3.0}

    # Diversity over passing records: validated c0, c2 (both e0) and final c0, c2 are one point twice, while all
    # final records (e0, e1, e0) have 2 of 3 pairs orthogonal. Quality here costs diversity, and the report shows it.
    div, passing = report["diversity"], q["diversity"]
    assert passing["before"]["rows"] == 2 and passing["after"]["rows"] == 2
    assert passing["before"]["semantic_diversity"] == pytest.approx(0.0)
    assert div["after"]["semantic_diversity"] == pytest.approx(200 / 3)
    assert passing["after"]["semantic_diversity"] == pytest.approx(0.0)
    assert passing["before"]["distinct_1"] == pytest.approx(1.0)  # "a b", "e f"
    assert passing["after_dedup"] == passing["after"]

    assert fluent["histogram"] == "plots/quality_fluent.png"
    with Image.open(out_dir / "plots" / "quality_fluent.png") as image:
        assert image.format == "PNG" and image.width > 500


def test_report_quality_markdown_and_html(tmp_path: Path) -> None:
    _, _, _, out_dir = build(tmp_path)
    md = (out_dir / "report.md").read_text()
    assert "Quality: 40.0% of the checked records passed every check; mean score validated -> final: " in md
    assert "`fluent` -3.750 -> -3.000 (+0.750), `clear` -2.750 -> -3.000 (-0.250)." in md
    assert "## Quality" in md and "2 of 5 checked records (40.0%) passed every check" in md
    assert "| fluent | fluency | yes | quantile 0.25 = -4.500 | 5 | 3 | 60.0% | -3.750 | -3.000 | +0.750 |" in md
    assert "| clear | fluency | no (informational) | >= -3.500 | 5 | 3 | 60.0% | -2.750 | -3.000 | -0.250 |" in md
    assert "| cell | fluent | clear |" in md and "| job=teacher | 0% (0/1) | 100% (1/1) |" in md
    assert "| metric | validated | validated, passing | after dedup | after dedup, passing | final | final, passing |" in md
    assert "| records | 6 | 2 | 3 | 2 | 3 | 2 |" in md
    assert "| lowest | -6.000 | no | job=teacher | g h |" in md and "| highest | -2.000 | yes | job=doctor | e f |" in md
    assert "![quality scores: fluent](plots/quality_fluent.png)" in md
    html = (out_dir / "report.html").read_text()
    assert '<section id="quality">' in html and 'href="#quality"' in html
    assert 'id="headline-quality">40.0%' in html
    assert "quantile 0.25 = -4.500" in html and "job=teacher" in html
    assert html.count('src="data:image/png;base64,') == 6  # 2 attributes, similarity, map and one per check


def test_card_lists_the_checks(tmp_path: Path) -> None:
    spec, _, report, _ = build(tmp_path)
    card = render_card(report, spec, ["name", "age", "job", "mood", "bio"], 3)
    assert "## Quality checks" in card
    assert "| `fluent` | fluency | yes | quantile 0.25 of this run = -4.500 | 5 | 60.0% | 100.0% | -3.000 |" in card
    assert "| `clear` | fluency | no | >= -3.500 | 5 | 60.0% | 66.7% | -3.000 |" in card
    assert "| quality pass rate | 0.400 |" in card and "| quality mean score before: fluent | -3.750 |" in card


def test_no_checks_no_section_and_checks_need_scores(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    frame = records(VALIDATED_ROWS)
    inputs = ReportInputs(
        run_id="q0", counts={}, validated=RecordSet(frame, VALIDATED_EMB), final=RecordSet(frame, VALIDATED_EMB),
        rejects=pl.DataFrame(), cells=pl.DataFrame(), usage={},
    )  # fmt: skip
    report = write_report(spec, inputs, tmp_path / "plain")
    data = report.to_dict()
    assert "quality" not in data and not any(k.startswith("quality") for k in data["headline"])
    assert "## Quality" not in (tmp_path / "plain" / "report.md").read_text()
    assert 'id="quality"' not in (tmp_path / "plain" / "report.html").read_text()
    card = render_card(report, spec, ["bio"], 6)
    assert "Quality checks" not in card and "quality pass rate" not in card
    with pytest.raises(ValueError, match="ReportInputs.quality"):
        write_report(make_spec(tmp_path, quality=CHECKS), inputs, tmp_path / "missing")
