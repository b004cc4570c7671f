"""plan: exact per-cell quotas from the target distribution (largest remainder), and prompts per cell."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import polars as pl

from polyculture.spec import Attribute, BuildSpec, CellWeight


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
    """Joint cells over the attributes (independent targets: product of marginals), with exact counts.

    Rounding each joint cell on its own drifts the marginals (weights 3:3:2:1:1:1 over 8 x 6 cells and 240 records:
    plain largest remainder gives Europe 40 instead of 44). So each attribute's marginal is fixed first by largest
    remainder, then a small integer program picks which cells round up so every marginal is hit exactly, preferring
    the largest remainders. For two attributes this always succeeds (the constraints are totally unimodular); with
    three or more an exact rounding may not exist, and a greedy rounding keeps the total exact.
    """
    if not attributes:
        return [({}, total)]
    dists = [a.target_distribution() for a in attributes]
    marginals = [dict(zip(d, largest_remainder(total, list(d.values())), strict=True)) for d in dists]
    combos = list(itertools.product(*[list(d) for d in dists]))
    exact = np.array([total * math.prod(dists[i][v] for i, v in enumerate(combo)) for combo in combos])
    floors = np.floor(exact).astype(np.int64)
    round_up = _exact_marginal_rounding(combos, exact - floors, floors, marginals)
    if round_up is None:
        round_up = _greedy_rounding(combos, exact - floors, floors, marginals, total)
    counts = floors + round_up
    return [
        ({a.name: value for a, value in zip(attributes, combo, strict=True)}, int(count))
        for combo, count in zip(combos, counts, strict=True)
    ]


def table_targets(
    attributes: Sequence[Attribute], table: Sequence[CellWeight], total: int
) -> list[tuple[dict[str, str], int]]:
    """Exact counts for an explicit joint table: largest remainder over its listed cells (in table order)."""
    counts = largest_remainder(total, [row.weight for row in table])
    return [
        ({a.name: row.cell[a.name] for a in attributes}, count) for row, count in zip(table, counts, strict=True)
    ]


def cell_targets(spec: BuildSpec) -> list[tuple[dict[str, str], int]]:
    """The joint cells the spec's rebalancing aims at, with exact counts.

    targets joint and marginals both plan with the joint table (product of the attributes' weights, marginals exact);
    marginals mode only relaxes how rebalance may trade records between cells afterwards.
    """
    if spec.rebalance.targets == "table" and spec.rebalance.table:
        return table_targets(spec.attributes, spec.rebalance.table, spec.target_size)
    return joint_targets(spec.attributes, spec.target_size)


def marginal_targets(cells: Sequence[tuple[dict[str, str], int]]) -> dict[str, dict[str, int]]:
    """Each attribute's exact counts per value, summed from the joint cells."""
    out: dict[str, dict[str, int]] = {}
    for values, count in cells:
        for name, value in values.items():
            out.setdefault(name, {}).setdefault(value, 0)
            out[name][value] += count
    return out


def marginal_quotas(
    cells: Sequence[tuple[dict[str, str], int]], available: Sequence[int]
) -> list[int]:
    """Per-cell counts that hit every marginal exactly using only the records available, as close to the joint plan
    as possible; where no such table exists, the largest total that never exceeds a marginal (the rest is reported
    short). Two integer programs (scipy's HiGHS): first the largest feasible total, then the closest table at it."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(cells)
    if n == 0:
        return []
    plan_counts = np.array([count for _, count in cells], dtype=float)
    cap = np.asarray(available, dtype=float)
    marginals = marginal_targets(cells)
    rows, limits = [], []
    for name, by_value in marginals.items():
        for value, target in by_value.items():
            rows.append([float(values[name] == value) for values, _ in cells])
            limits.append(target)
    a = np.array(rows)
    integer = np.ones(n)
    first = milp(
        -np.ones(n), constraints=[LinearConstraint(a, 0, limits)], integrality=integer, bounds=Bounds(0, cap)
    )
    if first.status != 0 or first.x is None:
        return [0] * n
    best_total = round(-first.fun)
    # Closest to the plan at that total: minimise sum t with t >= |x - plan|.
    identity = np.eye(n)
    zeros = np.zeros((a.shape[0], n))
    second = milp(
        np.concatenate([np.zeros(n), np.ones(n)]),
        constraints=[
            LinearConstraint(np.hstack([a, zeros]), 0, limits),
            LinearConstraint(np.concatenate([np.ones(n), np.zeros(n)])[None, :], best_total, best_total),
            LinearConstraint(np.hstack([identity, -identity]), -np.inf, plan_counts),
            LinearConstraint(np.hstack([-identity, -identity]), -np.inf, -plan_counts),
        ],
        integrality=np.concatenate([integer, np.zeros(n)]),
        bounds=Bounds(np.zeros(2 * n), np.concatenate([cap, np.full(n, np.inf)])),
    )
    x = second.x if second.status == 0 and second.x is not None else first.x
    return [int(v) for v in np.round(x[:n])]


def _exact_marginal_rounding(
    combos: list[tuple[str, ...]], remainders: np.ndarray, floors: np.ndarray, marginals: list[dict[str, int]]
) -> np.ndarray | None:
    """Integer cell counts whose marginals equal `marginals`, as close as possible to the exact cells (L1 distance).

    Variables: the count x_c of each cell and its distance t_c >= |x_c - exact_c|; minimise the sum of t.
    Returns the round-up over the floors, or None where no such table exists.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(combos)
    exact = floors + remainders
    identity = np.eye(n)
    rows, targets = [], []
    for i, marginal in enumerate(marginals):
        for value, target in marginal.items():
            rows.append(np.concatenate([[float(combo[i] == value) for combo in combos], np.zeros(n)]))
            targets.append(target)
    constraints = [
        LinearConstraint(np.array(rows), targets, targets),
        LinearConstraint(np.hstack([identity, -identity]), -np.inf, exact),  # x - t <= exact
        LinearConstraint(np.hstack([-identity, -identity]), -np.inf, -exact),  # -x - t <= -exact
    ]
    upper = np.concatenate([np.where(exact > 0, np.inf, 0.0), np.full(n, np.inf)])  # zero-weight cells stay empty
    result = milp(
        np.concatenate([np.zeros(n), np.ones(n)]),
        constraints=constraints,
        integrality=np.concatenate([np.ones(n), np.zeros(n)]),
        bounds=Bounds(np.zeros(2 * n), upper),
    )
    if result.status != 0 or result.x is None:
        return None
    return np.round(result.x[:n]).astype(np.int64) - floors


def _greedy_rounding(
    combos: list[tuple[str, ...]],
    remainders: np.ndarray,
    floors: np.ndarray,
    marginals: list[dict[str, int]],
    total: int,
) -> np.ndarray:
    room = [dict(m) for m in marginals]
    for combo, count in zip(combos, floors, strict=True):
        for i, value in enumerate(combo):
            room[i][value] -= int(count)
    up = np.zeros(len(combos), dtype=np.int64)
    order = sorted(range(len(combos)), key=lambda c: (-remainders[c], c))
    for _ in range(total - int(floors.sum())):
        best = max(order, key=lambda c: (remainders[c] > 0, sum(room[i][v] > 0 for i, v in enumerate(combos[c]))))
        up[best] += 1
        for i, value in enumerate(combos[best]):
            room[i][value] -= 1
        order.remove(best)
        order.append(best)  # a cell rounded up goes behind the others
    return up


def items_per_call(spec: BuildSpec) -> int:
    """Records one prompt sample yields after the method's own selection (k for sequence and VS, turns, ...)."""
    from polyculture.methods import get_method

    return get_method(spec.method).items_per_call


def plan(spec: BuildSpec) -> pl.DataFrame:
    """One row per cell of the prompt-conditioned attributes, with its quota and the prompts to send for it."""
    attrs = spec.prompt_attributes
    per_prompt = spec.sampling.n * items_per_call(spec)
    # Quotas come from the joint targets over all attributes (as rebalance uses them), summed per prompt cell.
    quotas: dict[tuple[str, ...], int] = {}
    for values, count in cell_targets(spec):
        key = tuple(values[a.name] for a in attrs)
        quotas[key] = quotas.get(key, 0) + count
    rows = []
    for cell_id, (key, quota) in enumerate(quotas.items()):
        values = dict(zip([a.name for a in attrs], key, strict=True))
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
