"""reference: a stored similarity index of records already published (earlier releases) or of a reference dataset,
which new records are deduplicated against.

A reference folder holds `reference.json` (format, embedding model, size, source), `entries.parquet` (one row per
indexed record: record_id, text_hash, source) and the FAISS index (`index.faiss` + `index.json`). Every build writes
one for its final records under `<run>/reference/`, so `dedup.reference: [<earlier run folder>]` just works.
The folder is written beside its final place and renamed in, so a crash never leaves a half-written reference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from polyculture.index.similarity import SimilarityIndex, choose_index
from polyculture.index.vectors import normalise_rows

FORMAT = 1
MANIFEST = "reference.json"
ENTRIES = "entries.parquet"


class ReferenceError(ValueError):
    """A reference folder that is missing, malformed, or made with another embedding model."""


@dataclass(frozen=True)
class Reference:
    folder: Path
    source: str
    embedding_model: str
    record_ids: list[str]
    hash_to_row: dict[str, int]
    index: SimilarityIndex

    @property
    def size(self) -> int:
        return len(self.record_ids)


def locate_reference(path: str | Path, base_dir: Path = Path(".")) -> Path:
    """The reference folder for `path`: the folder itself, or a run folder's `reference/` (relative paths beside the
    spec first, then the working folder)."""
    given = Path(path).expanduser()
    options = [given] if given.is_absolute() else [base_dir / given, Path.cwd() / given]
    for option in options:
        for folder in (option, option / "reference"):
            if (folder / MANIFEST).is_file():
                return folder.resolve()
    raise ReferenceError(
        f"'{path}' is not a reference index: expected a folder with {MANIFEST} (written by "
        "`polyculture index`) or a build's run folder holding reference/"
    )


def write_reference(
    folder: Path,
    record_ids: list[str],
    texts: list[str],
    embeddings: np.ndarray,
    *,
    embedding_model: str,
    source: str,
) -> Path:
    """Index the records (their normalised-text hashes and embeddings) into `folder`, replacing it whole."""
    from polyculture.index.text import text_hash

    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(record_ids) or len(texts) != len(record_ids):
        raise ValueError(
            f"reference: {len(record_ids)} ids, {len(texts)} texts and embeddings of shape {embeddings.shape} disagree"
        )
    embeddings = normalise_rows(embeddings)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        index = SimilarityIndex.build(embeddings, choose_index(len(record_ids), device="cpu"))
        index.save(staging)
        pl.DataFrame(
            {"record_id": record_ids, "text_hash": [text_hash(t or "") for t in texts], "source": source},
            schema={"record_id": pl.String, "text_hash": pl.String, "source": pl.String},
        ).write_parquet(staging / ENTRIES)
        manifest = {
            "format": FORMAT,
            "source": source,
            "embedding_model": embedding_model,
            "dim": int(embeddings.shape[1]) if embeddings.size else None,
            "count": len(record_ids),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_reference(folder: Path, *, embedding_model: str) -> Reference:
    """Load a reference folder, refusing one whose vectors came from another embedding model (cosines would be
    meaningless across models)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = pl.read_parquet(folder / ENTRIES)
        index = SimilarityIndex.load(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ReferenceError(f"reference '{folder}' cannot be read: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ReferenceError(f"reference '{folder}': format {manifest.get('format')!r} is not {FORMAT}")
    if manifest.get("embedding_model") != embedding_model:
        raise ReferenceError(
            f"reference '{folder}' was embedded with '{manifest.get('embedding_model')}', but this build embeds with "
            f"'{embedding_model}': rebuild the reference with the same model"
        )
    if index.ntotal != entries.height:
        raise ReferenceError(f"reference '{folder}': index holds {index.ntotal} vectors but {entries.height} entries")
    hashes = entries["text_hash"].to_list()
    return Reference(
        folder=folder,
        source=str(manifest.get("source") or folder.name),
        embedding_model=embedding_model,
        record_ids=entries["record_id"].to_list(),
        # The first row of a hash represents it.
        hash_to_row={h: i for i, h in reversed(list(enumerate(hashes)))},
        index=index,
    )


def read_texts(source: Path, text_field: str, id_field: str | None = None) -> tuple[list[str], list[str]]:
    """(ids, texts) from a parquet, JSON Lines or CSV file, or every parquet file under a folder (a published
    dataset folder, say). Rows without text are skipped; ids default to '<file stem>:<row>'."""
    ids: list[str] = []
    texts: list[str] = []
    for file in source_files(source):
        frame = read_table(file)
        if text_field not in frame.columns:
            raise ReferenceError(f"'{file}' has no column '{text_field}' (columns: {frame.columns})")
        if id_field is not None and id_field not in frame.columns:
            raise ReferenceError(f"'{file}' has no column '{id_field}' (columns: {frame.columns})")
        column = frame[text_field].cast(pl.String).to_list()
        row_ids = frame[id_field].cast(pl.String).to_list() if id_field else [f"{file.stem}:{i}" for i in range(len(column))]
        for rid, text in zip(row_ids, column, strict=True):
            if text:
                ids.append(rid)
                texts.append(text)
    return ids, texts


def source_files(source: Path) -> list[Path]:
    """The data files of a source: the file itself, or every parquet file under a folder (hidden ones skipped)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts))
        if not files:
            raise ReferenceError(f"'{source}' holds no parquet files")
        return files
    if source.is_file():
        return [source]
    raise ReferenceError(f"'{source}' does not exist")


def read_table(file: Path) -> pl.DataFrame:
    """One parquet, JSON Lines or CSV file as a frame (ReferenceError, naming the file, when it cannot be read)."""
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(file)
        if suffix in (".jsonl", ".ndjson"):
            return pl.read_ndjson(file)
        if suffix == ".csv":
            return pl.read_csv(file)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ReferenceError(f"'{file}' cannot be read: {exc}") from None
    raise ReferenceError(f"'{file}': unsupported file type '{suffix}'; allowed: .parquet, .jsonl, .ndjson, .csv")

