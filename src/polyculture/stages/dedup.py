"""dedup: exact duplicates (hash of the normalised text), then semantic near-duplicates (FAISS, cosine >= threshold).

The earliest record in frame order wins. Near-duplicates are removed greedily in order: a record is dropped only
when it is close to an earlier record that was KEPT, so a chain a~b~c with a and c far apart keeps a and c (a
transitive clustering would merge distinct texts through their neighbours).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import faiss
import numpy as np
import polars as pl

from polyculture.stages.rejects import REJECTS_SCHEMA

STAGE = "dedup"
CLUSTERS_SCHEMA = {"record_id": pl.String, "cluster_id": pl.Int64, "representative_id": pl.String, "similarity": pl.Float64}
# Queries per FAISS range_search call: some indexes abort on large range searches (see STACK.md), and chunking
# also bounds the memory of one result set.
QUERY_CHUNK = 1024
# float32 rounding: two identical unit vectors can score 0.99999994, which must still count at threshold 1.0.
SIMILARITY_TOLERANCE = 1e-6

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class DedupResult:
    kept: pl.DataFrame
    kept_embeddings: np.ndarray
    rejects: pl.DataFrame
    clusters: pl.DataFrame


def normalize_text(text: str) -> str:
    """Casefolded NFKC text with whitespace collapsed and punctuation stripped from both ends."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _WHITESPACE.sub(" ", text).strip()
    start, end = 0, len(text)
    while start < end and (_is_punct(text[start]) or text[start].isspace()):
        start += 1
    while end > start and (_is_punct(text[end - 1]) or text[end - 1].isspace()):
        end -= 1
    return text[start:end]


def _is_punct(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def dedup(records: pl.DataFrame, embeddings: np.ndarray, threshold: float) -> DedupResult:
    """Drop exact then near duplicates; `clusters` maps every input record to the kept record that represents it."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (one row per record); got shape {embeddings.shape}")
    if embeddings.shape[0] != records.height:
        raise ValueError(
            f"records and embeddings are misaligned: {records.height} records but {embeddings.shape[0]} embedding rows"
        )
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    for column in ("record_id", "call_id", "text"):
        if column not in records.columns:
            raise ValueError(f"records frame has no '{column}' column (columns: {records.columns})")

    vectors = _normalised(embeddings)
    record_ids = records["record_id"].cast(pl.String).to_list()
    call_ids = records["call_id"].cast(pl.String).to_list()
    texts = records["text"].to_list()
    n = records.height

    # representative[i]: index of the kept record that i duplicates (itself when kept); reason/similarity for drops.
    representative = np.arange(n)
    similarity = np.ones(n, dtype=np.float64)
    reason: list[str | None] = [None] * n

    # 1. exact: the first record with a given normalised text represents the rest.
    first_by_hash: dict[str, int] = {}
    for i, text in enumerate(texts):
        first = first_by_hash.setdefault(text_hash(text or ""), i)
        if first != i:
            representative[i] = first
            reason[i] = "exact_duplicate"
    survivors = np.flatnonzero(representative == np.arange(n))

    # 2. semantic: greedy over the survivors in frame order.
    near_rep, near_sim = _near_duplicates(vectors[survivors], threshold)
    for local, (rep_local, sim) in enumerate(zip(near_rep, near_sim, strict=True)):
        if rep_local >= 0:
            i = survivors[local]
            representative[i] = survivors[rep_local]
            similarity[i] = sim
            reason[i] = "near_duplicate"

    # An exact duplicate's representative survived step 1 but may have been dropped in step 2: point at the kept
    # record that represents it instead, so every cluster is headed by a kept record (one hop: step 2 reps are kept).
    for i in range(n):
        if reason[i] == "exact_duplicate" and reason[representative[i]] == "near_duplicate":
            representative[i] = representative[representative[i]]
    for i in range(n):
        if reason[i] == "exact_duplicate":
            # The real cosine: normalised-equal texts can still differ (case, spacing) before normalisation.
            similarity[i] = float(np.clip(vectors[i] @ vectors[representative[i]], -1.0, 1.0))

    kept_mask = np.array([r is None for r in reason], dtype=bool)
    kept_idx = np.flatnonzero(kept_mask)
    cluster_of = {int(rep): cid for cid, rep in enumerate(kept_idx)}

    rejects = pl.DataFrame(
        [
            {
                "record_id": record_ids[i],
                "call_id": call_ids[i],
                "stage": STAGE,
                "reason": reason[i],
                "detail": _detail(reason[i], record_ids[representative[i]], similarity[i]),
            }
            for i in range(n)
            if reason[i] is not None
        ],
        schema=REJECTS_SCHEMA,
    )
    clusters = pl.DataFrame(
        {
            "record_id": record_ids,
            "cluster_id": [cluster_of[int(representative[i])] for i in range(n)],
            "representative_id": [record_ids[representative[i]] for i in range(n)],
            "similarity": similarity.tolist(),
        },
        schema=CLUSTERS_SCHEMA,
    )
    return DedupResult(
        kept=records.filter(pl.Series(kept_mask)) if n else records,
        kept_embeddings=np.ascontiguousarray(embeddings[kept_idx], dtype=np.float32)
        if n
        else np.zeros((0, embeddings.shape[1]), dtype=np.float32),
        rejects=rejects,
        clusters=clusters,
    )


def _detail(reason: str | None, rep_id: str, sim: float) -> str:
    if reason == "exact_duplicate":
        return f"duplicate of {rep_id} (same normalised text, cosine {sim:.3f})"
    return f"duplicate of {rep_id} (cosine {sim:.3f})"


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    # The contract says rows are already L2-normalised; normalising again costs little and makes inner product = cosine
    # even for embeddings from elsewhere.
    vectors = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _near_duplicates(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row: the index of the most similar EARLIER KEPT row with cosine >= threshold (-1 if none), and that cosine."""
    m = vectors.shape[0]
    rep = np.full(m, -1, dtype=np.int64)
    sims = np.ones(m, dtype=np.float64)
    if m < 2:
        return rep, sims
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    kept = np.zeros(m, dtype=bool)
    # FAISS keeps inner products strictly above the radius; search slightly lower, then apply ">=" (up to float32 rounding).
    radius = float(threshold) - 1e-4
    for start in range(0, m, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, m)
        lims, dist, ids = index.range_search(vectors[start:stop], radius)
        # Rows of a chunk are decided in order: each looks only at earlier rows, whose fate is already known.
        for q in range(stop - start):
            i = start + q
            nb_ids = ids[lims[q] : lims[q + 1]]
            nb_sim = dist[lims[q] : lims[q + 1]]
            ok = (nb_ids < i) & (nb_sim >= threshold - SIMILARITY_TOLERANCE)
            if ok.any():
                ok &= kept[np.where(ok, nb_ids, 0)]
            if ok.any():
                best = int(np.argmax(np.where(ok, nb_sim, -np.inf)))
                rep[i] = int(nb_ids[best])
                sims[i] = float(min(nb_sim[best], 1.0))
            else:
                kept[i] = True
    return rep, sims
