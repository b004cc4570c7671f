"""Run folders: naming a new run, finding an unfinished run of the same spec to resume, and one build per folder.

A run folder holds `run.json` from its start ({"fingerprint", "started"}) and `result.json` once it finished; a run
whose spec pushes to a Hub on build is finished only once result.json records the push. A build
holds an exclusive lock on `<run>/.lock` while it runs (flock: released by the kernel when the process dies, kill -9
included), so a second build never writes into a folder a live build is using, and an unfinished folder whose lock
is free is one whose build died. The lock file names its holder (pid, host, since when, which build), so a refused
build can say who is in the way.

A build that picks its own folder (`hold_build_run` without a run id) does so under `<dataset>/.runs.lock`, so two
builds starting at once never both pick the same dead run, nor both miss each other: while a live build of the same
spec holds an unfinished folder, a second build of that spec is refused (RunBusy) unless it asks for a new run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from polyculture.runs.files import write_text_atomic
from polyculture.spec import BuildSpec

RUN_FILE = "run.json"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"
CHOOSE_LOCK = ".runs.lock"  # in the dataset folder: held while a build picks and locks its run folder

_held: list[Path] = []  # run folders this process has held, in order (what a command reports after a failure)


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
    return [name for name, live in _unfinished(dataset_root, spec) if not live]


def live_runs(dataset_root: Path, spec: BuildSpec) -> list[str]:
    """Run ids under dataset_root started from this very spec, unfinished, that a live build holds now; newest first."""
    return [name for name, live in _unfinished(dataset_root, spec) if live]


def _unfinished(dataset_root: Path, spec: BuildSpec) -> list[tuple[str, bool]]:
    """(run id, held by a live build) of every unfinished run of this spec under dataset_root, newest first."""
    fingerprints = _fingerprints(spec)
    found: list[tuple[str, str, bool]] = []
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
        if isinstance(info, dict) and info.get("fingerprint") in fingerprints:
            found.append((str(info.get("started", "")), run_dir.name, _locked(run_dir)))
    return [(name, live) for _, name, live in sorted(found, reverse=True)]


def lock_holder(run_dir: Path) -> str:
    """Who holds a run folder's lock, as its lock file says (pid, host, since when, which build)."""
    try:
        text = (run_dir / LOCK_FILE).read_text().strip()
    except OSError:
        return "holder unknown"
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return f"pid {text}" if text.isdigit() else "holder unknown"  # a lock written before holders were named
    if not isinstance(info, dict):
        return "holder unknown"
    what = f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"
    return f"{what}: {info['build']}" if info.get("build") else what


def last_held_run() -> Path | None:
    """The run folder this process held last (None: none yet), for a command reporting a build that failed."""
    return _held[-1] if _held else None


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
def hold_build_run(
    dataset_root: Path, spec: BuildSpec, *, run_id: str | None = None, resume: bool = True, build: str = ""
) -> Iterator[tuple[Path, bool]]:
    """Pick this build's run folder under dataset_root and lock it (see `hold_run`); yields (run folder, resumed).

    Without a run id: RunBusy while a live build of this spec holds an unfinished run (unless not `resume`), else
    the newest dead unfinished run of this spec when `resume`, else a new run. Picking and locking happen under
    the dataset's CHOOSE_LOCK, so two builds starting together see each other."""
    dataset_root.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        with open(dataset_root / CHOOSE_LOCK, "a") as choosing:
            fcntl.flock(choosing, fcntl.LOCK_EX)  # held for a moment: the time to read run.json files and lock one
            if run_id is None:
                run_id = _choose_run_id(dataset_root, spec, resume)
            resumed = stack.enter_context(hold_run(dataset_root / run_id, spec, build=build))
        yield dataset_root / run_id, resumed


def _choose_run_id(dataset_root: Path, spec: BuildSpec, resume: bool) -> str:
    if resume:
        live = live_runs(dataset_root, spec)
        if live:
            busy = dataset_root / live[0]
            raise RunBusy(
                f"a build of this spec is already running in '{busy}' ({lock_holder(busy)}); wait for it to finish, "
                "or start another run beside it with --new-run"
            )
        unfinished = unfinished_runs(dataset_root, spec)
        if unfinished:
            return unfinished[0]
    run_id = base = new_run_id(spec)
    suffix = 2
    while (dataset_root / run_id).exists():  # another new run of this spec started within the same second
        run_id, suffix = f"{base}-{suffix}", suffix + 1
    return run_id


@contextmanager
def hold_run(run_dir: Path, spec: BuildSpec, *, build: str = "") -> Iterator[bool]:
    """Lock run_dir for this build (RunBusy when a live build holds it, naming the holder) and record its start;
    yields whether the folder already held an earlier start of this run (a resume). `build` says which build holds
    it (e.g. a Prefect flow run), for the message another build gets."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 - held for the whole build
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"run folder '{run_dir}' is in use by another build ({lock_holder(run_dir)})") from None
        handle.truncate(0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(UTC).isoformat(timespec="seconds"), "build": build}  # fmt: skip
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        _held.append(run_dir)
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
