"""Conceptual diversity (Murthy et al. 2024): is the population more varied than one individual?

An "individual" is one rendered prompt: the records sharing a cell and a prompt index (call ids "c{cell}-p{prompt}-..."),
i.e. the same request sampled several times, or the k responses of one Verbalized Sampling call, or the turns of one
thread. With cosine distance d = 1 - cos between record embeddings:
- internal variability: for each individual with at least 2 records, the mean d over pairs of its records; then the
  mean over those individuals (each individual counts once, however many records it has).
- population variability: the mean d over pairs of records that belong to DIFFERENT individuals.
- ratio = population / internal; the population is "homogeneous" when population <= internal: its individuals
  differ from one another no more than one individual differs from itself.
Defined when at least 2 individuals have at least 2 records each; otherwise the figures are None with a reason.
Both are exact over every record (before, population was a 1,000-record sample and large individuals 50-record ones).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from scipy import sparse

_INDIVIDUAL = re.compile(r"^(.*?c\d+-p\d+)(?:-|$)")
CHUNK_ROWS = 8192  # rows normalised at a time for the internal variability (small: fresh big arrays page-fault)


def individual_key(call_id: str) -> str:
    """The prompt a call came from: "c3-p1" for "c3-p1-s0-t2" (any prefix such as "r2-" kept); the call id itself
    when it does not follow the "c{cell}-p{prompt}" pattern."""
    match = _INDIVIDUAL.match(call_id or "")
    return match.group(1) if match else (call_id or "")


def individual_keys(call_ids: pl.Series) -> pl.Series:
    """`individual_key` of every call id, vectorised (the same pattern, run by polars over a million ids)."""
    ids = call_ids.cast(pl.String).fill_null("")
    return ids.str.extract(_INDIVIDUAL.pattern, 1).fill_null(ids)


def conceptual_diversity(individuals: Sequence[str] | pl.Series, embeddings: np.ndarray) -> dict[str, Any]:
    """Internal and population variability (see the module docstring), both exact over every record: a group's pair
    sums come from its vector sum (see `_variability`), so a million records cost one pass, no pair matrix."""
    x = np.asarray(embeddings)
    n_rows = len(individuals)
    if n_rows != (x.shape[0] if x.ndim == 2 else 0) and n_rows:
        raise ValueError(f"{n_rows} individuals but embeddings of shape {x.shape}")
    # Dense integer labels, so grouping a million records is array work, not a dict of lists.
    keys = pl.Series("key", individuals, dtype=pl.String).fill_null("")  # a missing key: the "" individual
    labels = (keys.rank("dense").to_numpy() - 1).astype(np.int64) if n_rows else np.zeros(0, dtype=np.int64)
    sizes = np.bincount(labels) if n_rows else np.zeros(0, dtype=np.int64)
    repeated = sizes >= 2
    result: dict[str, Any] = {
        "records": n_rows,
        "individuals": len(sizes),
        "individuals_with_repeats": int(repeated.sum()),
        "internal_variability": None,
        "population_variability": None,
        "ratio": None,
        "homogeneous": None,
        "reason": None,
    }
    if repeated.sum() < 2:
        result["reason"] = (
            f"needs at least 2 prompts with 2 or more records each; {int(repeated.sum())} of {len(sizes)} prompts"
            " have more than one record"
        )
        return result
    internal_mean, population = _variability(x, labels, sizes)
    result.update(
        internal_variability=internal_mean,
        population_variability=population,
        ratio=population / internal_mean if internal_mean > 0 else None,
        homogeneous=bool(population <= internal_mean),
    )
    return result


def _variability(x: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> tuple[float, float]:
    """(internal, population) variability, exact and linear in records. With unit rows u_i and a group's sum S_g:
    the sum of cos over ordered pairs i != j inside g is |S_g|^2 - sum |u_i|^2; over ordered pairs in different
    groups it is |sum of all S_g|^2 - sum_g |S_g|^2, out of N^2 - sum_g n_g^2 pairs.
    Rows are taken group by group in chunks, so memory stays one chunk however many records and individuals."""
    order = np.argsort(labels, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]  # group g is order[bounds[g] : bounds[g + 1]]
    total = np.zeros(x.shape[1])
    group_sq = np.zeros(len(sizes))  # |S_g|^2
    self_sq = np.zeros(len(sizes))  # sum of |u_i|^2 (1, or 0 for a zero row)
    first = 0
    while first < len(sizes):
        # Whole groups up to about CHUNK_ROWS rows (at least one group).
        last = max(first + 1, int(np.searchsorted(bounds, bounds[first] + CHUNK_ROWS, side="right")) - 1)
        last = min(last, len(sizes))
        unit = _unit(x[order[bounds[first] : bounds[last]]])
        n = sizes[first:last]
        # Group sums as a sparse 0/1 matrix times the rows: ~4x faster than np.add.reduceat here.
        member = np.repeat(np.arange(len(n)), n)
        indicator = sparse.csr_array(
            (np.ones(len(member)), (member, np.arange(len(member)))), shape=(len(n), len(member))
        )
        sums = indicator @ unit
        total += sums.sum(axis=0)
        group_sq[first:last] = np.einsum("ij,ij->i", sums, sums)
        self_sq[first:last] = np.bincount(member, weights=np.einsum("ij,ij->i", unit, unit), minlength=len(n))
        first = last
    repeated = sizes >= 2
    n = sizes[repeated].astype(np.float64)
    internal = float(np.mean(1.0 - (group_sq[repeated] - self_sq[repeated]) / (n * (n - 1))))
    cross_pairs = float(len(labels)) ** 2 - float(np.sum(sizes.astype(np.float64) ** 2))
    population = float(1.0 - (total @ total - group_sq.sum()) / cross_pairs)
    return internal, population


def _unit(rows: np.ndarray) -> np.ndarray:
    """Float64 rows L2-normalised (zero rows stay zero), refusing NaN/inf as `prepared_rows` does."""
    x = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
