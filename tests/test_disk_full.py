"""DiskFull: a write that runs out of space says so in one line naming the path and the bytes it needed, leaves no
temporary file behind, and crosses a process boundary whole; a replaced release index is never half-deleted under
its name. (The whole build on a full disk: tests/test_faults.py.)"""

from __future__ import annotations

import errno
import multiprocessing
import pickle
import resource
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from polyculture.cli.errors import exit_code_for
from polyculture.index.releases import load_release_index, write_release_index
from polyculture.runs.files import DiskFull, disk_full_as, no_space_code, write_parquet_checked, write_text_atomic


def _write_under_file_size_limit(directory: str, limit: int) -> list[DiskFull]:
    """In a child process: files stop at `limit` bytes (EFBIG, as a full disk gives ENOSPC). Never in pytest's own
    process: its output file (a CI log) would hit the limit too."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    frame = pl.DataFrame({"text": [str(i) * 50 for i in range(2000)]})
    writes = [
        lambda: write_text_atomic(Path(directory) / "report.html", "x" * 10_000),
        lambda: write_parquet_checked(frame, Path(directory) / "shard-00000.parquet"),
    ]
    errors: list[DiskFull] = []
    for write in writes:
        try:
            write()
        except DiskFull as error:
            errors.append(error)
    return errors  # pickled back to the test: Prefect and cluster workers pickle exceptions the same way


def test_writers_raise_disk_full_and_leave_no_temporary_file(tmp_path: Path) -> None:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        errors = child.submit(_write_under_file_size_limit, str(tmp_path), 4096).result(timeout=120)
    assert len(errors) == 2 and all(type(error) is DiskFull for error in errors)
    text_error, parquet_error = errors
    assert list(tmp_path.iterdir()) == []  # neither the file nor a cut-short .tmp of it
    message = str(text_error)
    assert message.startswith(f"the file size limit (ulimit -f) was reached while writing '{tmp_path / 'report.html'}'")
    assert "it needs about 9.8 KiB" in message and "\n" not in message and "run the same command again" in message
    assert text_error.errno == errno.EFBIG and exit_code_for(text_error) == 9
    assert str(tmp_path / "shard-00000.parquet") in str(parquet_error)
    back = pickle.loads(pickle.dumps(text_error))
    assert type(back) is DiskFull and str(back) == message and back.needed == 10_000


def test_library_errors_that_only_keep_the_text_are_recognised(tmp_path: Path) -> None:
    wrapped = RuntimeError("write error in /x/index.faiss: 4051 != 4608000 (No space left on device)")
    assert no_space_code(wrapped) == errno.ENOSPC
    with pytest.raises(DiskFull, match=rf"no space left on the device while writing '{tmp_path}'") as info:
        with disk_full_as(tmp_path):
            raise wrapped
    assert "free there" in str(info.value) and info.value.__cause__ is wrapped
    with pytest.raises(ValueError, match="not about space"):  # anything else passes unchanged
        with disk_full_as(tmp_path):
            raise ValueError("not about space")


def test_a_replaced_release_index_is_whole_or_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write(count: int) -> Path:
        vectors = np.eye(count, 8, dtype=np.float32)
        ids = [f"r{i}" for i in range(count)]
        return write_release_index(tmp_path / "reference", ids, ids, vectors, embedding_model="m", source=str(count))

    write(3)
    renamed: list[tuple[str, str]] = []
    real_rename = Path.rename

    def rename_then_fail(self: Path, target: Path) -> Path:
        renamed.append((self.name, Path(target).name))
        if self.name.startswith(".reference-") and Path(target).name == "reference":
            raise OSError(errno.EIO, "the new index cannot be moved in")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_fail)
    with pytest.raises(OSError, match="cannot be moved in"):
        write(5)
    monkeypatch.undo()
    # the old index was moved away whole (never deleted file by file under its name), then put back
    assert renamed[0] == ("reference", "reference")
    assert load_release_index(tmp_path / "reference", embedding_model="m").size == 3
    write(5)
    assert load_release_index(tmp_path / "reference", embedding_model="m").size == 5
    assert [p.name for p in tmp_path.iterdir()] == ["reference"]  # no staging or old folder left


def test_a_reported_failure_is_one_error_line_without_prefects_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    import typer

    from polyculture.cli.errors import exit_codes

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    task_runs = logging.getLogger("prefect.task_runs")
    task_runs.addHandler(handler)

    def build(error: Exception) -> None:
        try:
            raise error
        except Exception:  # as Prefect's task engine logs a failed task run
            task_runs.error("Task run failed with exception: %r", error, exc_info=True)
            raise

    try:
        with pytest.raises(typer.Exit) as stopped:
            exit_codes(build)(DiskFull(errno.ENOSPC, "/out/run", 1000))
        # what the command printed for the reported failure alone (Prefect's own handlers, once an earlier test set
        # up its logging, print a logging error of their own for the bug's record outside a run)
        error = capsys.readouterr().err
        with pytest.raises(KeyError):  # a bug keeps its record and its traceback
            exit_codes(build)(KeyError("bug"))
    finally:
        task_runs.removeHandler(handler)
    assert stopped.value.exit_code == 9 and seen == ["Task run failed with exception: KeyError('bug')"]
    assert error.startswith("error: no space left on the device while writing '/out/run'") and "Traceback" not in error
    assert not [f for f in task_runs.filters if type(f).__name__ == "_ReportedFailures"]  # removed on return
