"""Schedules: `polyculture serve` against a real Prefect server started here, with a real build run through it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import datasets
import httpx
import psutil
import pytest
import yaml
from conftest import SMALL_SCHEMA, small_spec_dict

CLI = [sys.executable, "-m", "polyculture.cli"]
PREFECT = str(Path(sys.executable).parent / "prefect")
TZ = "Asia/Kolkata"  # a +05:30 zone: a schedule read in UTC would land on other minutes


def _cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)


def _no_server_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect-home")}


def _far_cron() -> str:
    """A daily cron 12 hours from now (in TZ): the server schedules its runs, and none of them fires during the test."""
    later = datetime.now(ZoneInfo(TZ)) + timedelta(hours=12)
    return f"{later.minute} {later.hour} * * *"


def _write_spec(folder: Path, name: str, **overrides: Any) -> Path:
    (folder / "record.schema.json").write_text(json.dumps(SMALL_SCHEMA))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small_spec_dict(name=name, **overrides)))
    return path


def _wait(what: str, probe: Callable[[], Any], timeout: float, alive: subprocess.Popen[Any] | None = None) -> Any:
    """Poll `probe` until it returns something truthy; fail after `timeout` s, or as soon as `alive` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"{what}: the process exited with {alive.returncode} first")
        value = probe()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[Any], sig: int, timeout: float = 90) -> int:
    """Send `sig` to one of our processes and wait for it; kill its whole group (ours) if it hangs."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"process {proc.pid} ignored signal {sig} for {timeout:.0f} s")


# ---- without a server ----------------------------------------------------------------------------------------------


def test_dry_run_json_shows_the_deployment_and_its_next_runs_without_a_server(tmp_path):
    spec = _write_spec(tmp_path, "weekly-bios", schedule={"cron": "0 3 * * 1", "timezone": TZ})
    out = _cli("serve", str(spec), "--dry-run", "--json", env=_no_server_env(tmp_path))
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["registered"] is False and payload["api_url"] is None
    [deployment] = payload["deployments"]
    assert deployment["name"] == "build_dataset/weekly-bios"
    assert deployment["parameters"] == {"spec_path": str(spec.resolve())}
    assert (deployment["cron"], deployment["timezone"]) == ("0 3 * * 1", TZ)
    assert deployment["tags"] == ["polyculture"]
    runs = [datetime.fromisoformat(t) for t in deployment["next_runs"]]
    assert len(runs) == 3
    now = datetime.now(ZoneInfo(TZ))
    # Mondays 03:00 in Kolkata (21:30 UTC on Sundays), a week apart, the first within the coming week
    assert all(
        (t.weekday(), t.hour, t.minute, t.utcoffset()) == (0, 3, 0, timedelta(hours=5, minutes=30)) for t in runs
    )
    assert [b - a for a, b in itertools.pairwise(runs)] == [timedelta(days=7)] * 2
    assert now < runs[0] <= now + timedelta(days=7)


def test_spec_without_schedule_is_refused_unless_allowed(tmp_path):
    spec = _write_spec(tmp_path, "adhoc-bios")
    env = _no_server_env(tmp_path)
    out = _cli("serve", str(spec), "--dry-run", env=env)
    assert out.returncode == 2
    assert "adhoc-bios.yaml" in out.stderr and "no `schedule:` key" in out.stderr and "Traceback" not in out.stderr
    allowed = _cli("serve", str(spec), "--dry-run", "--json", "--allow-unscheduled", env=env)
    assert allowed.returncode == 0, allowed.stderr
    [deployment] = json.loads(allowed.stdout)["deployments"]
    assert deployment["cron"] is None and deployment["next_runs"] == []


def test_two_specs_with_one_dataset_name_are_refused_naming_both(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _write_spec(tmp_path / "a", "same", schedule="0 3 * * *")
    second = _write_spec(tmp_path / "b", "same", schedule="0 4 * * *")
    out = _cli("serve", str(first), str(second), "--dry-run", env=_no_server_env(tmp_path))
    assert out.returncode == 2
    assert str(first.resolve()) in out.stderr and str(second.resolve()) in out.stderr and "'same'" in out.stderr


def test_bad_schedule_refuses_the_whole_command_naming_the_field(tmp_path):
    good = _write_spec(tmp_path, "good", schedule="0 3 * * *")
    bad = _write_spec(tmp_path, "bad", schedule={"cron": "0 3 * *", "timezone": "Mars/Olympus_Mons"})
    out = _cli("serve", str(good), str(bad), "--dry-run", env=_no_server_env(tmp_path))
    assert out.returncode == 2 and out.stdout == ""  # nothing listed, not even the good spec
    assert "bad.yaml" in out.stderr and "schedule.cron" in out.stderr and "schedule.timezone" in out.stderr


def test_schedule_spec_forms(spec_dir):
    from polyculture.preflight import parse_spec
    from polyculture.spec import SpecError

    assert parse_spec(small_spec_dict(schedule="0 3 * * *"), spec_dir).schedule.model_dump() == {
        "cron": "0 3 * * *",
        "timezone": "UTC",
    }
    for cron in ("61 * * * *", "0 3 * * * *", "H 3 * * *", "every day"):
        with pytest.raises(SpecError, match="schedule.cron"):
            parse_spec(small_spec_dict(schedule=cron), spec_dir)


def test_serve_refuses_without_a_reachable_server(tmp_path):
    spec = _write_spec(tmp_path, "nowhere", schedule="0 3 * * *")
    env = _no_server_env(tmp_path)
    out = _cli("serve", str(spec), env=env)
    assert out.returncode == 3 and "prefect server start" in out.stderr and "PREFECT_API_URL" in out.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _cli("serve", str(spec), env=env | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
    assert out.returncode == 3 and "cannot reach the Prefect server" in out.stderr and "Traceback" not in out.stderr


# ---- against a real Prefect server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on a free port with a private PREFECT_HOME; the whole process group is gone after."""
    home = tmp_path_factory.mktemp("prefect-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    with (home / "server.log").open("w") as log:
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(f"the Prefect server (log: {home / 'server.log'})", healthy, 180, alive=server)
        yield url
    finally:
        family = [server.pid] + [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        leaked = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert not leaked, f"Prefect server processes left running: {leaked}"


@pytest.fixture
def client(prefect_api: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        yield c


def _serve(prefect_api: str, folder: Path, *specs: Path) -> subprocess.Popen[str]:
    """`polyculture serve SPEC... --json` in the background; stdout (the JSON) and stderr go to files in `folder`."""
    env = os.environ | {
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(folder / "serve-home"),
        "OMP_NUM_THREADS": "1",  # 2 shared cores: one decoding thread beats two fighting the server for them
    }
    with (folder / "serve.out").open("w") as out, (folder / "serve.err").open("w") as err:  # the child keeps its copies
        return subprocess.Popen(
            [*CLI, "serve", *map(str, specs), "--json"],
            stdout=out, stderr=err, env=env, cwd=folder, text=True, start_new_session=True,
        )  # fmt: skip


def _deployment(client: Any, name: str, proc: subprocess.Popen[str], *, paused: bool = False) -> Any:
    """The deployment once serve has registered it (and it is paused or not, as asked)."""
    from prefect.exceptions import ObjectNotFound

    def probe() -> Any:
        try:
            found = client.read_deployment_by_name(f"build_dataset/{name}")
        except ObjectNotFound:
            return None
        return found if found.paused == paused else None

    return _wait(f"deployment {name} (paused={paused})", probe, 240, alive=None if paused else proc)


def _scheduled_runs(client: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateName as Name

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id={"any_": [deployment_id]}),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=Name(any_=["Scheduled"]))),
    )


