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
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from polyculture.metrics.semantic import prepared_rows

_INDIVIDUAL = re.compile(r"^(.*?c\d+-p\d+)(?:-|$)")
MAX_PER_INDIVIDUAL = 50  # pairs inside one individual grow quadratically; a seeded sample of its records is enough


def individual_key(call_id: str) -> str:
    """The prompt a call came from: "c3-p1" for "c3-p1-s0-t2" (any prefix such as "r2-" kept); the call id itself
    when it does not follow the "c{cell}-p{prompt}" pattern."""
    match = _INDIVIDUAL.match(call_id or "")
    return match.group(1) if match else (call_id or "")


def conceptual_diversity(
    individuals: Sequence[str], embeddings: np.ndarray, *, max_rows: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Internal and population variability (see the module docstring); population pairs come from a seeded sample
    of `max_rows` records."""
    x = np.asarray(embeddings, dtype=np.float64)
    if len(individuals) != (x.shape[0] if x.ndim == 2 else 0) and len(individuals):
        raise ValueError(f"{len(individuals)} individuals but embeddings of shape {x.shape}")
    groups: dict[str, list[int]] = defaultdict(list)
    for row, key in enumerate(individuals):
        groups[key].append(row)
    repeated = [rows for rows in groups.values() if len(rows) >= 2]
    result: dict[str, Any] = {
        "records": len(individuals),
        "individuals": len(groups),
        "individuals_with_repeats": len(repeated),
        "internal_variability": None,
        "population_variability": None,
        "ratio": None,
        "homogeneous": None,
        "reason": None,
    }
    if len(repeated) < 2:
        result["reason"] = (
            f"needs at least 2 prompts with 2 or more records each; {len(repeated)} of {len(groups)} prompts have"
            " more than one record"
        )
        return result

    rng = np.random.default_rng(seed)
    internal = []
    for rows in repeated:
        if len(rows) > MAX_PER_INDIVIDUAL:
            rows = sorted(rng.choice(rows, size=MAX_PER_INDIVIDUAL, replace=False).tolist())
        unit = prepared_rows(x[rows], len(rows) + 2, seed)
        sims = unit @ unit.T
        n = len(rows)
        internal.append(1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1)))

    # Population: every cross-individual pair within a seeded sample of the records.
    sample = np.arange(len(individuals))
    if len(sample) > max_rows:
        sample = np.sort(rng.choice(len(sample), size=max_rows, replace=False))
    unit = prepared_rows(x[sample], len(sample) + 2, seed)
    _, labels = np.unique(np.array([individuals[i] for i in sample], dtype=str), return_inverse=True)
    different = labels[:, None] != labels[None, :]
    if not different.any():
        result["reason"] = "the sampled records all come from one prompt"
        return result
    population = float(1.0 - (unit @ unit.T)[different].mean())
    internal_mean = float(np.mean(internal))
    result.update(
        internal_variability=internal_mean,
        population_variability=population,
        ratio=population / internal_mean if internal_mean > 0 else None,
        homogeneous=bool(population <= internal_mean),
    )
    return result
