"""Resume: a build killed with SIGKILL mid-generation, re-run with the same run id, regenerates no finished shard and
publishes exactly the dataset an uninterrupted build of the same spec and seed publishes; shard files damaged on disk
are set aside and generated again from their own seeds, to the same dataset; a run folder's resolved spec checks from
anywhere as the spec it was built from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
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
    log = out.parent / f"{run_id}.stderr.log"  # what the build said, for the failure message
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [POLYCULTURE, "build", str(spec_path), "--run-id", run_id, "--output-dir", str(out), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + SHARD_WAIT_SECONDS
        while len(_shards(run_dir)) < 2:
            if proc.poll() is not None:
                said = log.read_text(errors="replace")[-4000:]
                raise AssertionError(f"the build exited ({proc.returncode}) before writing 2 shards:\n{said}")
            assert time.monotonic() < deadline, "no 2 shards within the wait"
            time.sleep(0.1)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the build and anything it started (Prefect's temporary server)
        except ProcessLookupError:
            pass  # the build had already exited: the assertion above says why
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
@pytest.mark.full  # the default run: test_faults' generate-mid-shard case (the same kill, rerun and comparison)
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


def _flip_a_byte_the_reader_misses(path: Path) -> int:
    """Flip the first byte past the file's first quarter whose flip the parquet reader reads without complaint but
    which changes the rows (damage only a checksum sees); returns its offset."""
    data = path.read_bytes()
    rows = pq.read_table(path).to_pylist()
    for at in range(len(data) // 4, len(data)):
        flipped = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        try:
            table = pq.read_table(pa.BufferReader(flipped))
            table.validate(full=True)
            if table.to_pylist() == rows:
                continue
        except (pa.ArrowException, OSError, ValueError):
            continue
        path.write_bytes(flipped)
        return at
    raise AssertionError(f"no byte of {path} changes its rows unnoticed")


@pytest.mark.slow
@pytest.mark.full  # the default run: test_damaged_shards (every damage, set aside and generated again by the shard loop)
def test_damaged_shards_are_set_aside_and_generated_again_to_the_same_dataset(spec_dir, tmp_path):
    spec = small_spec_dict(
        record={"schema": "../record.schema.json"},  # beside the spec's folder, as ../schemas/ is in a project
        model={"batch_size": 1},  # one prompt per shard
        sampling={"max_tokens": 100, "n": 2},
        rebalance={"top_up_rounds": 0},
    )
    (spec_dir / "configs").mkdir()
    spec_path = spec_dir / "configs" / "damaged.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    run_dir = out / "tiny-bios" / "damaged"

    straight = _build(spec_path, out, "--run-id", "damaged")  # uninterrupted: the rows to get back
    straight_rows = pq.read_table(Path(straight["dataset_dir"]) / "data").to_pylist()
    straight_completions = _completions(run_dir)
    shards = sorted(run_dir.glob("generate/*.parquet"))
    assert len(shards) >= 3 and straight["corrupt_shards"] == 0
    # The run dies before it finishes (no result.json); then the disk damages two of its shards: one cut short,
    # one with a flipped byte the parquet reader does not notice.
    (run_dir / "result.json").unlink()
    shards[0].write_bytes(shards[0].read_bytes()[: shards[0].stat().st_size // 2])
    _flip_a_byte_the_reader_misses(shards[2])
    untouched = {p: p.stat().st_mtime_ns for p in shards if p not in (shards[0], shards[2])}

    done = subprocess.run(
        [POLYCULTURE, "build", str(spec_path), "--output-dir", str(out), "--json"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads(done.stdout)
    assert resumed["run_id"] == "damaged" and resumed["resumed"] is True and resumed["corrupt_shards"] == 2
    # reported, set aside beside the shard (never deleted), the other shards untouched
    reports = [line for line in done.stderr.splitlines() if " corrupt: " in line]
    assert len(reports) == 2, done.stderr[-3000:]
    assert str(shards[0]) in reports[0] and "not a readable parquet file" in reports[0]
    assert str(shards[2]) in reports[1] and "checksum" in reports[1]
    assert len(list(run_dir.glob(f"generate/{shards[0].name}.corrupt-*"))) == 1
    assert len(list(run_dir.glob(f"generate/{shards[2].name}.corrupt-*"))) == 1
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    # generated again from their own seeds: the same completions, the same published rows
    assert _completions(run_dir).equals(straight_completions)
    assert resumed["counts"] == straight["counts"]
    assert pq.read_table(Path(resumed["dataset_dir"]) / "data").to_pylist() == straight_rows

    # The run folder's resolved spec checks from another working folder as the spec it was built from.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checks = [
        subprocess.run([POLYCULTURE, "check", str(path), "--json"], capture_output=True, text=True, cwd=cwd, timeout=600)
        for path, cwd in ((spec_path, spec_dir), (run_dir / "spec.resolved.yaml", elsewhere))
    ]  # fmt: skip
    assert [c.returncode for c in checks] == [0, 0], checks[1].stderr[-3000:]
    original, from_run = (json.loads(c.stdout) for c in checks)
    assert from_run == original
    assert from_run["fingerprint"] == json.loads((run_dir / "run.json").read_text())["fingerprint"]
