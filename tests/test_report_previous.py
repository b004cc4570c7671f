"""report.previous: the "since the previous release" section over a fixture run folder (a finished run as a build
writes it: report.json, result.json, validated.parquet, the published parquet), and the refusal of a bad path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_report import FINAL_ROWS, make_spec, records, run_report

from polyculture.report.model import Report
from polyculture.report.previous import load_previous_release, locate_previous_run
from polyculture.report.write import RecordSet, ReportInputs, write_report
from polyculture.spec import SpecError


def previous_run(tmp_path: Path) -> Path:
    """tmp_path/outputs/people/<run id>: a finished run of the `people` spec with FINAL_ROWS published."""
    report, report_dir = run_report(tmp_path)
    run_dir = tmp_path / "outputs" / "people" / "20260101-000000-aaaaaaaa"
    (run_dir / f"people-{run_dir.name}" / "data").mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(report))
    (run_dir / "result.json").write_text(json.dumps({"run_id": run_dir.name}))
    records(FINAL_ROWS + [("Zed", "teacher", "sad", "never published")]).write_parquet(run_dir / "validated.parquet")
    published = records(FINAL_ROWS).select(pl.col("record_id").alias("_record_id"), "job", "mood", "text")
    published.write_parquet(run_dir / f"people-{run_dir.name}" / "data" / "train-00000-of-00001.parquet")
    return run_dir


def test_since_previous_release_table(tmp_path: Path) -> None:
    before = previous_run(tmp_path)
    spec = make_spec(tmp_path, report={"previous": "auto"})
    root = tmp_path / "outputs" / "people"
    current = root / "20260102-000000-bbbbbbbb"
    current.mkdir()  # unfinished, and the current run in any case: never its own previous release
    assert locate_previous_run(spec, root, current) == before.resolve()
    assert locate_previous_run(make_spec(tmp_path), root, current) is None  # report.previous unset
    previous = load_previous_release(before)
    assert previous.records["record_id"].to_list() == ["c0-0", "c1-0", "c2-0", "c3-0"]  # published only
    old = np.eye(4, 6, dtype=np.float32)  # previous texts' vectors
    # now: the first two records repeat previous ones (same vectors), three are new directions, one of them close
    new_rows = [*FINAL_ROWS[:2], ("Xi", "teacher", "happy", "x y"), ("Yu", "teacher", "sad", "z w")]
    new = np.vstack([old[:2], np.eye(6, dtype=np.float32)[4:6]])
    report = write_report(
        spec,
        ReportInputs(
            run_id=current.name,
            counts={"final": 4},
            validated=RecordSet(records(new_rows), new),
            final=RecordSet(records(new_rows), new),
            rejects=pl.DataFrame(),
            cells=pl.DataFrame(),
            usage={},
            previous=(previous, old),
        ),
        current,
    )
    since = report.previous
    assert since is not None and since.run_id == before.name
    assert (since.records_then, since.records_now, since.near_previous) == (4, 4, 2)
    assert since.near_previous_share == 0.5 and since.threshold == spec.dedup.threshold
    rows = {row.figure: row for row in since.rows}
    diversity = rows["semantic diversity (0-100, higher is more diverse)"]
    assert diversity.previous == pytest.approx(100.0) and diversity.current == pytest.approx(100.0)
    mood = rows["mood: coverage of its values"]
    assert (mood.previous, mood.current) == (1.0, 1.0)
    job = rows["job: normalised entropy"]  # 3 doctors + 1 teacher then, 2 + 2 now: entropy rose
    assert job.change is not None and job.change > 0 and job.change == pytest.approx(job.current - job.previous)
    # every rendering carries it, and report.json reads back
    md = (current / "report.md").read_text()
    assert "## Since the previous release" in md and "2 of the 4 new records (50.0%)" in md
    assert "| job: normalised entropy |" in md
    html = (current / "report.html").read_text()
    assert 'id="previous"' in html and "Since the previous release" in html
    data = json.loads((current / "report.json").read_text())
    assert data["previous"]["near_previous"] == 2
    assert Report.from_dict(data).previous == since
    from polyculture.report.card import render_card

    card = render_card(report, spec, ["name", "bio"], 4)
    assert "since the previous release" in card and "## Since the previous release" in card


def test_a_bad_previous_path_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"report\.previous: 'nowhere' is not a finished run folder"):
        make_spec(tmp_path, report={"previous": "nowhere"})
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "report.json").write_text("{}")
    with pytest.raises(SpecError, match=r"report\.previous: 'half' is not a finished run folder"):
        make_spec(tmp_path, report={"previous": "half"})
    finished = previous_run(tmp_path)
    spec = make_spec(tmp_path, report={"previous": str(finished)})  # a finished run folder passes
    assert locate_previous_run(spec, tmp_path, None) == finished.resolve()
    # a finished folder whose published data is gone is refused when read, naming the field too
    (finished / "validated.parquet").unlink()
    with pytest.raises(SpecError, match=r"report\.previous: cannot read the previous release"):
        load_previous_release(finished)
