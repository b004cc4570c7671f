"""Benchmarks to decontaminate against: the built-in CHAMP problems (registry package champ-dataset) and a user's
data file or folder (index.sources reads it). A benchmark is its name, where it came from, and its items' ids and
texts."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from polyculture.index.sources import SourceError, read_texts

CHAMP = "champ"
CHAMP_PACKAGE = "champ-dataset"
# Inside the package folder; the version this path was read from (1.0.0) is pinned in pyproject.
CHAMP_FILE = Path("dataset_files") / "v0.json"
BUILT_IN = (CHAMP,)


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # a file or folder path, or the package a built-in benchmark ships in
    item_ids: tuple[str, ...]
    texts: tuple[str, ...]


def champ_file() -> Path | None:
    """The CHAMP problems file of the installed champ-dataset package; None when the package is not installed.
    Found without importing the package (its import pulls more than this file needs)."""
    found = importlib.util.find_spec("champ_dataset")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / CHAMP_FILE
    return path if path.is_file() else None


def read_champ() -> Benchmark:
    """The 270 CHAMP competition problems: ids (P_<category>_<n>) and problem texts (`_text`)."""
    path = champ_file()
    if path is None:
        raise SourceError(f"the built-in benchmark '{CHAMP}' needs the {CHAMP_PACKAGE} package: pip install {CHAMP_PACKAGE}")
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    ids = tuple(sorted(problems, key=_champ_order))
    try:
        package = f"{CHAMP_PACKAGE} {metadata.version(CHAMP_PACKAGE)}"
    except metadata.PackageNotFoundError:  # files present without the package's metadata (a vendored copy)
        package = CHAMP_PACKAGE
    return Benchmark(CHAMP, f"{package} ({CHAMP_FILE.as_posix()})", ids, tuple(problems[i]["_text"] for i in ids))


def _champ_order(item_id: str) -> tuple[str, int]:
    # "P_Number-Theory_14": by category, then by number (not "1, 10, 11, ...").
    head, _, number = item_id.rpartition("_")
    return head, int(number) if number.isdigit() else 0


def read_benchmark_file(name: str, source: Path, text_column: str, id_column: str | None = None) -> Benchmark:
    """A user's benchmark: rows of a parquet / JSON Lines / CSV file, or every parquet file under a folder."""
    ids, texts = read_texts(source, text_column, id_column)
    return Benchmark(name, str(source), tuple(ids), tuple(texts))
