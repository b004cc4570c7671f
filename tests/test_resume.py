"""Resume: a build killed with SIGKILL mid-generation, re-run with the same run id, regenerates no finished shard and
publishes exactly the dataset an uninterrupted build of the same spec and seed publishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import small_spec_dict

POLYCULTURE = str(Path(sys.executable).parent / "polyculture")
SHARD_WAIT_SECONDS = 600  # model load + temporary Prefect server + the first shards, on a busy 2-core machine


def _build(spec_path: Path, out: Path, *options: str) -> dict:
    done = subprocess.run(
        [POLYCULTURE, "build", str(spec_path), *options, "--output-dir", str(out), "--json", "--quiet"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _shards(run_dir: Path) -> dict[str, int]:
    """Finished shard files (relative path -> mtime in ns); the .tmp files of a half-written shard are not shards."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.glob("generate/**/*.parquet"))}


def _kill_mid_generation(spec_path: Path, out: Path, run_id: str, run_dir: Path) -> dict[str, int]:
    """Start a build, SIGKILL its whole process group once 2 shards are on disk; return the shards left behind."""
    proc = subprocess.Popen(
        [POLYCULTURE, "build", str(spec_path), "--run-id", run_id, "--output-dir", str(out), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + SHARD_WAIT_SECONDS
        while len(_shards(run_dir)) < 2:
            assert proc.poll() is None, f"the build exited ({proc.returncode}) before writing 2 shards"
            assert time.monotonic() < deadline, "no 2 shards within the wait"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and anything it started (Prefect's temporary server)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _group_gone(proc.pid), "a process of the killed build is still running"
    return _shards(run_dir)


def _group_gone(pgid: int, wait_seconds: float = 60) -> bool:
    """True once no process of the group is left (orphans are reaped by init a moment after the kill)."""
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _completions(run_dir: Path) -> pl.DataFrame:
    frames = [pl.read_parquet(p).with_columns(pl.lit(str(p.relative_to(run_dir))).alias("file"))
              for p in sorted(run_dir.glob("generate/**/*.parquet"))]  # fmt: skip
    return pl.concat(frames).select("file", "call_id", "completion").sort("file", "call_id")


@pytest.mark.slow
def test_killed_build_resumes_to_the_dataset_of_an_uninterrupted_build(spec_dir, tmp_path):
    spec = small_spec_dict(
        target_size=6,
        method={"name": "direct"},
        model={"batch_size": 1},  # one prompt per shard: several shards to kill between
        sampling={"max_tokens": 100, "n": 2},
        generation={"oversample": 2.0},
        rebalance={"top_up_rounds": 1, "top_up_max_tokens": 1500},
    )
    spec_path = spec_dir / "resume.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    killed_dir = out / "tiny-bios" / "killed"

    before = _kill_mid_generation(spec_path, out, "killed", killed_dir)
    planned = pl.read_parquet(killed_dir / "plan.parquet")
    round0_shards = int(planned["n_prompts"].sum())  # batch_size 1
    assert 2 <= len(before) < round0_shards, f"killed with {len(before)} of {round0_shards} shards: not mid-generation"
    assert not (killed_dir / "result.json").exists()

    # The same command without a run id: the newest unfinished run of this spec is the one resumed.
    resumed = _build(spec_path, out)
    assert resumed["run_id"] == "killed" and resumed["resumed"] is True
    after = _shards(killed_dir)
    # Every shard finished before the kill is still the same file, untouched; the rest were generated now.
    assert {name: after[name] for name in before} == before
    assert len(after) >= round0_shards > len(before)
    assert not list(killed_dir.glob("generate/**/*.tmp"))

    straight = _build(spec_path, out, "--run-id", "straight")
    straight_dir = out / "tiny-bios" / "straight"
    # Same completions, shard by shard, top-up rounds included ...
    assert _completions(killed_dir).equals(_completions(straight_dir))
    # ... hence the same funnel and the same published rows.
    assert resumed["counts"] == straight["counts"]
    assert resumed["records"] == straight["records"] > 0
    resumed_rows = pq.read_table(Path(resumed["dataset_dir"]) / "data").to_pylist()
    straight_rows = pq.read_table(Path(straight["dataset_dir"]) / "data").to_pylist()
    assert resumed_rows == straight_rows
