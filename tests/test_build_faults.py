"""Build-level faults of the services a build talks to: the OpenAI-compatible server (dies, answers 500s, hangs,
answers what cannot be used) and the Prefect API (killed mid-build).

Every build is the real `polyculture build` command with engine openai, pointed at a `FaultProxy` in front of the real
vLLM server serving the embedded model (one per module), so the records are real model output. The builds report to a
real Prefect server of this module (a temporary one per build would add its start-up to every build); the test of a
lost Prefect API starts one of its own to kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SMALL_SCHEMA, small_spec_dict
from fault_servers import FaultProxy, start_prefect_server, stop_group
from test_openai_engine import MODEL, vllm_server  # noqa: F401 - the module's real vLLM server

pytestmark = pytest.mark.slow  # a real vLLM server and real builds

POLYCULTURE = str(Path(sys.executable).parent / "polyculture")
BUILD_TIMEOUT = 900  # a guard against a build that never ends, not a measure: a hang fails the test here


@pytest.fixture
def proxy(vllm_server: str) -> Iterator[FaultProxy]:  # noqa: F811
    made = FaultProxy(vllm_server)
    yield made
    made.close()


def _spec(folder: Path, proxy: FaultProxy, **model: Any) -> Path:
    """The tiny biographies spec on engine openai through the proxy: 4 prompts, one request per shard, no top-up
    rounds, so the requests a build makes are known."""
    (folder / "record.schema.json").write_text(json.dumps(SMALL_SCHEMA))
    spec = small_spec_dict(
        model={"name": MODEL, "engine": "openai", "base_url": proxy.url, "batch_size": 1, **model},
        sampling={"max_tokens": 100, "n": 2},
        rebalance={"top_up_rounds": 0},
    )
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env(folder: Path, api_url: str) -> dict[str, str]:
    return os.environ | {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "OMP_NUM_THREADS": "1",
    }


def _build(spec: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    out = spec.parent / "out"
    return subprocess.run(
        [POLYCULTURE, "build", str(spec), "--output-dir", str(out), "--json", "--quiet", *options],
        capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT,
    )  # fmt: skip


def _shards(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.glob("generate/**/*.parquet"))}


def _published(result: dict[str, Any]) -> int:
    """Rows of the published dataset (what result.json promises is really there)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in Path(result["dataset_dir"]).glob("data/*.parquet"))


def test_a_server_that_dies_stops_the_build_naming_it_and_the_rerun_resumes(proxy, prefect_api, tmp_path):
    spec = _spec(tmp_path, proxy, max_retries=2, request_timeout=120)
    env = _env(tmp_path, prefect_api)
    proxy.die_after(2)  # two shards are answered, then the server goes away with the third request unanswered
    stopped = _build(spec, env)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    [run_dir] = [p for p in (tmp_path / "out" / "tiny-bios").iterdir() if p.is_dir()]
    message = stopped.stderr[stopped.stderr.index("error:") :]
    assert f"{proxy.url}/chat/completions failed after 3 attempt(s)" in message and "ConnectError" in message
    assert f"run folder {run_dir} keeps 2 finished shard(s)" in message and "run the build again" in message
    before = _shards(run_dir)
    assert len(before) == 2 and not (run_dir / "result.json").exists()
    # Only the first failing shard spent its retries; the shards waiting for the engine gave up at once.
    assert proxy.served == ["forward", "forward", "die"]

    proxy.revive()
    resumed = _build(spec, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout)
    assert result["run_id"] == run_dir.name and result["resumed"] is True
    after = _shards(run_dir)
    assert {name: after[name] for name in before} == before  # finished shards untouched ...
    assert len(after) == 4 and proxy.served[3:] == ["forward", "forward"]  # ... and only the other two requested
    assert 0 < result["records"] == _published(result)


# One request meets each fault in turn, never more than max_retries in a row: 500s, then a hang (given up at the
# spec's request_timeout, generous: a real answer on a busy 2-core machine can take half a minute), a body that is
# not JSON, a JSON answer without `choices`, JSON cut in half, and a body shorter than its Content-Length.
FAULT_SCRIPT = ["500", "500", "500", "forward", "hang", "not_json", "no_choices", "cut_json", "forward", "short_body"]