@pytest.fixture(scope="module")
def served(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One serve process for the tiny spec on a cron schedule; stopped with SIGTERM at the end."""
    folder = tmp_path_factory.mktemp("served")
    cron = _far_cron()
    spec = _write_spec(
        folder, "tiny-bios", schedule={"cron": cron, "timezone": TZ}, publish={"dir": str(folder / "published")}
    )
    proc = _serve(prefect_api, folder, spec)
    try:
        yield {"proc": proc, "spec": spec, "cron": cron, "folder": folder}
    finally:
        if proc.poll() is None:
            _stop(proc, signal.SIGTERM)


def test_serve_registers_the_deployment_and_the_scheduler_creates_its_runs(client, served):
    from polyculture.flows.schedules import next_run_times
    from polyculture.spec import ScheduleSpec

    deployment = _deployment(client, "tiny-bios", served["proc"])
    assert deployment.parameters == {"spec_path": str(served["spec"].resolve())}
    assert deployment.entrypoint == "polyculture.flows.build_dataset.build_dataset"
    assert "polyculture" in deployment.tags and deployment.paused is False
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (served["cron"], TZ, True)

    # serve's own report, printed once the server had the deployment
    printed = _wait("serve's JSON", lambda: (served["folder"] / "serve.out").read_text().strip(), 60)
    payload = json.loads(printed)
    assert payload["registered"] is True and payload["deployments"][0]["id"] == str(deployment.id)

    # Prefect's scheduler service creates the coming runs ahead of time (sqlalchemy 2.1 silently stops this).
    runs = _wait("runs created by the scheduler", lambda: _scheduled_runs(client, deployment.id), 180)
    assert all(r.auto_scheduled and r.parameters == deployment.parameters for r in runs)
    planned = sorted(r.expected_start_time for r in runs)[:3]
    assert len(planned) == 3
    expected = next_run_times(ScheduleSpec(cron=served["cron"], timezone=TZ), 3)
    assert [t.timestamp() for t in planned] == [t.timestamp() for t in expected]  # what --dry-run shows
    minute, hour = map(int, served["cron"].split()[:2])
    assert all((t.astimezone(ZoneInfo(TZ)).hour, t.astimezone(ZoneInfo(TZ)).minute) == (hour, minute) for t in planned)


@pytest.mark.slow
def test_a_triggered_run_of_the_deployment_builds_the_dataset(client, served):
    deployment = _deployment(client, "tiny-bios", served["proc"])
    flow_run = client.create_flow_run_from_deployment(deployment.id)
    assert flow_run.parameters == {"spec_path": str(served["spec"].resolve())}

    def finished() -> Any:
        state = client.read_flow_run(flow_run.id).state
        return state if state is not None and state.is_final() else None

    state = _wait("the triggered build", finished, 900, alive=served["proc"])
    assert state.is_completed(), (
        f"{state.name}: {state.message}\n{(served['folder'] / 'serve.err').read_text()[-3000:]}"
    )

    # a fresh run id per run: one new run folder under the spec's publish.dir, with the whole build in it
    dataset_folder = served["folder"] / "published" / "tiny-bios"
    [run_dir] = [p for p in dataset_folder.iterdir() if p.is_dir()]  # beside the folder's .runs.lock
    result = json.loads((run_dir / "result.json").read_text())
    assert result["run_dir"] == str(run_dir) and result["run_id"] == run_dir.name
    assert (run_dir / "report.json").is_file() and (run_dir / "spec.yaml").read_text() == served["spec"].read_text()
    assert 0 < result["records"] <= 4
    assert datasets.load_dataset(result["dataset_dir"], split="train").num_rows == result["records"]


def test_stopping_serve_pauses_the_schedule_and_serving_again_resumes_it(client, prefect_api, tmp_path):
    spec = _write_spec(tmp_path, "stop-bios", schedule={"cron": _far_cron(), "timezone": TZ})
    first = _serve(prefect_api, tmp_path, spec)
    deployment = _deployment(client, "stop-bios", first)
    _wait("runs created by the scheduler", lambda: _scheduled_runs(client, deployment.id), 180)
    assert _stop(first, signal.SIGINT) == 0  # Ctrl-C
    log = (tmp_path / "serve.err").read_text()
    assert "stopped; the schedules are paused" in log and "Traceback" not in log
    paused = _deployment(client, "stop-bios", first, paused=True)
    assert paused.id == deployment.id and _scheduled_runs(client, deployment.id) == []  # no runs left waiting

    second = _serve(prefect_api, tmp_path, spec)
    resumed = _deployment(client, "stop-bios", second)
    assert resumed.id == deployment.id  # the same deployment, not a new one
    _wait("runs scheduled again", lambda: _scheduled_runs(client, deployment.id), 180, alive=second)
    assert _stop(second, signal.SIGTERM) == 0  # what a service manager sends
    log = (tmp_path / "serve.err").read_text()
    assert "stopped; the schedules are paused" in log and "Traceback" not in log
    assert _deployment(client, "stop-bios", second, paused=True).id == deployment.id


@pytest.mark.parametrize("stop_at", ["registering", "reporting"])
def test_a_stop_before_serving_pauses_what_was_registered_and_registers_nothing_more(
    client, prefect_api, tmp_path, monkeypatch, stop_at
):
    """Ctrl-C at a chosen point, in this process: while the first of two deployments registers, or while serve reports
    them. Either way serve returns normally, nothing more is registered, and what was registered is paused."""
    from prefect.exceptions import ObjectNotFound
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from polyculture.flows.schedules import load_scheduled_specs, serve_deployments, to_deployment

    first = _write_spec(tmp_path, f"early-{stop_at}-a", schedule={"cron": _far_cron(), "timezone": TZ})
    second = _write_spec(tmp_path, f"early-{stop_at}-b", schedule={"cron": _far_cron(), "timezone": TZ})
    deployments = [to_deployment(item) for item in load_scheduled_specs([first, second])]
    reported: list[Any] = []
    if stop_at == "registering":
        add = Runner.add_deployment

        def add_then_interrupt(self: Any, deployment: Any) -> Any:
            added = add(self, deployment)
            os.kill(os.getpid(), signal.SIGINT)  # lands while the first registration is still in progress
            return added

        monkeypatch.setattr(Runner, "add_deployment", add_then_interrupt)

    def on_registered(ids: list[Any]) -> None:
        reported.extend(ids)
        if stop_at == "reporting":
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGINT)
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        serve_deployments(deployments, on_registered=on_registered)  # returns: no KeyboardInterrupt, no exit 130
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are put back

    paused = client.read_deployment_by_name(f"build_dataset/early-{stop_at}-a")
    assert paused.paused is True and not _scheduled_runs(client, paused.id)
    if stop_at == "registering":
        assert reported == []  # serve never reported a half-registered set
        with pytest.raises(ObjectNotFound):
            client.read_deployment_by_name(f"build_dataset/early-{stop_at}-b")
    else:
        assert len(reported) == 2
        assert client.read_deployment_by_name(f"build_dataset/early-{stop_at}-b").paused is True
