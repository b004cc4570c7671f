"""The CLI as a user runs it: --help, bad specs refused with the field named, and a real build with --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import yaml
from conftest import PROJECT, small_spec_dict

CLI = [sys.executable, "-m", "polyculture.cli"]


def _run(*args, cwd=None, timeout=900):
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"] + "-cli"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("build", "check", "schema", "models"):
        assert command in out.stdout
    build_help = _run("build", "--help").stdout
    assert "--json" in build_help and "--run-id" in build_help


def test_check_prints_the_plan_as_json():
    out = _run("check", str(PROJECT / "configs" / "biographies.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["cells"] == 48 and sum(cell["quota"] for cell in summary["plan"]) == summary["target_size"] == 120


def test_bad_spec_refused_naming_the_field(spec_dir):
    path = spec_dir / "bad.yaml"
    path.write_text(yaml.safe_dump(small_spec_dict(sampling={"temperature": -1}, colour="red")))
    out = _run("build", str(path))
    assert out.returncode == 2
    assert "sampling.temperature" in out.stderr and "colour: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_uncached_hub_model_refused_before_any_work(spec_dir):
    path = spec_dir / "hub.yaml"
    path.write_text(yaml.safe_dump(small_spec_dict(model={"name": "someone/not-cached"})))
    out = _run("build", str(path))
    assert out.returncode == 3
    assert "not in the local Hugging Face cache" in out.stderr and "Traceback" not in out.stderr


def test_schema_command_matches_the_shipped_file():
    out = _run("schema")
    assert json.loads(out.stdout) == json.loads((PROJECT / "schemas" / "build-spec.schema.json").read_text())


def test_build_json(spec_dir, tmp_path):
    path = spec_dir / "direct.yaml"
    path.write_text(yaml.safe_dump(small_spec_dict(sampling={"max_tokens": 100, "n": 2})))
    out = _run("build", str(path), "--json", "--run-id", "cli-run", "--output-dir", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["run_id"] == "cli-run" and result["dataset_dir"].startswith(str(tmp_path / "runs"))
    assert os.path.isfile(result["report_md"]) and os.path.isfile(result["report_json"])
    assert datasets.load_dataset(result["dataset_dir"], split="train").num_rows == result["records"] > 0


def test_index_writes_a_reference_a_spec_can_use(spec_dir, tmp_path, private_cache):
    import polars as pl

    source = tmp_path / "corpus.jsonl"
    pl.DataFrame({"id": ["a", "b", "c"], "body": ["A doctor in Lagos.", "", "A farmer in Peru."]}).write_ndjson(source)
    out = _run("index", str(source), str(tmp_path / "ref"), "--text-field", "body", "--id-field", "id", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["records"] == 2  # the empty text is skipped
    assert pl.read_parquet(tmp_path / "ref" / "entries.parquet")["record_id"].to_list() == ["a", "c"]
    # a spec naming it passes validation; a folder that is not a reference is refused naming the field
    good = spec_dir / "good.yaml"
    good.write_text(yaml.safe_dump(small_spec_dict(dedup={"reference": [str(tmp_path / "ref")]})))
    assert _run("check", str(good)).returncode == 0
    bad = spec_dir / "bad.yaml"
    bad.write_text(yaml.safe_dump(small_spec_dict(dedup={"reference": [str(tmp_path)]})))
    refused = _run("check", str(bad))
    assert refused.returncode == 2 and "dedup.reference" in refused.stderr and "not a reference index" in refused.stderr
    missing = _run("index", str(source), str(tmp_path / "ref2"), "--text-field", "nope")
    assert missing.returncode == 2 and "no column 'nope'" in missing.stderr


def test_one_exit_code_table_names_real_exceptions():
    import importlib

    from polyculture.cli.errors import EXIT_CODES, exit_code_for
    from polyculture.hub import push

    for key in EXIT_CODES:
        module, name = key.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception) and f"{cls.__module__}.{cls.__qualname__}" == key
    hub_errors = [push.HubError, *push.HubError.__subclasses__()]
    assert all(exit_code_for(cls("x")) == cls.exit_code for cls in hub_errors)
    assert exit_code_for(ValueError("not a failure the commands report")) is None


def test_bad_quality_check_refused_before_any_model_time(spec_dir):
    path = spec_dir / "quality.yaml"
    check = {"name": "graded", "kind": "python", "function": "no_such_grader_module:grade"}
    path.write_text(yaml.safe_dump(small_spec_dict(quality=[check])))
    out = _run("build", str(path))
    assert out.returncode == 2
    assert "quality.0.function: module 'no_such_grader_module' not found" in out.stderr
    assert "Traceback" not in out.stderr and "load model" not in out.stderr


def test_an_error_message_with_brackets_is_printed_as_written(capfd):
    """A message quoting a path like '[/path]' is text, not rich markup (which failed on it and hid the error)."""
    import pytest
    import typer

    from polyculture.cli.errors import fail

    with pytest.raises(typer.Exit) as exited:
        fail("report.previous: '/tmp/x[/path]' is not a finished run folder")
    assert exited.value.exit_code == 2
    assert "report.previous: '/tmp/x[/path]' is not a finished run folder" in capfd.readouterr().err
