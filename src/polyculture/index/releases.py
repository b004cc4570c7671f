"""releases: release indexes, the stored similarity index of records already published (an earlier release) or of a
reference dataset indexed by `polyculture index`, which new records are deduplicated against.

A reference folder holds `reference.json` (format, embedding model, size, source), `entries.parquet` (one row per
indexed record: record_id, text_hash, source) and the FAISS index (`index.faiss` + `index.json`). Every build writes
one for its final records under `<run>/reference/`, so `dedup.reference: [<earlier run folder>]` just works.
The folder is written beside its final place and renamed in (the old one renamed away first), so a crash never leaves
a half-written or half-deleted reference under its name.
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


class ReleaseIndexError(ValueError):
    """A reference folder that is missing, malformed, or made with another embedding model."""


@dataclass(frozen=True)
class ReleaseIndex:
    folder: Path
    source: str
    embedding_model: str
    record_ids: list[str]
    hash_to_row: dict[str, int]
    index: SimilarityIndex

    @property
    def size(self) -> int:
        return len(self.record_ids)


def locate_release_index(path: str | Path, base_dir: Path = Path(".")) -> Path:
    """The reference folder for `path`: the folder itself, or a run folder's `reference/` (relative paths beside the
    spec first, then the working folder)."""
    given = Path(path).expanduser()
    options = [given] if given.is_absolute() else [base_dir / given, Path.cwd() / given]
    for option in options:
        for folder in (option, option / "reference"):
            if (folder / MANIFEST).is_file():
                return folder.resolve()
    raise ReleaseIndexError(
        f"'{path}' is not a reference index: expected a folder with {MANIFEST} (written by "
        "`polyculture index`) or a build's run folder holding reference/"
    )


def write_release_index(
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
    old: Path | None = None  # where the folder this one replaces waits until the new one is in place
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
        # The old folder is renamed away, not deleted in place: a crash never leaves half of it under its name.
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            folder.rename(old / folder.name)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            if not folder.exists():
                (old / folder.name).rename(folder)  # the old index back in place
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return folder


def load_release_index(folder: Path, *, embedding_model: str) -> ReleaseIndex:
    """Load a reference folder, refusing one whose vectors came from another embedding model (cosines would be
    meaningless across models)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = pl.read_parquet(folder / ENTRIES)
        index = SimilarityIndex.load(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ReleaseIndexError(f"reference '{folder}' cannot be read: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ReleaseIndexError(f"reference '{folder}': format {manifest.get('format')!r} is not {FORMAT}")
    if manifest.get("embedding_model") != embedding_model:
        raise ReleaseIndexError(
            f"reference '{folder}' was embedded with '{manifest.get('embedding_model')}', but this build embeds with "
            f"'{embedding_model}': rebuild the reference with the same model"
        )
    if index.ntotal != entries.height:
        raise ReleaseIndexError(f"reference '{folder}': index holds {index.ntotal} vectors but {entries.height} entries")
    hashes = entries["text_hash"].to_list()
    return ReleaseIndex(
        folder=folder,
        source=str(manifest.get("source") or folder.name),
        embedding_model=embedding_model,
        record_ids=entries["record_id"].to_list(),
        # The first row of a hash represents it.
        hash_to_row={h: i for i, h in reversed(list(enumerate(hashes)))},
        index=index,
    )
