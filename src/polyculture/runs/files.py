"""Writing run files: strict JSON values, atomic and durable writes, parquet files that carry a checksum of their
rows so a damaged copy is told apart from a good one when it is read back, and `DiskFull`, what a write that ran out
of space (full disk, quota, file size limit) raises instead of the bare OSError."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import polars as pl

# Key of the parquet key-value metadata entry that holds the sha256 of the rows (see `rows_sha256`).
ROWS_SHA256 = "polyculture.rows_sha256"


class DamagedFile(ValueError):
    """A file that is there but cannot be trusted: unreadable, cut short, or holding other rows than were written."""


# errno -> what ran out, for the codes a write fails with when there is no room for it.
NO_SPACE = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit (ulimit -f) was reached",
}


class DiskFull(OSError):
    """A write ran out of space. Its message (one line) names the path and, where known, the bytes it needed and
    those free; a build stopped by it resumes with the same command once space is freed."""

    def __init__(self, code: int, path: Path | str, needed: int | None = None, file: str | None = None) -> None:
        self.path, self.needed, self.file = Path(path), needed, file
        super().__init__(code, _disk_full_message(code, self.path, needed, file))

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process and Prefect boundaries whole
        return (type(self), (self.errno, self.path, self.needed, self.file))


def _disk_full_message(code: int, path: Path, needed: int | None, file: str | None) -> str:
    where = f"'{path}'" + (f" (file '{file}')" if file and Path(file) != path else "")
    parts = [f"{NO_SPACE.get(code, os.strerror(code))} while writing {where}"]
    if needed is not None:
        parts.append(f"it needs about {_size(needed)}")
    if code != errno.EFBIG:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None:
            parts.append(f"{_size(shutil.disk_usage(existing).free)} free there")
    return "; ".join(parts) + "; free some space and run the same command again (a build resumes where it stopped)"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    scaled = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024:
            break
    return f"{scaled:.1f} {unit}"


def no_space_code(exc: BaseException) -> int | None:
    """The errno of running out of space behind `exc` (its causes included), or None. Libraries that wrap the
    OSError (pyarrow, polars, FAISS, shutil.copytree) keep only its text, so that is read too."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            return current.errno
        text = str(current)
        for code in NO_SPACE:
            if os.strerror(code) in text:
                return code
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def disk_full_as(path: Path, needed: int | None = None) -> Iterator[None]:
    """Inside the block, a write that runs out of space raises DiskFull naming `path` (and the file, when the error
    names another); every other exception passes unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        code = no_space_code(exc)
        if code is None:
            raise
        filename = getattr(exc, "filename2", None) or getattr(exc, "filename", None)  # a copy's target, not source
        raise DiskFull(code, path, needed, str(filename) if filename else None) from exc


def jsonable(value: Any) -> Any:
    """Plain Python types only; NaN/inf become None so the file is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the finished file `tmp` to `path` so that a power cut leaves either the old file or the whole new one:
    its bytes reach the disk before the rename, and the folder entry after it."""
    with open(tmp, "rb") as handle, disk_full_as(path, tmp.stat().st_size):  # a delayed allocation fails here
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    # Write, sync, then rename: a crash never leaves a half-written file behind.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_full_as(path, len(data)):
            tmp.write_bytes(data)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a cut-short copy only takes the space that is missing
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def rows_sha256(frame: pl.DataFrame) -> str:
    """A sha256 of a frame's column names and values, row by row, as JSON: the same for the same rows whatever the
    parquet encoding or the polars version that wrote or read them."""
    digest = hashlib.sha256(json.dumps(frame.columns).encode())
    for row in frame.iter_rows():
        digest.update(b"\n" + json.dumps(row, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


def write_parquet_checked(frame: pl.DataFrame, path: Path) -> None:
    """Write `frame` to `path` atomically and durably, with the sha256 of its rows in the file's metadata."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with disk_full_as(path, frame.estimated_size()):
            frame.write_parquet(tmp, metadata={ROWS_SHA256: rows_sha256(frame)})
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_parquet_checked(path: Path) -> pl.DataFrame:
    """The rows of a parquet file written by `write_parquet_checked`; DamagedFile when its footer or data cannot be
    read or its rows differ from the checksum written with them. A file without a checksum (written by earlier
    versions) is trusted when it reads.

    pyarrow reads it (polars aborts the whole process on some damaged files instead of raising), and checks it whole
    before polars sees it: polars panics on strings that are not UTF-8, in the rows or in the metadata."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            written = (parquet.metadata.metadata or {}).get(ROWS_SHA256.encode())
            table = parquet.read()
        table.validate(full=True)
        frame = pl.from_arrow(table.replace_schema_metadata(None))
    except (pa.ArrowException, OSError, ValueError, pl.exceptions.PanicException) as exc:
        raise DamagedFile(f"not a readable parquet file ({_first_line(exc)})") from None
    assert isinstance(frame, pl.DataFrame)
    if written is not None and written.decode(errors="replace") != rows_sha256(frame):
        raise DamagedFile(f"its {frame.height} rows do not match the checksum written with them")
    return frame


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