def test_500s_hangs_and_unusable_answers_are_retried_and_the_build_completes(proxy, prefect_api, tmp_path):
    proxy.script = list(FAULT_SCRIPT)
    spec = _spec(tmp_path, proxy, max_retries=4, request_timeout=60)
    done = _build(spec, _env(tmp_path, prefect_api))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for said in ("HTTP 500", "timed out after 60 s", "a body that is not JSON: <html>", "no choices, expected 2",
                 "with a body that is not JSON: {", "RemoteProtocolError"):  # fmt: skip
        assert said in done.stderr, said
    faults = [action for action in FAULT_SCRIPT if action != "forward"]
    assert [action for action in proxy.served if action != "forward"] == faults  # each met once, then left behind
    result = json.loads(done.stdout)
    assert result["counts"]["completions"] == 4 * 2  # every prompt answered in the end: nothing lost to a fault
    assert 0 < result["records"] == _published(result)


def test_a_server_that_always_hangs_stops_the_build_at_the_spec_timeout(proxy, prefect_api, tmp_path):
    proxy.hang_all = True
    spec = _spec(tmp_path, proxy, max_retries=1, request_timeout=2)
    stopped = _build(spec, _env(tmp_path, prefect_api))
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    message = stopped.stderr[stopped.stderr.index("error:") :]
    assert f"{proxy.url}/chat/completions failed after 2 attempt(s); last error: timed out after 2 s" in message
    assert "keeps 0 finished shard(s)" in message
    # The spec's timeout and retries were the ones used, for one shard only: the others gave up without a request.
    assert proxy.served == ["hang", "hang"]


def test_a_prefect_api_killed_mid_build_leaves_a_finished_build_and_no_traceback(proxy, tmp_path):
    server, api_url = start_prefect_server(tmp_path)
    try:
        spec = _spec(tmp_path, proxy, request_timeout=120)
        proxy.script = ["forward", "hold"]  # the second shard waits at the proxy while the API is killed
        # Prefect's client retries each request 5 times with 2..32 s backoff once the API is gone (about a minute per
        # request, minutes per build); one retry shows the same behaviour at a fraction of the test's time.
        env = _env(tmp_path, api_url) | {"PREFECT_CLIENT_MAX_RETRIES": "1"}
        with (tmp_path / "build.err").open("w") as err:
            build = subprocess.Popen(
                [POLYCULTURE, "build", str(spec), "--output-dir", str(tmp_path / "out"), "--json", "--quiet"],
                stdout=subprocess.PIPE, stderr=err, text=True, env=env,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + BUILD_TIMEOUT
            while len(proxy.served) < 2:
                assert build.poll() is None, (tmp_path / "build.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "the build never reached its second shard"
                time.sleep(0.2)
            assert not stop_group(server, signal.SIGKILL)
            proxy.release_held()
            out, _ = build.communicate(timeout=BUILD_TIMEOUT)
        finally:
            if build.poll() is None:
                build.kill()
                build.wait()
    finally:
        stop_group(server, signal.SIGKILL)
    said = (tmp_path / "build.err").read_text()
    assert build.returncode == 0, said[-3000:]
    assert "Traceback" not in said
    assert f"the Prefect API at {api_url} went away during the build" in said and "finished all the same" in said
    # Prefect says "Unable to connect" for every event it cannot send: once is enough.
    assert said.count("Unable to connect to") <= 1
    result = json.loads(out)
    assert (Path(result["run_dir"]) / "result.json").is_file() and 0 < result["records"] == _published(result)

    # With the API still gone, a new build is refused before it starts, saying what to do.
    again = _build(spec, env, "--new-run")
    assert again.returncode == 3, again.stderr[-3000:]
    assert f"cannot reach the Prefect API at PREFECT_API_URL={api_url}" in again.stderr and "Traceback" not in again.stderr
    assert [p.name for p in (tmp_path / "out" / "tiny-bios").iterdir() if p.is_dir()] == [result["run_id"]]
