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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from scipy import sparse

from polyculture.metrics.semantic import one_blas_thread, prepared_rows

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


def conceptual_diversity(
    individuals: Sequence[str] | pl.Series, embeddings: np.ndarray, *, max_rows: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Internal and population variability (see the module docstring); internal is exact over every record,
    population pairs come from a seeded sample of `max_rows` records."""
    x = np.asarray(embeddings)
    n_rows = len(individuals)
    if n_rows != (x.shape[0] if x.ndim == 2 else 0) and n_rows:
        raise ValueError(f"{n_rows} individuals but embeddings of shape {x.shape}")
    # Dense integer labels, so grouping a million records is array work, not a dict of lists.
    keys = pl.Series("key", individuals, dtype=pl.String)
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

    internal_mean = _internal_variability(x, labels, sizes)
    rng = np.random.default_rng(seed)
    # Population: every cross-individual pair within a seeded sample of the records.
    sample = np.arange(len(individuals))
    if len(sample) > max_rows:
        sample = np.sort(rng.choice(len(sample), size=max_rows, replace=False))
    unit = prepared_rows(x[sample], len(sample) + 2, seed)
    sampled = labels[sample]
    different = sampled[:, None] != sampled[None, :]
    if not different.any():
        result["reason"] = "the sampled records all come from one prompt"
        return result
    with one_blas_thread():
        population = float(1.0 - (unit @ unit.T)[different].mean())
    result.update(
        internal_variability=internal_mean,
        population_variability=population,
        ratio=population / internal_mean if internal_mean > 0 else None,
        homogeneous=bool(population <= internal_mean),
    )
    return result


def _internal_variability(x: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> float:
    """Mean over individuals with 2+ records of their mean pairwise cosine distance, exact and linear in records:
    with unit rows u_i, the sum of cos over ordered pairs i != j of a group is |sum u_i|^2 - sum |u_i|^2.
    Rows are taken group by group in chunks, so memory stays one chunk however many records and individuals."""
    rows = np.flatnonzero(sizes[labels] >= 2)
    order = rows[np.argsort(labels[rows], kind="stable")]
    grouped = labels[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    bounds = np.r_[starts, len(order)]
    distances = []
    first = 0  # index into starts of the chunk's first group
    while first < len(starts):
        # Whole groups up to about CHUNK_ROWS rows (at least one group).
        last = max(first + 1, int(np.searchsorted(bounds, bounds[first] + CHUNK_ROWS, side="right")) - 1)
        last = min(last, len(starts))
        unit = _unit(x[order[bounds[first] : bounds[last]]])
        n = np.diff(bounds[first : last + 1])
        # Group sums as a sparse 0/1 matrix times the rows: ~4x faster than np.add.reduceat here.
        member = np.repeat(np.arange(len(n)), n)
        indicator = sparse.csr_array(
            (np.ones(len(member)), (member, np.arange(len(member)))), shape=(len(n), len(member))
        )
        sums = indicator @ unit
        squares = np.bincount(member, weights=np.einsum("ij,ij->i", unit, unit), minlength=len(n))
        n = n.astype(np.float64)
        distances.append(1.0 - (np.einsum("ij,ij->i", sums, sums) - squares) / (n * (n - 1)))
        first = last
    return float(np.mean(np.concatenate(distances)))


def _unit(rows: np.ndarray) -> np.ndarray:
    """Float64 rows L2-normalised (zero rows stay zero), refusing NaN/inf as `prepared_rows` does."""
    x = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)
