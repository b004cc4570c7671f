"""reference_dataset: the reference dataset the report compares dispersion against (`report.reference` in the spec).

`load_report_reference(spec)` reads the file (parquet, JSON Lines, CSV) or every parquet file under a folder, keeps
the rows that have text, samples `max_rows` of them (seeded by the spec's seed) and returns a frame with a `text`
column plus one str column per attribute named in `report.reference.fields` (renamed from the reference's column).
Call it before generating so a wrong path or column is refused before any model time is spent; then embed its
`text` with the build's embedder and hand both to write_report as `ReportInputs.reference` (a RecordSet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from polyculture.index.sources import SourceError, read_table, source_files
from polyculture.spec import BuildSpec, SpecError


def load_report_reference(spec: BuildSpec) -> pl.DataFrame | None:
    """The sampled reference rows (`text` + attribute columns), or None when the spec names no reference."""
    ref = spec.report.reference
    if ref is None:
        return None
    names = {a.name for a in spec.attributes}
    unknown = sorted(set(ref.fields) - names)
    if unknown:
        raise SpecError(
            f"report.reference.fields: {unknown} are not attributes of this spec; attributes: {sorted(names)}"
        )

    source = Path(ref.path).expanduser()
    if not source.is_absolute():
        source = spec.base_dir / source
    try:
        files = source_files(source)
    except SourceError as exc:
        raise SpecError(f"report.reference.path: {exc}") from None

    frames = []
    for file in files:
        try:
            frame = read_table(file)
        except SourceError as exc:
            raise SpecError(f"report.reference.path: {exc}") from None
        if ref.text_field not in frame.columns:
            raise SpecError(
                f"report.reference.text_field: '{file}' has no column '{ref.text_field}' (columns: {frame.columns})"
            )
        for attribute, column in ref.fields.items():
            if column not in frame.columns:
                raise SpecError(
                    f"report.reference.fields.{attribute}: '{file}' has no column '{column}' (columns: {frame.columns})"
                )
        frames.append(
            frame.select(
                pl.col(ref.text_field).cast(pl.String).alias("text"),
                *[pl.col(column).cast(pl.String).alias(attribute) for attribute, column in ref.fields.items()],
            )
        )
    rows = pl.concat(frames, how="vertical").filter(
        pl.col("text").is_not_null() & (pl.col("text").str.strip_chars() != "")
    )
    if rows.height == 0:
        raise SpecError(f"report.reference: no row of '{source}' has text in column '{ref.text_field}'")
    if rows.height > ref.max_rows:
        # Seeded so a re-run of the same spec compares against the same rows.
        picks = np.sort(np.random.default_rng(spec.seed).choice(rows.height, size=ref.max_rows, replace=False))
        rows = rows[picks.tolist()]
    return rows
