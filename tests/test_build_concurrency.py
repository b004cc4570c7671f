"""Two builds of one dataset at once: never two writers in one run folder, and a second build of a spec being built
is refused (exit 2) naming the folder and who holds it, whether the first is a `polyculture build` or a run of the
spec's deployment under `polyculture serve`. A run started beside it on purpose (--new-run) writes its own publish
folder and release index.

The generation server is the canned `RecordServer` (schema-valid records, no model): these tests are about locks,
not text, and its `hold()` keeps the first build in the middle of its generation for as long as the test needs.
Builds report to a real Prefect server of this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SMALL_SCHEMA, small_spec_dict
from fault_servers import RecordServer, stop_group

POLYCULTURE = str(Path(sys.executable).parent / "polyculture")
MODEL = "smollm2-135m-instruct"
WAIT = 600  # a guard against a build that never gets there, not a measure


@pytest.fixture
def records() -> Iterator[RecordServer]:
    server = RecordServer(MODEL)
    yield server
    server.close()


def _spec(folder: Path, server: RecordServer, **overrides: Any) -> Path:
    (folder / "record.schema.json").write_text(json.dumps(SMALL_SCHEMA))
    spec = small_spec_dict(
        # One request per shard, and a build's shards take turns on its engine: one request in flight per build.
        model={"name": MODEL, "engine": "openai", "base_url": server.url, "batch_size": 1},
        rebalance={"top_up_rounds": 0},
        publish={"dir": str(folder / "published")},
        **overrides,
    )
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env(folder: Path, api_url: str) -> dict[str, str]:
    return os.environ | {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(folder / "prefect-home")}


def _command(spec: Path, *options: str) -> list[str]:
    return [POLYCULTURE, "build", str(spec), "--json", "--quiet", *options]


def _start(spec: Path, env: dict[str, str], log: Path, *options: str) -> subprocess.Popen[str]:
    with log.open("w") as err:  # the child keeps its own copy
        return subprocess.Popen(_command(spec, *options), stdout=subprocess.PIPE, stderr=err, text=True, env=env)


def _run(spec: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(spec, *options), capture_output=True, text=True, env=env, timeout=WAIT)


def _wait_for(what: str, probe: Any, alive: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not probe():
        assert alive is None or alive.poll() is None, f"{what}: the process exited with {alive.returncode} first"
        assert time.monotonic() < deadline, f"{what}: not within {WAIT} s"
        time.sleep(0.2)


def _finish(proc: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return json.loads(out)


def _run_dirs(spec_folder: Path) -> list[Path]:
    return sorted(p for p in (spec_folder / "published" / "tiny-bios").iterdir() if p.is_dir())


def test_a_second_build_of_a_spec_being_built_is_refused_and_a_new_run_beside_it_writes_its_own(
    records, prefect_api, tmp_path
):
    spec = _spec(tmp_path, records)
    env = _env(tmp_path, prefect_api)
    records.hold()  # the first build stops at its first request, with its run folder locked
    first = _start(spec, env, tmp_path / "first.err")
    try:
        _wait_for("the first build's first request", lambda: records.chats >= 1, alive=first)
        [run_dir] = _run_dirs(tmp_path)

        # The same command again: refused, not a second run of the same spec beside the live one.
        again = _run(spec, env)
        assert again.returncode == 2, again.stderr[-3000:]
        assert f"a build of this spec is already running in '{run_dir}' (pid {first.pid} on " in again.stderr
        assert "Prefect flow run '" in again.stderr and "--new-run" in again.stderr
        # Asking for the live build's folder by name: refused too.
        same = _run(spec, env, "--run-id", run_dir.name)
        assert same.returncode == 2, same.stderr[-3000:]
        assert f"run folder '{run_dir}' is in use by another build (pid {first.pid} on " in same.stderr
        assert "Traceback" not in again.stderr + same.stderr
        assert _run_dirs(tmp_path) == [run_dir]  # neither refused build left a folder

        # A new run on purpose runs beside it; both then generate and publish at the same time.
        beside = _start(spec, env, tmp_path / "beside.err", "--new-run")
        _wait_for("the new run's first request", lambda: records.chats >= 2, alive=beside)
        records.release()
        results = [_finish(first, tmp_path / "first.err"), _finish(beside, tmp_path / "beside.err")]
    finally:
        records.release()
        for proc in (first, *([beside] if "beside" in locals() else [])):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert results[0]["run_dir"] == str(run_dir) and results[1]["run_dir"] != str(run_dir)
    assert [Path(r["run_dir"]) for r in sorted(results, key=lambda r: r["run_dir"])] == _run_dirs(tmp_path)
    for result in results:  # each run published into its own folder and indexed its own records
        run = Path(result["run_dir"])
        assert Path(result["dataset_dir"]).parent == run
        reference = json.loads((run / "reference" / "reference.json").read_text())
        assert reference["source"] == f"tiny-bios/{result['run_id']}"
        assert reference["count"] == result["records"] > 0


def test_a_build_started_while_serve_runs_the_dataset_is_refused(records, prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = _spec(tmp_path, records, schedule="0 3 1 1 *")  # once a year: only the run we trigger happens
    env = _env(tmp_path, prefect_api)
    records.hold()
    with (tmp_path / "serve.err").open("w") as err:
        serve = subprocess.Popen(
            [POLYCULTURE, "serve", str(spec), "--json"], stdout=subprocess.DEVNULL, stderr=err, env=env,
            cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:

            def registered() -> Any:
                try:
                    return client.read_deployment_by_name("build_dataset/tiny-bios")
                except ObjectNotFound:  # not registered yet
                    return None

            _wait_for("the deployment", registered, alive=serve)
            flow_run = client.create_flow_run_from_deployment(registered().id)
            _wait_for("the deployment run's first request", lambda: records.chats >= 1, alive=serve)
            [run_dir] = _run_dirs(tmp_path)

            refused = _run(spec, env)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert f"a build of this spec is already running in '{run_dir}'" in refused.stderr
            assert f"Prefect flow run '{flow_run.name}' of deployment 'tiny-bios'" in refused.stderr
            assert "Traceback" not in refused.stderr

            records.release()

            def finished() -> Any:
                state = client.read_flow_run(flow_run.id).state
                return state if state is not None and state.is_final() else None

            _wait_for("the deployment run", finished, alive=serve)
            assert finished().is_completed(), (tmp_path / "serve.err").read_text()[-3000:]
    finally:
        records.release()
        assert not stop_group(serve), "serve processes left running"
    assert _run_dirs(tmp_path) == [run_dir] and (run_dir / "result.json").is_file()
