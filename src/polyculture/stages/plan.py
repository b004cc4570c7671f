"""plan: exact per-cell quotas from the target distribution (largest remainder), and prompts per cell."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import polars as pl

from polyculture.spec import Attribute, BuildSpec


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing exactly to `total`, proportional to `weights` (Hamilton's method).

    Ties in the remainders go to the earlier entry, so the result is deterministic.
    """
    if total < 0:
        raise ValueError("total must be >= 0")
    weight_sum = float(sum(weights))
    if weight_sum <= 0:
        raise ValueError("weights must not all be 0")
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def cell_key(values: dict[str, str]) -> str:
    return "|".join(f"{name}={value}" for name, value in values.items()) or "all"


def joint_targets(attributes: Sequence[Attribute], total: int) -> list[tuple[dict[str, str], int]]:
    """Joint cells over the attributes (independent targets: product of marginals), with exact counts."""
    if not attributes:
        return [({}, total)]
    dists = [a.target_distribution() for a in attributes]
    combos = list(itertools.product(*[list(d.items()) for d in dists]))
    weights = [math.prod(p for _, p in combo) for combo in combos]
    counts = largest_remainder(total, weights)
    return [
        ({a.name: value for a, (value, _) in zip(attributes, combo, strict=True)}, count)
        for combo, count in zip(combos, counts, strict=True)
    ]


def items_per_call(spec: BuildSpec) -> int:
    return spec.method.k if spec.method.name.startswith("vs_") else 1


def plan(spec: BuildSpec) -> pl.DataFrame:
    """One row per cell of the prompt-conditioned attributes, with its quota and the prompts to send for it."""
    attrs = spec.prompt_attributes
    per_prompt = spec.sampling.n * items_per_call(spec)
    rows = []
    for cell_id, (values, quota) in enumerate(joint_targets(attrs, spec.target_size)):
        wanted = math.ceil(quota * spec.generation.oversample)
        rows.append(
            {
                "cell_id": cell_id,
                "cell_key": cell_key(values),
                **values,
                "quota": quota,
                "n_prompts": math.ceil(wanted / per_prompt) if quota else 0,
            }
        )
    schema = {"cell_id": pl.Int64, "cell_key": pl.String, **{a.name: pl.String for a in attrs}}
    schema |= {"quota": pl.Int64, "n_prompts": pl.Int64}
    return pl.DataFrame(rows, schema=schema)
