"""rebalance: cut the records to exact targets (joint cells, marginals only, or an explicit joint table), and say
which cells fall short.

A surplus cell is cut by a diversity-preserving choice on the embeddings, never at random: greedy farthest-point
(each pick is the record least similar to everything picked so far) or MMR (each pick trades typicality, the cosine
to the cell's centroid, against redundancy with what is already picked).

When the records carry quality scores (stages.quality: `_quality_<name>` columns and `_quality`), diversity never
keeps a failing record over a passing one: a cut keeps records that passed every check first and takes failing ones
(possible only with gate: false) only when the passing ones cannot fill the quota. Relevance becomes quality: MMR's
relevance is the record's scores normalised within the cell (min-max per check, mean over the checks that scored it),
and farthest-point starts from the best-scored record (where the scores tell records apart at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from polyculture.index.vectors import normalise_rows
from polyculture.spec import SCORE_PREFIX, Attribute, RebalanceSpec
from polyculture.stages.plan import cell_key, joint_targets, marginal_quotas, marginal_targets, table_targets
from polyculture.stages.quality import PASSED_COLUMN
from polyculture.stages.rejects import reject, rejects_frame

STAGE = "rebalance"
Targets = Literal["joint", "marginals", "table"]
Surplus = Literal["farthest_point", "mmr"]
MARGINALS_SCHEMA = {
    "attribute": pl.String, "value": pl.String, "target": pl.Int64, "available": pl.Int64, "kept": pl.Int64,
    "deficit": pl.Int64,
}  # fmt: skip


@dataclass(frozen=True)
class RebalanceResult:
    kept: pl.DataFrame
    kept_embeddings: np.ndarray
    rejects: pl.DataFrame
    cells: pl.DataFrame  # one row per joint cell: target, available (valid unique), kept, deficit, reason
    marginals: pl.DataFrame  # one row per attribute value: target, available, kept, deficit

    def shortfalls(self) -> list[tuple[dict[str, str], int]]:
        """Joint cells still missing records, with how many: what a top-up round should generate."""
        names = [c for c in self.cells.columns if c not in _CELL_COLUMNS]
        return [
            ({n: row[n] for n in names}, int(row["wanted"]))
            for row in self.cells.filter(pl.col("wanted") > 0).iter_rows(named=True)
        ]


_CELL_COLUMNS = {"cell_key", "target", "available", "kept", "deficit", "wanted", "reason"}


def rebalance(
    records: pl.DataFrame,
    embeddings: np.ndarray,
    settings: RebalanceSpec,
    attributes: Sequence[Attribute],
    target_size: int,
) -> RebalanceResult:
    """Cut `records` to exact targets over `attributes` summing to `target_size`; `settings` (the spec's rebalance
    section) says which targets (joint, marginals, table) and how a surplus cell is cut."""
    targets, table, surplus, mmr_lambda = settings.targets, settings.table, settings.surplus, settings.mmr_lambda
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
    scored = _Quality.of(records)
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

    plan = (
        table_targets(attributes, table or [], target_size)
        if targets == "table"
        else joint_targets(attributes, target_size)
    )
    keys = [tuple(v[a.name] for a in attributes) for v, _ in plan]
    available = [len(members.get(k, [])) for k in keys]
    # marginals: the solver may move quota between cells of the same marginal value, within what is available.
    quotas = marginal_quotas(plan, available) if targets == "marginals" and attributes else [t for _, t in plan]

    vectors = normalise_rows(embeddings)
    kept_order: list[int] = []
    cell_rows = []
    for (cell_values, planned), key_tuple, quota in zip(plan, keys, quotas, strict=True):
        key = cell_key(cell_values)
        pool = members.pop(key_tuple, [])
        keep = _choose(pool, quota, vectors, probs, surplus, mmr_lambda, scored)
        if len(pool) > len(keep):
            dropped = sorted(set(pool) - set(keep))
            how = "most diverse" if surplus == "farthest_point" else "most typical yet diverse (MMR)"
            if scored is not None:
                how = f"{how}, passing every quality check first" + (" and best-scored" if surplus == "mmr" else "")
            detail = f"cell {key} had {len(pool)} valid records for a quota of {quota}; kept the {quota} {how}"
            rejects.extend(reject(record_ids[i], call_ids[i], STAGE, "surplus", detail) for i in dropped)
        kept_order.extend(keep)
        deficit = max(0, planned - len(keep)) if targets != "marginals" else 0
        cell_rows.append(
            {
                "cell_key": key,
                **cell_values,
                "target": planned if targets != "marginals" else quota,
                "available": len(pool),
                "kept": len(keep),
                "deficit": deficit,
                "wanted": max(0, planned - len(pool)),
                "reason": f"only {len(pool)} valid unique records for this cell (target {planned})" if deficit else None,
            }
        )
    # Cells outside a target table (weight 0): every record there is surplus.
    for key_tuple, pool in members.items():
        key = cell_key(dict(zip([a.name for a in attributes], key_tuple, strict=True)))
        detail = f"cell {key} is not in the target table (quota 0)"
        rejects.extend(reject(record_ids[i], call_ids[i], STAGE, "surplus", detail) for i in pool)

    marginal_rows = _marginal_rows(plan, available, [r["kept"] for r in cell_rows])
    if targets == "marginals":
        _mark_marginal_shortfalls(cell_rows, plan, marginal_rows)

    cells_schema = {"cell_key": pl.String, **{a.name: pl.String for a in attributes}}
    cells_schema |= {
        "target": pl.Int64, "available": pl.Int64, "kept": pl.Int64, "deficit": pl.Int64, "wanted": pl.Int64,
        "reason": pl.String,
    }  # fmt: skip
    take = np.asarray(kept_order, dtype=np.int64)
    return RebalanceResult(
        kept=records[kept_order] if n else records,
        kept_embeddings=np.ascontiguousarray(embeddings[take], dtype=np.float32),
        rejects=rejects_frame(rejects),
        cells=pl.DataFrame(cell_rows, schema=cells_schema),
        marginals=pl.DataFrame(marginal_rows, schema=MARGINALS_SCHEMA),
    )


@dataclass(frozen=True)
class _Quality:
    """The quality stage's verdicts and scores, row-aligned with the records (scores: NaN where a check gave none)."""

    passed: np.ndarray  # bool, [n]
    scores: np.ndarray  # float64, [n, checks]

    @classmethod
    def of(cls, records: pl.DataFrame) -> _Quality | None:
        if PASSED_COLUMN not in records.columns:
            return None
        columns = [c for c in records.columns if c.startswith(SCORE_PREFIX)]
        scores = np.zeros((records.height, len(columns)))
        for j, column in enumerate(columns):
            scores[:, j] = records[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
        return cls(records[PASSED_COLUMN].fill_null(False).to_numpy().astype(bool), scores)

    def relevance(self, pool: list[int]) -> np.ndarray | None:
        """Per pool member: its scores min-max normalised within the pool, averaged over the checks that scored it
        (0 where none did); None when that ranks nobody above anyone (no scores, or all alike: a cut then goes as
        without quality, by typicality or from the most probable record)."""
        block = self.scores[pool]
        usable = [c for c in range(block.shape[1]) if np.isfinite(block[:, c]).any()]
        if not usable:
            return None
        normalised = []
        for c in usable:
            column = block[:, c]
            low, high = np.nanmin(column), np.nanmax(column)
            flat = np.where(np.isfinite(column), 1.0, np.nan)  # one value for all: each is as good as the best
            normalised.append((column - low) / (high - low) if high > low else flat)
        stacked = np.column_stack(normalised)
        counted = np.isfinite(stacked).sum(axis=1)
        relevance = np.where(counted > 0, np.nansum(stacked, axis=1) / np.maximum(counted, 1), 0.0)
        return relevance if np.ptp(relevance) > 0 else None  # all alike: quality cannot rank them


def _choose(
    pool: list[int],
    quota: int,
    vectors: np.ndarray,
    probs: list[float | None],
    surplus: Surplus,
    mmr_lambda: float,
    scored: _Quality | None = None,
) -> list[int]:
    if len(pool) <= quota:
        return pool
    if quota <= 0:
        return []
    if scored is not None:  # never a failing record over a passing one
        passing = [i for i in pool if scored.passed[i]]
        if len(passing) >= quota:
            return _pick(passing, quota, vectors, probs, surplus, mmr_lambda, scored)
        failing = [i for i in pool if not scored.passed[i]]
        return sorted(passing + _pick(failing, quota - len(passing), vectors, probs, surplus, mmr_lambda, scored))
    return _pick(pool, quota, vectors, probs, surplus, mmr_lambda, None)


def _pick(
    pool: list[int],
    quota: int,
    vectors: np.ndarray,
    probs: list[float | None],
    surplus: Surplus,
    mmr_lambda: float,
    scored: _Quality | None,
) -> list[int]:
    if len(pool) <= quota:
        return pool
    relevance = scored.relevance(pool) if scored is not None else None
    if surplus == "mmr":
        chosen = mmr_order(vectors[pool], quota, mmr_lambda, relevance=relevance)
    else:
        start = int(np.argmax(relevance)) if relevance is not None else _start(pool, probs)  # argmax: first of ties
        chosen = farthest_point_order(vectors[pool], start, quota)
    return [pool[j] for j in sorted(chosen)]


def _marginal_rows(
    plan: list[tuple[dict[str, str], int]], available: list[int], kept: list[int]
) -> list[dict[str, object]]:
    rows = []
    for name, by_value in marginal_targets(plan).items():
        for value, target in by_value.items():
            in_value = [i for i, (cell, _) in enumerate(plan) if cell[name] == value]
            got = sum(kept[i] for i in in_value)
            rows.append(
                {
                    "attribute": name,
                    "value": value,
                    "target": target,
                    "available": sum(available[i] for i in in_value),
                    "kept": got,
                    "deficit": max(0, target - got),
                }
            )
    return rows


def _mark_marginal_shortfalls(
    cell_rows: list[dict[str, object]], plan: list[tuple[dict[str, str], int]], marginal_rows: list[dict[str, object]]
) -> None:
    """marginals mode: a cell is wanted only where one of its values is short, and only up to its planned count."""
    short = {(r["attribute"], r["value"]): r for r in marginal_rows if r["deficit"]}
    for row, (cell, planned) in zip(cell_rows, plan, strict=True):
        gaps = [short[(name, value)] for name, value in cell.items() if (name, value) in short]
        row["wanted"] = max(0, planned - int(row["available"])) if gaps else 0
        if gaps:
            row["reason"] = "; ".join(
                f"{g['attribute']}={g['value']} has {g['kept']} of {g['target']} (only {g['available']} available)"
                for g in gaps
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
        if p is None or np.isnan(p):
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


def mmr_order(vectors: np.ndarray, k: int, mmr_lambda: float, *, relevance: np.ndarray | None = None) -> list[int]:
    """Maximal marginal relevance: `k` row indices; relevance is the cosine to the rows' centroid (or the given
    `relevance`, one value per row in [0, 1], e.g. quality), redundancy the highest cosine to a row already chosen.
    Starts from the most relevant row; ties go to the lowest index."""
    m = vectors.shape[0]
    k = min(k, m)
    if k <= 0:
        return []
    if relevance is not None:
        relevance = np.asarray(relevance, dtype=np.float64)
        if relevance.shape != (m,):
            raise ValueError(f"relevance needs one value per row ({m}); got shape {relevance.shape}")
    else:
        centroid = vectors.mean(axis=0)
        norm = float(np.linalg.norm(centroid))
        relevance = (vectors @ (centroid / norm)).astype(np.float64) if norm > 0 else np.zeros(m)
    chosen = [int(np.argmax(relevance))]
    closest = (vectors @ vectors[chosen[0]]).astype(np.float64)
    taken = np.zeros(m, dtype=bool)
    taken[chosen[0]] = True
    while len(chosen) < k:
        score = np.where(taken, -np.inf, mmr_lambda * relevance - (1 - mmr_lambda) * closest)
        nxt = int(np.argmax(score))
        chosen.append(nxt)
        taken[nxt] = True
        closest = np.maximum(closest, vectors @ vectors[nxt])
    return chosen
