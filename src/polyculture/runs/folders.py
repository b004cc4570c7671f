"""Run folders: naming a new run, finding an unfinished run of the same spec to resume, and one build per folder.

A run folder holds `run.json` from its start ({"fingerprint", "started"}) and `result.json` once it finished; a run
whose spec pushes to a Hub on build is finished only once result.json records the push. A build
holds an exclusive lock on `<run>/.lock` while it runs (flock: released by the kernel when the process dies, kill -9
included), so a second build never writes into a folder a live build is using, and an unfinished folder whose lock
is free is one whose build died.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from polyculture.runs.files import write_text_atomic
from polyculture.spec import BuildSpec

RUN_FILE = "run.json"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"


class RunBusy(RuntimeError):
    """The run folder cannot be used by this build: a live build holds it, or it belongs to another spec."""


def new_run_id(spec: BuildSpec) -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{spec.fingerprint()[:8]}"


def _fingerprints(spec: BuildSpec) -> set[str]:
    """The fingerprints a run folder of this spec may hold in run.json (folders started before paths were located
    hold the spec's paths as written)."""
    return {spec.fingerprint(), spec.fingerprint(paths_as_written=True)}


def unfinished_runs(dataset_root: Path, spec: BuildSpec) -> list[str]:
    """Run ids under dataset_root started from this very spec (same fingerprint) that never finished (a push still
    owed counts as unfinished) and that no live build holds; newest first."""
    fingerprints = _fingerprints(spec)
    found: list[tuple[str, str]] = []
    if not dataset_root.is_dir():
        return []
    for run_dir in dataset_root.iterdir():
        run_file = run_dir / RUN_FILE
        if not run_file.is_file() or _finished(run_dir, spec):
            continue
        try:
            info = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a damaged run.json: not a run we can vouch for
        if isinstance(info, dict) and info.get("fingerprint") in fingerprints and not _locked(run_dir):
            found.append((str(info.get("started", "")), run_dir.name))
    return [name for _, name in sorted(found, reverse=True)]


def _finished(run_dir: Path, spec: BuildSpec) -> bool:
    """result.json is there and, when the spec pushes on build, records the push (a build killed or failed between
    result.json and its push is resumed to push, instead of a new run generated again)."""
    result_file = run_dir / RESULT_FILE
    if not result_file.exists():
        return False
    hub = spec.publish.hub
    if hub is None or not hub.push_on_build:
        return True
    try:
        result = json.loads(result_file.read_text())
    except (OSError, json.JSONDecodeError):
        return True  # written atomically: unreadable means damaged, not a push owed
    return not isinstance(result, dict) or result.get("hub") is not None


def _fingerprint(run_file: Path) -> str | None:
    try:
        return json.loads(run_file.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _locked(run_dir: Path) -> bool:
    lock = run_dir / LOCK_FILE
    if not lock.exists():
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextmanager
def hold_run(run_dir: Path, spec: BuildSpec) -> Iterator[bool]:
    """Lock run_dir for this build (RunBusy when a live build holds it) and record its start; yields whether the
    folder already held an earlier start of this run (a resume)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 - held for the whole build
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"run folder '{run_dir}' is in use by another build (pid in {run_dir / LOCK_FILE})") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        run_file = run_dir / RUN_FILE
        resumed = run_file.is_file()
        if resumed:
            started_from = _fingerprint(run_file)
            if started_from not in _fingerprints(spec):
                # Its shards were sampled for another spec: reusing them would publish a mix of two specs.
                raise RunBusy(
                    f"run folder '{run_dir}' was started from a different spec (fingerprint "
                    f"{(started_from or 'unreadable')[:12]}, this spec {spec.fingerprint()[:12]}); use another run id"
                )
        else:
            info = {"fingerprint": spec.fingerprint(), "started": datetime.now(UTC).isoformat()}
            write_text_atomic(run_file, json.dumps(info, indent=2) + "\n")
        yield resumed
    finally:
        handle.close()  # releases the lock
