"""Faults across a whole build: a real `polyculture build` subprocess SIGKILLs itself at one point of the pipeline
(tests/kill_switch.py, installed as its sitecustomize), then the same command runs again. Every case must end where an
uninterrupted build of the same spec and seed ends: exit 0, the same published rows, no finished shard generated
again, no temporary file left, and at no moment a folder under a published name (dataset or release index) that is
not complete. A full disk must stop the build with a one-line error and publish nothing; once space is freed, the
same command finishes the run.

The uninterrupted build runs once per module; the cases after generation start from copies of its shards (the kill
points lie after them, and generating them again would only cost time). A representative subset runs by default;
POLYCULTURE_FAULTS=all (or the full run, make test-full) runs every case.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PROJECT, SMALL_SCHEMA, small_spec_dict
from hub_server import HubServer
from test_resume import POLYCULTURE, _group_gone, _shards

# The uninterrupted build (a module fixture) counts toward the first case's timeout: generation on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
ALL_FAULTS = os.environ.get("POLYCULTURE_FAULTS") == "all" or os.environ.get("POLYCULTURE_TEST_FULL") == "1"
ALICE = "hf_aliceFAULTSTOKEN0123456789SECRET"
DATASET = "tiny-bios"
BUILD_TIMEOUT = 1200  # model load and generation on a busy 2-core machine


def _spec(**overrides: object) -> dict:
    # Two shards of 2 prompts; no top-up round, so every case has the same shards to reuse.
    return small_spec_dict(
        model={"batch_size": 2}, sampling={"max_tokens": 100, "n": 2}, rebalance={"top_up_rounds": 0}, **overrides
    )


def _write_spec(folder: Path, spec: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.schema.json").write_text(json.dumps(SMALL_SCHEMA))
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


@dataclass
class Builds:
    """Runs `polyculture build` as a subprocess with this tree's sources and the kill switch on its path."""

    site: Path
    env: dict[str, str]

    def command(self, spec_path: Path, out: Path, run_id: str | None) -> list[str]:
        run = ["--run-id", run_id] if run_id else []
        return [POLYCULTURE, "build", str(spec_path), *run, "--output-dir", str(out), "--json", "--quiet"]

    def run(
        self, spec_path: Path, out: Path, run_id: str | None = None, file_size_limit: int | None = None
    ) -> subprocess.CompletedProcess:
        """The build to its end; with file_size_limit, every file it writes stops at that many bytes (EFBIG)."""

        def limit_file_size() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        return subprocess.run(
            self.command(spec_path, out, run_id), env=self.env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
            preexec_fn=limit_file_size if file_size_limit is not None else None,
        )  # fmt: skip

    def killed_at(self, point: str, spec_path: Path, out: Path, run_id: str, kill_if: str = "") -> str:
        """Run the build until it SIGKILLs itself at `point`; returns the point the kill switch noted."""
        note = out.parent / f"{run_id}.killed-at"
        log = out.parent / f"{run_id}.stderr.log"
        env = {**self.env, "POLYCULTURE_TEST_KILL_AT": point, "POLYCULTURE_TEST_KILL_IF": kill_if,
               "POLYCULTURE_TEST_KILL_NOTE": str(note)}  # fmt: skip
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                self.command(spec_path, out, run_id), env=env,
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        try:
            proc.wait(timeout=BUILD_TIMEOUT)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything the build started
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)
        said = log.read_text(errors="replace")[-3000:]
        assert proc.returncode == -signal.SIGKILL, f"the build ended with {proc.returncode}, not killed:\n{said}"
        assert _group_gone(proc.pid), "a process of the killed build is still running"
        assert note.is_file(), f"killed, but not by the kill switch at {point}:\n{said}"
        return note.read_text()


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, prefect_server) -> Builds:
    import prefect.settings

    site = tmp_path_factory.mktemp("site")
    shutil.copy(PROJECT / "tests" / "kill_switch.py", site / "sitecustomize.py")
    path = os.pathsep.join([str(site), str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        # Every build talks to the session's Prefect server: no temporary server per build to start or leave behind.
        "PREFECT_API_URL": str(prefect.settings.get_current_settings().api.url),
        "HF_HUB_DISABLE_XET": "1",  # plain LFS uploads: the Hub stand-in speaks no Xet
        "HF_TOKEN": ALICE,
        "HF_TOKEN_PATH": str(site / "no-token"),
    }
    return Builds(site, env)


@dataclass(frozen=True)
class Reference:
    """The uninterrupted build every case is compared with."""

    spec: dict
    run_dir: Path
    rows: list[dict]
    shards: list[Path]


def _rows(dataset_dir: Path) -> list[dict]:
    return pq.read_table(dataset_dir / "data").to_pylist()


@pytest.fixture(scope="module")
def reference(builds: Builds, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    spec = _spec()
    done = builds.run(_write_spec(root / "spec", spec), root / "out", "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    run_dir = Path(result["run_dir"])
    shards = sorted(run_dir.glob("generate/*.parquet"))
    assert result["records"] > 0 and len(shards) == 2
    return Reference(spec, run_dir, _rows(Path(result["dataset_dir"])), shards)


# ---- what a folder may look like at any moment ----------------------------------------------------------------------


def _assert_nothing_half_published(run_dir: Path, rows: list[dict], cache: Path) -> None:
    """Every folder a reader would take as published is whole: the dataset folder only under its final name, with
    every row; a release index only with all its files. Half-written folders may exist only under hidden names."""
    final = f"{DATASET}-{run_dir.name}"
    for folder in run_dir.iterdir():
        looks_published = (folder / "README.md").exists() or (folder / "data").exists()
        if folder.name.startswith(".") or not folder.is_dir() or not looks_published:
            continue
        assert folder.name == final, f"{folder} looks like a dataset but is not the run's final folder"
        for name in ("README.md", "report.json", "report.md", "report.html"):
            assert (folder / name).is_file(), f"{folder} is published without {name}"
        loaded = datasets.load_dataset(str(folder), split="train", cache_dir=str(cache / str(time.monotonic_ns())))
        assert loaded.num_rows == len(rows) and _rows(folder) == rows
    reference = run_dir / "reference"
    if (reference / "reference.json").is_file():
        manifest = json.loads((reference / "reference.json").read_text())
        assert all((reference / name).is_file() for name in ("entries.parquet", "index.faiss", "index.json"))
        assert manifest["count"] == len(rows)


def _leftovers(run_dir: Path) -> list[str]:
    """Temporary files and staging folders: a finished run has none."""
    found = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name]
    found += [p for p in run_dir.glob(".reference-*")]
    return sorted(str(p.relative_to(run_dir)) for p in found)


# ---- the kill points -------------------------------------------------------------------------------------------------


def _no_report(run_dir: Path) -> None:
    assert len(list(run_dir.glob("generate/*.parquet"))) == 2
    assert not (run_dir / "report.json").exists() and not (run_dir / f"{DATASET}-{run_dir.name}").exists()


def _mid_shard(run_dir: Path) -> None:
    # the second shard's bytes are on disk under its temporary name only
    assert (run_dir / "generate" / "shard-00001.parquet.tmp").is_file()
    assert not (run_dir / "generate" / "shard-00001.parquet").exists()


def _staged_not_renamed(run_dir: Path) -> None:
    staged = list(run_dir.glob(f".{DATASET}-{run_dir.name}.partial-*"))
    assert len(staged) == 1 and (staged[0] / "README.md").is_file()
    assert not (run_dir / f"{DATASET}-{run_dir.name}").exists()


def _renamed_no_result(run_dir: Path) -> None:
    assert (run_dir / f"{DATASET}-{run_dir.name}" / "README.md").is_file()
    assert not (run_dir / "result.json").exists() and not (run_dir / "reference").exists()


def _finished_not_pushed(run_dir: Path) -> None:
    assert json.loads((run_dir / "result.json").read_text())["hub"] is None


@dataclass(frozen=True)
class KillPoint:
    name: str
    at: str  # POLYCULTURE_TEST_KILL_AT
    left: Callable[[Path], None]  # asserts what the kill left on disk
    kill_if: str = ""
    seeded: int = 2  # shards of the uninterrupted build copied in before the killed build starts
    hub: bool = False
    default: bool = False  # runs without POLYCULTURE_FAULTS=all


POINTS = [
    KillPoint("generate-mid-shard", "polyculture.runs.files:replace_durably", _mid_shard, "shard-00001", seeded=1),
    KillPoint("validate", "polyculture.stages.validate:validate", _no_report),
    KillPoint("dedup", "polyculture.stages.dedup:dedup", _no_report, default=True),
    KillPoint("extract", "polyculture.stages.extract:extract_attributes", _no_report),
    KillPoint("rebalance", "polyculture.stages.rebalance:rebalance", _no_report),
    KillPoint("report", "polyculture.report.write:write_report", _no_report),
    # its second check of the final folder comes right before the rename, the staging folder complete
    KillPoint("publish-before-rename", "polyculture.stages.publish:_refuse_non_empty#2", _staged_not_renamed,
              default=True),  # fmt: skip
    KillPoint("publish-after-rename", "polyculture.stages.publish:publish_local@after", _renamed_no_result),
    KillPoint("before-hub-push", "polyculture.hub.push:push_dataset", _finished_not_pushed, hub=True, default=True),
    # pushed and tagged, but result.json never heard of it: the re-run must find the push, not push again
    KillPoint("after-hub-push", "polyculture.hub.push:push_dataset@after", _finished_not_pushed, hub=True),
]


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer({ALICE: "alice"}) as server:
        yield server


@pytest.mark.parametrize("point", POINTS, ids=[p.name for p in POINTS])
def test_killed_build_reruns_to_the_uninterrupted_dataset(
    point: KillPoint, builds: Builds, reference: Reference, hub: HubServer, tmp_path: Path
) -> None:
    if not (point.default or ALL_FAULTS):
        pytest.skip("one of the full matrix: set POLYCULTURE_FAULTS=all or run make test-full")
    run_id = point.name
    publish = {"hub": {"repo_id": "alice/tiny-bios", "endpoint": hub.url, "push_on_build": True}} if point.hub else {}
    spec_path = _write_spec(tmp_path / "spec", {**reference.spec, "publish": publish})
    out = tmp_path / "out"
    run_dir = out / DATASET / run_id
    (run_dir / "generate").mkdir(parents=True)
    for shard in reference.shards[: point.seeded]:
        shutil.copy2(shard, run_dir / "generate" / shard.name)

    assert builds.killed_at(point.at, spec_path, out, run_id, point.kill_if) == point.at
    point.left(run_dir)
    _assert_nothing_half_published(run_dir, reference.rows, tmp_path / "cache")
    before = _shards(run_dir)

    # The same command without a run id: the newest unfinished run of this spec is the one resumed.
    done = builds.run(spec_path, out)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["run_id"] == run_id and result["resumed"] is True and result["corrupt_shards"] == 0
    after = _shards(run_dir)
    assert {name: after[name] for name in before} == before and len(after) == 2  # no finished shard made again
    assert _rows(Path(result["dataset_dir"])) == reference.rows
    assert _leftovers(run_dir) == []
    _assert_nothing_half_published(run_dir, reference.rows, tmp_path / "cache")
    if point.hub:
        repo = hub.repos["alice/tiny-bios"]
        assert result["hub"]["tag"] == run_id and list(repo.tags) == [run_id]
        assert len(repo.commits) == 2  # the repo's creation, then this run's one push
        pushed = hub.files("alice/tiny-bios", run_id)
        pushed.pop(".gitattributes", None)
        published = Path(result["dataset_dir"])
        assert pushed == {p.relative_to(published).as_posix(): p.read_bytes() for p in published.rglob("*") if p.is_file()}
        assert json.loads((run_dir / "result.json").read_text())["hub"] == result["hub"]


# ---- a full disk -----------------------------------------------------------------------------------------------------


@contextmanager
def _small_disk(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.mark.parametrize("disk", ["tmpfs", "file-size-limit"])
def test_full_disk_stops_in_one_line_publishes_nothing_and_resumes_once_freed(
    disk: str, builds: Builds, reference: Reference, tmp_path: Path
) -> None:
    """tmpfs: the run folder on a 512 KiB filesystem, too small for the dataset folder beside the run's reports.
    file-size-limit (no root needed): RLIMIT_FSIZE of 128 KiB, below the HTML report's size; writes fail with EFBIG."""
    spec_path = _write_spec(tmp_path / "spec", reference.spec)
    with ExitStack() as stack:
        out = stack.enter_context(_small_disk(tmp_path / "disk", "512k")) if disk == "tmpfs" else tmp_path / "out"
        run_dir = out / DATASET / "full"
        (run_dir / "generate").mkdir(parents=True)
        for shard in reference.shards:
            shutil.copy2(shard, run_dir / "generate" / shard.name)
        before = _shards(run_dir)

        stopped = builds.run(spec_path, out, "full", file_size_limit=128 * 1024 if disk != "tmpfs" else None)
        errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
        assert stopped.returncode == 9 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
        assert len(errors) == 1 and str(run_dir) in errors[0], stopped.stderr[-3000:]
        what = "no space left on the device" if disk == "tmpfs" else "the file size limit (ulimit -f) was reached"
        assert what in errors[0] and "it needs about" in errors[0] and "run the same command again" in errors[0]
        assert not (run_dir / f"{DATASET}-full").exists() and not (run_dir / "result.json").exists()
        _assert_nothing_half_published(run_dir, reference.rows, tmp_path / "cache")

        if disk == "tmpfs":  # space freed: the same filesystem, grown
            subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        resumed = builds.run(spec_path, out)  # the same command (no limit now), no run id: resumes the run
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        result = json.loads(resumed.stdout)
        assert result["run_id"] == "full" and result["resumed"] is True and _shards(run_dir) == before
        assert _rows(Path(result["dataset_dir"])) == reference.rows
        assert _leftovers(run_dir) == []
        _assert_nothing_half_published(run_dir, reference.rows, tmp_path / "cache")
