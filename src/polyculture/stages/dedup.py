"""dedup: exact duplicates (hash of the normalised text), then semantic near-duplicates (FAISS, cosine >= threshold),
within the new records and against release indexes (earlier releases, a reference dataset indexed by
`polyculture index`).

Records are decided greedily in priority order (`keep`): first generated, highest verbalized probability, or most
central (highest summed similarity to its near duplicates). A record is dropped only when it is close to a record
that was KEPT, so a chain a~b~c with a and c far apart keeps a and c (a transitive clustering would merge distinct
texts through their neighbours). The FAISS index is chosen by size (polyculture.index.similarity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from polyculture.index.releases import ReleaseIndex
from polyculture.index.similarity import SIMILARITY_TOLERANCE, SimilarityIndex, choose_index
from polyculture.index.text import text_hash
from polyculture.index.vectors import normalise_rows
from polyculture.spec import DedupSpec
from polyculture.stages.rejects import REJECTS_SCHEMA

STAGE = "dedup"
CLUSTERS_SCHEMA = {
    "record_id": pl.String,
    "cluster_id": pl.Int64,  # null when the representative is a reference record
    "representative_id": pl.String,
    "similarity": pl.Float64,
    "reference": pl.String,  # the reference's source when the record duplicates one, else null
}
KeepPolicy = Literal["first", "probability", "central"]
# Queries per FAISS search call: HNSW's range search aborts the process on large query sets, and chunking also
# bounds the memory of one result set.
QUERY_CHUNK = 1024
# dedup_more searches a round's new rows against the kept rows exactly (flat) up to this many pairs, where an IVF
# index would be trained again every round: 5k x 100k took 21 s on 2 busy cores (bench/top_up_incremental.py), the
# whole pass's IVF dedup of 105k rows 127 s.
FLAT_PAIRS = 2_000_000_000

@dataclass(frozen=True)
class DedupResult:
    kept: pl.DataFrame
    kept_embeddings: np.ndarray
    rejects: pl.DataFrame
    clusters: pl.DataFrame


def dedup(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    settings: DedupSpec,
    references: Sequence[ReleaseIndex] = (),
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> DedupResult:
    """Drop exact then near duplicates; `clusters` maps every input record to the record that represents it.

    `settings` (the spec's dedup section) gives the threshold, the keep policy and the FAISS index and device;
    `references` are release indexes of earlier builds to dedup against."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (one row per record); got shape {embeddings.shape}")
    if embeddings.shape[0] != records.height:
        raise ValueError(
            f"records and embeddings are misaligned: {records.height} records but {embeddings.shape[0]} embedding rows"
        )
    for column in ("record_id", "call_id", "text"):
        if column not in records.columns:
            raise ValueError(f"records frame has no '{column}' column (columns: {records.columns})")
    threshold, keep = settings.threshold, settings.keep

    # Rows should come L2-normalised; normalising again is cheap and makes inner product = cosine for any embeddings.
    vectors = normalise_rows(embeddings)
    record_ids = records["record_id"].cast(pl.String).to_list()
    call_ids = records["call_id"].cast(pl.String).to_list()
    hashes = [text_hash(t or "") for t in records["text"].to_list()]
    n = records.height
    rank = _rank(records, keep)  # rank[i]: position of record i in the keep order (lower wins)

    # representative[i]: index of the record that i duplicates (itself when kept); ref_hit[i]: (reference, row) when
    # a reference record represents it instead.
    representative = np.arange(n)
    similarity = np.ones(n, dtype=np.float64)
    reason: list[str | None] = [None] * n
    ref_hit: dict[int, tuple[ReleaseIndex, int]] = {}

    # 1. exact, against the references first (a record already released is never published again) ...
    for i, h in enumerate(hashes):
        for ref in references:
            row = ref.hash_to_row.get(h)
            if row is not None:
                ref_hit[i] = (ref, row)
                reason[i] = "exact_in_reference"
                break
    # ... then within the new records: the best-ranked record of a normalised text represents the rest.
    best_by_hash: dict[str, int] = {}
    for i in sorted((i for i in range(n) if reason[i] is None), key=lambda i: rank[i]):
        first = best_by_hash.setdefault(hashes[i], i)
        if first != i:
            representative[i] = first
            reason[i] = "exact_duplicate"

    # 2. semantic, against the references ...
    survivors = np.asarray([i for i in range(n) if reason[i] is None], dtype=np.int64)
    for ref in references:
        for i, row, sim in _reference_hits(ref, vectors, survivors, threshold):
            ref_hit[i] = (ref, row)
            similarity[i] = sim
            reason[i] = "near_reference"
        survivors = np.asarray([i for i in survivors if reason[i] is None], dtype=np.int64)

    # ... then within the new records, greedily in keep order.
    near_rep, near_sim = _near_duplicates(
        vectors[survivors], rank[survivors], threshold, keep, index=settings.index, device=settings.device,
        on_progress=on_progress,
    )
    for local, (rep_local, sim) in enumerate(zip(near_rep, near_sim, strict=True)):
        if rep_local >= 0:
            i = survivors[local]
            representative[i] = survivors[rep_local]
            similarity[i] = sim
            reason[i] = "near_duplicate"

    # An exact duplicate's representative survived step 1 but may have been dropped in step 2: point at what
    # represents it instead (one hop: step-2 representatives are kept, or are reference records).
    for i in range(n):
        if reason[i] != "exact_duplicate":
            continue
        rep = int(representative[i])
        if reason[rep] == "near_duplicate":
            representative[i] = representative[rep]
        elif reason[rep] == "near_reference":
            ref_hit[i] = ref_hit[rep]
        if i in ref_hit:
            similarity[i] = similarity[rep]
        else:
            # The real cosine: normalised-equal texts can still differ (case, spacing) before normalisation.
            similarity[i] = float(np.clip(vectors[i] @ vectors[representative[i]], -1.0, 1.0))

    kept_mask = np.array([r is None for r in reason], dtype=bool)
    kept_idx = np.flatnonzero(kept_mask)
    cluster_of = {int(rep): cid for cid, rep in enumerate(kept_idx)}

    def rep_id(i: int) -> str:
        if i in ref_hit:
            ref, row = ref_hit[i]
            return ref.record_ids[row]
        return record_ids[representative[i]]

    rejects = pl.DataFrame(
        [
            {
                "record_id": record_ids[i],
                "call_id": call_ids[i],
                "stage": STAGE,
                "reason": reason[i],
                "detail": _detail(reason[i], rep_id(i), similarity[i], ref_hit[i][0].source if i in ref_hit else None),
            }
            for i in range(n)
            if reason[i] is not None
        ],
        schema=REJECTS_SCHEMA,
    )
    clusters = pl.DataFrame(
        {
            "record_id": record_ids,
            "cluster_id": [None if i in ref_hit else cluster_of[int(representative[i])] for i in range(n)],
            "representative_id": [rep_id(i) for i in range(n)],
            "similarity": similarity.tolist(),
            "reference": [ref_hit[i][0].source if i in ref_hit else None for i in range(n)],
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


def _reference_hits(
    ref: ReleaseIndex, vectors: np.ndarray, survivors: np.ndarray, threshold: float
) -> list[tuple[int, int, float]]:
    """(record row, reference row, cosine) for each survivor whose nearest record of `ref` is at the threshold."""
    if not survivors.size or ref.size == 0:
        return []
    hits = ref.index.neighbors(vectors[survivors], threshold, chunk=QUERY_CHUNK)
    found = []
    for q, i in enumerate(survivors):
        sims = hits.sims[hits.lims[q] : hits.lims[q + 1]]
        if sims.size and sims.max() >= threshold - SIMILARITY_TOLERANCE:
            best = int(np.argmax(sims))
            found.append((int(i), int(hits.ids[hits.lims[q] + best]), float(min(sims[best], 1.0))))
    return found


def _rank(records: pl.DataFrame, keep: KeepPolicy) -> np.ndarray:
    """Each record's position in the keep order. `central` needs the neighbour graph, so it ranks by frame order
    here (exact duplicates are identical texts: any member is as central) and re-ranks the near-duplicate step."""
    n = records.height
    order = np.arange(n)
    if keep == "probability" and "verbalized_probability" in records.columns:
        probs = records["verbalized_probability"].cast(pl.Float64).fill_nan(None).to_list()
        # Highest probability first; nulls last; ties keep frame order.
        order = np.array(sorted(range(n), key=lambda i: (probs[i] is None, -(probs[i] or 0.0), i)), dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def _detail(reason: str | None, rep_id: str, sim: float, reference: str | None) -> str:
    if reason == "exact_in_reference":
        return f"already in reference '{reference}' as {rep_id} (same normalised text)"
    if reason == "near_reference":
        return f"near {rep_id} in reference '{reference}' (cosine {sim:.3f})"
    if reason == "exact_duplicate":
        return f"duplicate of {rep_id} (same normalised text, cosine {sim:.3f})"
    return f"duplicate of {rep_id} (cosine {sim:.3f})"


def _near_duplicates(
    vectors: np.ndarray,
    rank: np.ndarray,
    threshold: float,
    keep: KeepPolicy,
    *,
    index: str,
    device: str,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each row: the most similar better-ranked KEPT row with cosine >= threshold (-1 if none), and that cosine."""
    m = vectors.shape[0]
    rep = np.full(m, -1, dtype=np.int64)
    sims = np.ones(m, dtype=np.float64)
    if m < 2:
        return rep, sims
    similarity_index = SimilarityIndex.build(vectors, choose_index(m, kind=index, device=device))
    graph = similarity_index.neighbors(vectors, threshold, chunk=QUERY_CHUNK, on_chunk=on_progress)
    lims, ids, nb_sims = graph.lims, graph.ids, graph.sims.astype(np.float64)
    rows = np.repeat(np.arange(m), np.diff(lims))
    not_self = ids != rows
    if keep == "central":
        # Summed similarity to its near duplicates: the member most like the rest of its neighbourhood goes first.
        centrality = np.bincount(rows[not_self], weights=nb_sims[not_self], minlength=m)
        order = np.lexsort((rank, -centrality))
    else:
        order = np.argsort(rank, kind="stable")
    kept = np.zeros(m, dtype=bool)
    for i in order:
        start, stop = lims[i], lims[i + 1]
        nb_ids = ids[start:stop]
        ok = (nb_ids != i) & kept[nb_ids] & (nb_sims[start:stop] >= threshold - SIMILARITY_TOLERANCE)
        if ok.any():
            best = int(np.argmax(np.where(ok, nb_sims[start:stop], -np.inf)))
            rep[i] = int(nb_ids[best])
            sims[i] = float(min(nb_sims[start + best], 1.0))
        else:
            kept[i] = True
    return rep, sims


def extends(settings: DedupSpec) -> bool:
    """Whether a later round can be deduplicated from the earlier rounds' result (`dedup_more`): only when new records
    rank after every earlier one (keep 'first'); 'probability' and 'central' can re-rank earlier records."""
    return settings.keep == "first"


def dedup_more(
    previous: DedupResult,
    previous_records: pl.DataFrame,
    records: pl.DataFrame,
    embeddings: np.ndarray,
    settings: DedupSpec,
    references: Sequence[ReleaseIndex] = (),
) -> DedupResult:
    """The dedup of `previous_records` then `records` (a later round's), from `previous` (the dedup of
    `previous_records`), deciding only the new records: against the earlier records' texts and the KEPT ones'
    vectors, the references, and each other. With keep 'first' every earlier decision stands (a new record ranks
    after them all), so this equals `dedup` over the concatenation when the search is exact (flat; ivf and hnsw are
    approximate either way)."""
    if not extends(settings):
        raise ValueError(f"dedup.keep '{settings.keep}' re-ranks earlier records: deduplicate the whole pool")
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != records.height:
        raise ValueError(f"embeddings must be one row per new record; got shape {embeddings.shape}, {records.height}")
    threshold = settings.threshold
    vectors = normalise_rows(embeddings)
    record_ids = records["record_id"].cast(pl.String).to_list()
    call_ids = records["call_id"].cast(pl.String).to_list()
    hashes = [text_hash(t or "") for t in records["text"].to_list()]
    n = records.height

    # The earlier decisions: reason, representative, similarity, reference and cluster by record id.
    old_reason = dict(zip(previous.rejects["record_id"].to_list(), previous.rejects["reason"].to_list(), strict=True))
    old = {row["record_id"]: row for row in previous.clusters.iter_rows(named=True)}
    kept_ids = previous.kept["record_id"].cast(pl.String).to_list()
    kept_row = {rid: k for k, rid in enumerate(kept_ids)}
    kept_vectors = normalise_rows(previous.kept_embeddings) if len(kept_ids) else np.zeros((0, vectors.shape[1]), np.float32)
    # The first earlier record of each normalised text (records already in a reference took no part).
    first_by_hash: dict[str, str] = {}
    for rid, text in zip(previous_records["record_id"].to_list(), previous_records["text"].to_list(), strict=True):
        if old_reason.get(rid) != "exact_in_reference":
            first_by_hash.setdefault(text_hash(text or ""), rid)

    # outcome[i]: (reason, representative id, similarity, reference source, cluster id); reason None = kept.
    reason: list[str | None] = [None] * n
    rep_id: list[str | None] = [None] * n
    rep_new = np.full(n, -1, dtype=np.int64)  # a new representative's position, resolved after step 2
    similarity = np.ones(n, dtype=np.float64)
    source: list[str | None] = [None] * n
    for i, h in enumerate(hashes):  # 1. exact: references, then the earlier records, then the new ones in order
        for ref in references:
            row = ref.hash_to_row.get(h)
            if row is not None:
                reason[i], rep_id[i], source[i] = "exact_in_reference", ref.record_ids[row], ref.source
                break
    best_new: dict[str, int] = {}
    for i in range(n):
        if reason[i] is not None:
            continue
        earlier = first_by_hash.get(hashes[i])
        if earlier is not None:
            # One hop, as in `dedup`: an earlier record dropped as a near duplicate points at what represents it.
            first = old[earlier]
            reason[i], source[i] = "exact_duplicate", first["reference"]
            rep_id[i] = first["representative_id"] if old_reason.get(earlier) in ("near_duplicate", "near_reference") else earlier
            if source[i] is not None:
                similarity[i] = first["similarity"]
            else:
                similarity[i] = float(np.clip(vectors[i] @ kept_vectors[kept_row[rep_id[i]]], -1.0, 1.0))
            continue
        first_new = best_new.setdefault(hashes[i], i)
        if first_new != i:
            reason[i], rep_new[i] = "exact_duplicate", first_new

    survivors = np.asarray([i for i in range(n) if reason[i] is None], dtype=np.int64)
    for ref in references:  # 2. semantic: references ...
        for i, row, sim in _reference_hits(ref, vectors, survivors, threshold):
            reason[i], source[i] = "near_reference", ref.source
            rep_id[i] = ref.record_ids[row]
            similarity[i] = sim
        survivors = np.asarray([i for i in survivors if reason[i] is None], dtype=np.int64)

    # ... then the earlier kept records (all rank first) and the new ones, greedily in order. On a tie the earlier
    # record wins, as in one search over the whole pool (flat results come in row order).
    m = survivors.size
    if m:
        plan = choose_index(len(kept_ids) + m, kind=settings.index, device=settings.device)
        if settings.index == "auto" and plan.kind != "flat" and plan.device == "cpu" and m * len(kept_ids) <= FLAT_PAIRS:
            plan = choose_index(0, kind="flat", device="cpu")  # few new rows: exact, and no IVF training per round
        old_hits = None
        if kept_ids:
            kept_index = SimilarityIndex.build(kept_vectors, plan)
            old_hits = kept_index.neighbors(vectors[survivors], threshold, chunk=QUERY_CHUNK)
        new_index = SimilarityIndex.build(vectors[survivors], choose_index(m, kind=settings.index, device=settings.device))
        graph = new_index.neighbors(vectors[survivors], threshold, chunk=QUERY_CHUNK)
        kept_new = np.zeros(m, dtype=bool)
        floor = threshold - SIMILARITY_TOLERANCE
        for q in range(m):
            i = int(survivors[q])
            best_sim, best_old, best_q = -np.inf, -1, -1
            if old_hits is not None:
                sims = old_hits.sims[old_hits.lims[q] : old_hits.lims[q + 1]].astype(np.float64)
                ok = sims >= floor
                if ok.any():
                    k = int(np.argmax(np.where(ok, sims, -np.inf)))
                    best_sim, best_old = sims[k], int(old_hits.ids[old_hits.lims[q] + k])
            nb = graph.ids[graph.lims[q] : graph.lims[q + 1]]
            sims = graph.sims[graph.lims[q] : graph.lims[q + 1]].astype(np.float64)
            ok = (nb != q) & kept_new[nb] & (sims >= floor)
            if ok.any():
                k = int(np.argmax(np.where(ok, sims, -np.inf)))
                if sims[k] > best_sim:
                    best_sim, best_old, best_q = sims[k], -1, int(nb[k])
            if best_old >= 0:
                reason[i], rep_id[i], similarity[i] = "near_duplicate", kept_ids[best_old], float(min(best_sim, 1.0))
            elif best_q >= 0:
                reason[i], rep_new[i], similarity[i] = "near_duplicate", survivors[best_q], float(min(best_sim, 1.0))
            else:
                kept_new[q] = True

    # A new exact duplicate of a new record dropped in step 2 points at what represents that one (one hop).
    for i in range(n):
        if reason[i] != "exact_duplicate" or rep_new[i] < 0:
            continue
        rep = int(rep_new[i])
        if reason[rep] == "near_duplicate":
            rep_id[i], rep_new[i] = rep_id[rep], rep_new[rep]
        elif reason[rep] == "near_reference":
            rep_id[i], rep_new[i], source[i], similarity[i] = rep_id[rep], -1, source[rep], similarity[rep]
        if source[i] is None:
            other = vectors[rep_new[i]] if rep_new[i] >= 0 else kept_vectors[kept_row[rep_id[i]]]
            similarity[i] = float(np.clip(vectors[i] @ other, -1.0, 1.0))
    for i in range(n):
        if rep_new[i] >= 0:
            rep_id[i] = record_ids[rep_new[i]]

    kept_mask = np.array([r is None for r in reason], dtype=bool)
    cluster_of = {rid: old[rid]["cluster_id"] for rid in kept_ids}
    cluster_of |= {record_ids[i]: len(kept_ids) + c for c, i in enumerate(np.flatnonzero(kept_mask))}
    rejects = pl.DataFrame(
        [
            {
                "record_id": record_ids[i], "call_id": call_ids[i], "stage": STAGE, "reason": reason[i],
                "detail": _detail(reason[i], rep_id[i] or "", similarity[i], source[i]),
            }
            for i in range(n)
            if reason[i] is not None
        ],
        schema=REJECTS_SCHEMA,
    )  # fmt: skip
    clusters = pl.DataFrame(
        {
            "record_id": record_ids,
            "cluster_id": [
                cluster_of[record_ids[i]] if reason[i] is None else None if source[i] else cluster_of[rep_id[i]]
                for i in range(n)
            ],
            "representative_id": [record_ids[i] if reason[i] is None else rep_id[i] for i in range(n)],
            "similarity": similarity.tolist(),
            "reference": source,
        },
        schema=CLUSTERS_SCHEMA,
    )
    new_kept = np.flatnonzero(kept_mask)
    return DedupResult(
        kept=pl.concat([previous.kept, records.filter(pl.Series(kept_mask))]) if n else previous.kept,
        kept_embeddings=np.ascontiguousarray(
            np.vstack([previous.kept_embeddings, np.asarray(embeddings)[new_kept]]), dtype=np.float32
        ),
        rejects=pl.concat([previous.rejects, rejects]),
        clusters=pl.concat([previous.clusters, clusters]),
    )
