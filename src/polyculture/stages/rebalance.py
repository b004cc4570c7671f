"""rebalance: cut the records to the exact joint targets over all the attributes, and say which cells fall short.

A surplus cell is cut by greedy farthest-point sampling on the embeddings, not at random: each pick is the record
least similar to everything picked so far, so the kept subset is the most spread out one this greedy can find.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from polyculture.spec import Attribute
from polyculture.stages.plan import cell_key, joint_targets
from polyculture.stages.rejects import reject, rejects_frame

STAGE = "rebalance"


@dataclass(frozen=True)
class RebalanceResult:
    kept: pl.DataFrame
    kept_embeddings: np.ndarray
    rejects: pl.DataFrame
    cells: pl.DataFrame


def rebalance(
    records: pl.DataFrame, embeddings: np.ndarray, attributes: Sequence[Attribute], target_size: int
) -> RebalanceResult:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != records.height:
        raise ValueError(
            f"records and embeddings are misaligned: {records.height} records but embeddings of shape {embeddings.shape}"
        )
    if target_size < 0:
        raise ValueError(f"target_size must be >= 0; got {target_size}")
    missing = [a.name for a in attributes if a.name not in records.columns]
    if missing:
        raise ValueError(f"records frame has no column for attributes {missing} (columns: {records.columns})")

    n = records.height
    record_ids = records["record_id"].cast(pl.String).to_list() if n else []
    call_ids = records["call_id"].cast(pl.String).to_list() if n else []
    probs = (
        records["verbalized_probability"].cast(pl.Float64).to_list()
        if "verbalized_probability" in records.columns
        else [None] * n
    )
    values = {a.name: records[a.name].cast(pl.String).to_list() for a in attributes}
    allowed = {a.name: set(a.values) for a in attributes}

    rejects: list[dict[str, str | None]] = []
    # Keyed by the tuple of values (not the cell_key string), so values holding "|" or "=" cannot collide.
    members: dict[tuple[str, ...], list[int]] = {}
    for i in range(n):
        problem = _off_target(attributes, values, allowed, i)
        if problem:
            rejects.append(reject(record_ids[i], call_ids[i], STAGE, "off_target_value", problem))
            continue
        members.setdefault(tuple(values[a.name][i] for a in attributes), []).append(i)

    vectors = _normalised(embeddings)
    kept_order: list[int] = []
    cell_rows = []
    for cell_values, target in joint_targets(attributes, target_size):
        key = cell_key(cell_values)
        pool = members.get(tuple(cell_values[a.name] for a in attributes), [])
        if len(pool) > target:
            chosen = sorted(farthest_point_order(vectors[pool], _start(pool, probs), target))
            keep = [pool[j] for j in chosen]
            dropped = sorted(set(pool) - set(keep))
            detail = f"cell {key} had {len(pool)} valid records for a target of {target}; kept the {target} most diverse"
            rejects.extend(reject(record_ids[i], call_ids[i], STAGE, "surplus", detail) for i in dropped)
        else:
            keep = pool
        kept_order.extend(keep)
        deficit = target - len(keep)
        cell_rows.append(
            {
                "cell_key": key,
                **cell_values,
                "target": target,
                "available": len(pool),
                "kept": len(keep),
                "deficit": deficit,
                "reason": f"only {len(pool)} valid unique records for this cell (target {target})" if deficit else None,
            }
        )

    cells_schema = {"cell_key": pl.String, **{a.name: pl.String for a in attributes}}
    cells_schema |= {"target": pl.Int64, "available": pl.Int64, "kept": pl.Int64, "deficit": pl.Int64, "reason": pl.String}
    take = np.asarray(kept_order, dtype=np.int64)
    return RebalanceResult(
        kept=records[kept_order] if n else records,
        kept_embeddings=np.ascontiguousarray(embeddings[take], dtype=np.float32),
        rejects=rejects_frame(rejects),
        cells=pl.DataFrame(cell_rows, schema=cells_schema),
    )


def _off_target(
    attributes: Sequence[Attribute], values: dict[str, list[str | None]], allowed: dict[str, set[str]], i: int
) -> str | None:
    for attr in attributes:
        value = values[attr.name][i]
        if value is None:
            return f"{attr.name} is missing"
        if value not in allowed[attr.name]:
            return f"{attr.name}={value!r} is not one of {attr.values}"
    return None


def _start(pool: list[int], probs: list[float | None]) -> int:
    """Position in `pool` of the record the model rated most likely; nulls (and NaN) rank last, ties go to the earliest."""
    def rank(j: int) -> tuple[int, float, int]:
        p = probs[pool[j]]
        if p is None or p != p:
            return (1, 0.0, j)
        return (0, -p, j)

    return min(range(len(pool)), key=rank)


def farthest_point_order(vectors: np.ndarray, start: int, k: int) -> list[int]:
    """Greedy farthest-point sampling: `k` row indices, beginning with `start`; each next one has the lowest maximum
    cosine to those already chosen (ties to the lowest index), so deterministic for given inputs."""
    m = vectors.shape[0]
    k = min(k, m)
    if k <= 0:
        return []
    chosen = [start]
    # closest[j]: highest cosine of row j to any chosen row; chosen rows get +inf so they are never picked again.
    closest = (vectors @ vectors[start]).astype(np.float64)
    closest[start] = np.inf
    while len(chosen) < k:
        nxt = int(np.argmin(closest))
        chosen.append(nxt)
        closest = np.maximum(closest, vectors @ vectors[nxt])  # chosen rows stay at +inf
    return chosen


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    vectors = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
