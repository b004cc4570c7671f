"""A run folder is self-contained: the resolved spec written into it (record schema copied beside it, the other files
it names as absolute paths) checks from any working folder with the fingerprint and plan of the spec as written, and
a build started from it finds the runs of the original spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SMALL_SCHEMA, small_spec_dict

from polyculture.index.releases import write_release_index
from polyculture.preflight import load_spec
from polyculture.runs.folders import hold_run, unfinished_runs
from polyculture.runs.resolved import versions, write_run_spec
from polyculture.spec import SpecError

CLI = [sys.executable, "-m", "polyculture.cli"]


def _check(spec_path: Path, cwd: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"] + "-cli"}
    done = subprocess.run(
        [*CLI, "check", str(spec_path), "--json"], capture_output=True, text=True, cwd=cwd, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project as users lay it out: specs in configs/, the schema, an adapter, a reference index and a reference
    dataset each in a folder of its own, all named by paths relative to the spec."""
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / "schemas").mkdir()
    (root / "schemas" / "people.json").write_text(json.dumps(SMALL_SCHEMA, indent=4))
    (root / "adapters" / "tiny-lora").mkdir(parents=True)
    (root / "adapters" / "tiny-lora" / "adapter_config.json").write_text("{}")
    vectors = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
    write_release_index(root / "refs" / "v1", ["a", "b"], ["one text", "another text"], vectors,
                        embedding_model="minilm-l6", source="v1")  # fmt: skip
    (root / "data").mkdir()
    (root / "data" / "people.jsonl").write_text('{"text": "a person"}\n{"text": "another person"}\n')
    spec = small_spec_dict(
        record={"schema": "../schemas/people.json"},
        model={"adapter": "../adapters/tiny-lora"},
        dedup={"reference": ["../refs/v1"]},
        report={"reference": {"path": "../data/people.jsonl"}},
    )
    (root / "configs" / "people.yaml").write_text("# our people\n" + yaml.safe_dump(spec, sort_keys=False))
    return root


def test_the_resolved_spec_of_a_run_checks_from_anywhere_with_the_same_fingerprint(project, tmp_path):
    spec_path = project / "configs" / "people.yaml"
    spec = load_spec(spec_path)
    run_dir = tmp_path / "out" / spec.name / "run-1"
    with hold_run(run_dir, spec):
        write_run_spec(spec, spec_path, run_dir)

    assert (run_dir / "spec.yaml").read_text() == spec_path.read_text()  # as written, byte for byte
    assert json.loads((run_dir / "record.schema.json").read_text()) == SMALL_SCHEMA
    resolved = yaml.safe_load((run_dir / "spec.resolved.yaml").read_text())
    assert resolved["record"]["schema"] == "record.schema.json"
    assert resolved["model"]["adapter"] == str(project / "adapters" / "tiny-lora")
    assert resolved["dedup"]["reference"] == [str(project / "refs" / "v1")]
    assert resolved["report"]["reference"]["path"] == str(project / "data" / "people.jsonl")
    resolved_keys = ("record", "model", "dedup", "report")
    written = yaml.safe_load(spec_path.read_text())
    assert {k: v for k, v in resolved.items() if k not in resolved_keys} == {
        k: v for k, v in written.items() if k not in resolved_keys
    }
    builds = json.loads((run_dir / "versions.json").read_text())["builds"]
    assert builds == [versions()] and {"transformers", "torch"} <= set(builds[0]["packages"])

    # The spec as written no longer resolves from the run folder; the resolved one does, from any working folder.
    with pytest.raises(SpecError, match="not found"):
        load_spec(run_dir / "spec.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    original = _check(spec_path, cwd=project)
    from_run = _check(run_dir / "spec.resolved.yaml", cwd=elsewhere)
    assert from_run == original and from_run["fingerprint"] == spec.fingerprint()
    rerun = load_spec(run_dir / "spec.resolved.yaml")
    assert rerun.fingerprint() == spec.fingerprint() and rerun.model.label == spec.model.label
    assert rerun.record_schema == spec.record_schema and rerun.located_files == spec.located_files
    # a build of the resolved spec finds this unfinished run of the original spec: it resumes it
    assert unfinished_runs(run_dir.parent, rerun) == ["run-1"]

    # Building from the run folder's own resolved spec leaves every file as it was.
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    write_run_spec(rerun, run_dir / "spec.resolved.yaml", run_dir)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_the_fingerprint_counts_the_schema_by_content_and_files_by_where_they_are(project):
    spec_path = project / "configs" / "people.yaml"
    spec = load_spec(spec_path)
    data = yaml.safe_load(spec_path.read_text())
    # The same spec moved to another folder of the project, its paths rewritten to reach the same files: the same.
    (project / "configs" / "deeper").mkdir()
    moved = project / "configs" / "deeper" / "people.yaml"
    moved.write_text(yaml.safe_dump(_prefixed(data, "../")))
    assert load_spec(moved).fingerprint() == spec.fingerprint()
    # Another schema content, or another adapter folder: another fingerprint.
    (project / "schemas" / "people.json").write_text(json.dumps(SMALL_SCHEMA | {"title": "people"}))
    assert load_spec(spec_path).fingerprint() != spec.fingerprint()
    (project / "schemas" / "people.json").write_text(json.dumps(SMALL_SCHEMA))
    (project / "adapters" / "other-lora").mkdir()
    (project / "adapters" / "other-lora" / "adapter_config.json").write_text("{}")
    data["model"]["adapter"] = "../adapters/other-lora"
    spec_path.write_text(yaml.safe_dump(data))
    assert load_spec(spec_path).fingerprint() != spec.fingerprint()


def test_a_run_started_before_paths_were_located_is_still_resumed(project, tmp_path):
    spec = load_spec(project / "configs" / "people.yaml")
    run_dir = tmp_path / "out" / spec.name / "old-run"
    run_dir.mkdir(parents=True)
    legacy = spec.fingerprint(paths_as_written=True)
    assert legacy != spec.fingerprint()
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": legacy, "started": "2025-01-01T00:00:00+00:00"}))
    assert unfinished_runs(run_dir.parent, spec) == ["old-run"]
    with hold_run(run_dir, spec) as resumed:
        assert resumed


def _prefixed(data: dict, prefix: str) -> dict:
    data = json.loads(json.dumps(data))
    data["record"]["schema"] = prefix + data["record"]["schema"]
    data["model"]["adapter"] = prefix + data["model"]["adapter"]
    data["dedup"]["reference"] = [prefix + p for p in data["dedup"]["reference"]]
    data["report"]["reference"]["path"] = prefix + data["report"]["reference"]["path"]
    return data
