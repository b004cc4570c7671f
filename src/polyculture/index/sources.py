"""Reading a user's data files: a parquet, JSON Lines or CSV file, or every parquet file under a folder."""

from __future__ import annotations

from pathlib import Path

import polars as pl


class SourceError(ValueError):
    """A data file or folder that is missing, unreadable, or lacks a column asked for; the message names it."""


def read_texts(source: Path, text_field: str, id_field: str | None = None) -> tuple[list[str], list[str]]:
    """(ids, texts) from a parquet, JSON Lines or CSV file, or every parquet file under a folder (a published
    dataset folder, say). Rows without text are skipped; ids default to '<file stem>:<row>'."""
    ids: list[str] = []
    texts: list[str] = []
    for file in source_files(source):
        frame = read_table(file)
        if text_field not in frame.columns:
            raise SourceError(f"'{file}' has no column '{text_field}' (columns: {frame.columns})")
        if id_field is not None and id_field not in frame.columns:
            raise SourceError(f"'{file}' has no column '{id_field}' (columns: {frame.columns})")
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
            raise SourceError(f"'{source}' holds no parquet files")
        return files
    if source.is_file():
        return [source]
    raise SourceError(f"'{source}' does not exist")


def read_table(file: Path) -> pl.DataFrame:
    """One parquet, JSON Lines or CSV file as a frame (SourceError, naming the file, when it cannot be read)."""
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(file)
        if suffix in (".jsonl", ".ndjson"):
            return pl.read_ndjson(file)
        if suffix == ".csv":
            return pl.read_csv(file)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SourceError(f"'{file}' cannot be read: {exc}") from None
    raise SourceError(f"'{file}': unsupported file type '{suffix}'; allowed: .parquet, .jsonl, .ndjson, .csv")



def source_columns(file: Path) -> list[str]:
    """The columns of one data file, read from its schema or first rows (not the whole file)."""
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            return list(pl.read_parquet_schema(file))
        if suffix in (".jsonl", ".ndjson"):
            return pl.read_ndjson(file, n_rows=100).columns
        if suffix == ".csv":
            return pl.read_csv(file, n_rows=0).columns
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SourceError(f"'{file}' cannot be read: {exc}") from None
    raise SourceError(f"'{file}': unsupported file type '{suffix}'; allowed: .parquet, .jsonl, .ndjson, .csv")
