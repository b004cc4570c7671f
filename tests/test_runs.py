"""Run folders: which unfinished run a re-run resumes, one live build per folder, no mixing of two specs."""

from __future__ import annotations

import json

import pytest
from conftest import small_spec_dict

from polyculture.preflight import parse_spec
from polyculture.runs.folders import RESULT_FILE, RunBusy, hold_run, new_run_id, unfinished_runs


def _spec(spec_dir, **overrides):
    return parse_spec(small_spec_dict(**overrides), base_dir=spec_dir)


def test_a_dead_unfinished_run_of_the_same_spec_is_found_newest_first(spec_dir, tmp_path):
    spec, other = _spec(spec_dir), _spec(spec_dir, seed=99)
    root = tmp_path / "runs"
    for run_id in ("old", "new"):
        with hold_run(root / run_id, spec) as resumed:
            assert resumed is False
    with hold_run(root / "finished", spec):
        (root / "finished" / RESULT_FILE).write_text("{}")
    with hold_run(root / "other-spec", other):
        pass
    (root / "stray").mkdir()  # no run.json: not a run of ours
    (root / "damaged").mkdir()
    (root / "damaged" / "run.json").write_text("{not json")

    found = unfinished_runs(root, spec)
    assert found[0] == "new" and set(found) == {"old", "new"}  # started later: first
    assert unfinished_runs(root, other) == ["other-spec"]
    assert unfinished_runs(tmp_path / "nothing-here", spec) == []
    assert new_run_id(spec).endswith(spec.fingerprint()[:8])


def test_a_live_build_holds_its_folder(spec_dir, tmp_path):
    spec = _spec(spec_dir)
    run_dir = tmp_path / "runs" / "r1"
    with hold_run(run_dir, spec):
        assert unfinished_runs(run_dir.parent, spec) == []  # busy: never offered for resume
        with pytest.raises(RunBusy, match="in use by another build"):
            with hold_run(run_dir, spec):
                pass
    assert unfinished_runs(run_dir.parent, spec) == ["r1"]  # released: offered
    with hold_run(run_dir, spec) as resumed:
        assert resumed is True
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"] == spec.fingerprint()


def test_a_folder_of_another_spec_is_refused(spec_dir, tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    with hold_run(run_dir, _spec(spec_dir)):
        pass
    with pytest.raises(RunBusy, match="different spec"):
        with hold_run(run_dir, _spec(spec_dir, target_size=5)):
            pass


def test_a_build_picking_its_run_is_refused_while_a_live_build_of_the_spec_holds_one(spec_dir, tmp_path):
    from polyculture.runs.folders import hold_build_run, lock_holder

    spec, other = _spec(spec_dir), _spec(spec_dir, seed=99)
    root = tmp_path / "runs"
    with hold_build_run(root, spec, build="the first build") as (live, resumed):
        assert resumed is False
        assert "the first build" in lock_holder(live)
        with pytest.raises(RunBusy, match="already running in") as info:
            with hold_build_run(root, spec):
                pass
        assert str(live) in str(info.value) and "the first build" in str(info.value) and "--new-run" in str(info.value)
        with hold_build_run(root, spec, resume=False) as (beside, _):  # a new run on purpose: its own folder
            assert beside != live and beside.parent == root
        with hold_build_run(root, other) as (others, _):  # another spec of the dataset is not in the way
            assert others not in (live, beside)
    with hold_build_run(root, spec) as (again, resumed):  # the live one has gone: the newest dead run is resumed
        assert again == beside and resumed is True


def test_a_run_that_still_owes_its_hub_push_is_resumed(spec_dir, tmp_path):
    """result.json without a push, for a spec that pushes on build: the build died (or the push failed) between the
    two; the same command resumes it to push, instead of generating a new run."""
    pushes = _spec(spec_dir, publish={"hub": {"repo_id": "alice/bios", "push_on_build": True}})
    root = tmp_path / "runs"
    for run_id, result in (("owes-push", {"hub": None}), ("pushed", {"hub": {"tag": "pushed"}}), ("damaged", None)):
        with hold_run(root / run_id, pushes):
            (root / run_id / RESULT_FILE).write_text("{not json" if result is None else json.dumps(result))
    assert unfinished_runs(root, pushes) == ["owes-push"]
    # without push_on_build the same folders are all finished (a spec that never pushes owes no push)
    no_push = _spec(spec_dir, publish={"hub": {"repo_id": "alice/bios", "push_on_build": False}})
    with hold_run(root / "local", no_push):
        (root / "local" / RESULT_FILE).write_text(json.dumps({"hub": None}))
    assert unfinished_runs(root, no_push) == []
