"""compare.budget: which methods to compare, and each one's generation under the same generated-token budget.

Plain functions over frames (no Prefect): `compare.flow` wires them; `compare.metrics` measures each method and
`compare.render` writes the comparison.

- `method_spec` swaps the method name into a spec (other method options kept, validated again).
- `generate_within_budget` sends prompts in rounds until the method has spent the token budget: it stops after the
  first round that reaches it (so a method overshoots by at most part of one round; the tokens it actually used are
  reported). The first round is as many prompts (at most `model.batch_size`, at least 1) as could not overshoot even
  if every call ran to `sampling.max_tokens`; each later round is sized from the tokens per prompt seen so far to
  about what is left, capped at `ROUND_CAP_BATCHES` batches. Prompts go to the plan's cells in proportion
  to their quotas (Sainte-Lague, so every prefix of the sequence is as proportional as it can be).
- `validate_rounds` validates each round on its own and prefixes call and record ids with the round ("r3-..."), so
  ids stay unique across rounds.
- `method_metrics` computes one method's figures from its completions, records, rejects and embeddings.
- `comparison_report` / `write_comparison` assemble comparison.json, comparison.md and comparison.png.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import polars as pl
from pydantic import ValidationError

from polyculture.engines.base import Engine
from polyculture.methods.base import Method
from polyculture.spec import BuildSpec, MethodName, MethodSpec, SpecError
from polyculture.stages.generate import generate
from polyculture.stages.rejects import rejects_frame
from polyculture.stages.validate import ValidationResult, validate

ALL_METHODS: tuple[str, ...] = get_args(MethodName)
ROUND_CAP_BATCHES = 16  # a round is at most this many engine batches
MAX_ROUNDS = 200  # a safety stop; a budget normally ends the loop long before


# ---- specs -----------------------------------------------------------------------------------------------------------


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Method names from "direct,vs_standard" (or a list), in order, without repeats; unknown names are refused."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise SpecError(f"--methods: name at least one method; allowed: {', '.join(ALL_METHODS)}")
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown:
        raise SpecError(f"--methods: unknown method(s) {unknown}; allowed: {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(names))


def method_spec(spec: BuildSpec, name: str) -> BuildSpec:
    """`spec` with method.name replaced (the other method options kept and validated again for the new method)."""
    try:
        method = MethodSpec.model_validate({**spec.method.model_dump(), "name": name})
    except ValidationError as exc:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise SpecError(f"method {name}: the spec's method options do not fit it: {reasons}") from None
    return spec.model_copy(update={"method": method})


# ---- generation under a token budget ---------------------------------------------------------------------------------


def allocate_prompts(weights: Sequence[float], assigned: Sequence[int], count: int) -> list[int]:
    """`count` more prompts spread over cells in proportion to `weights`, given what each cell already has.

    Sainte-Lague (Webster) one prompt at a time: the next prompt goes to the cell with the largest
    weight / (2 * prompts so far + 1), ties to the earlier cell. House-monotone: sending more never takes prompts away
    from a cell, so rounds of any size add up to the same sequence. Cells of weight 0 get none.
    """
    if len(weights) != len(assigned):
        raise ValueError("weights and assigned must have one entry per cell")
    if count < 0:
        raise ValueError("count must be >= 0")
    if count and not any(w > 0 for w in weights):
        raise ValueError("no cell has a positive weight")
    heap = [(-w / (2 * a + 1), i) for i, (w, a) in enumerate(zip(weights, assigned, strict=True)) if w > 0]
    heapq.heapify(heap)
    extra = [0] * len(weights)
    for _ in range(count):
        _, i = heapq.heappop(heap)
        extra[i] += 1
        heapq.heappush(heap, (-weights[i] / (2 * (assigned[i] + extra[i]) + 1), i))
    return extra


@dataclass(frozen=True)
class BudgetedGeneration:
    """A method's completions, one frame per round (each with a `round` column), and what they cost."""

    rounds: list[pl.DataFrame]
    budget_tokens: int
    tokens_used: int
    prompts: int
    stop_reason: str  # "budget" | "max_rounds" | "no_tokens"

    @property
    def completions(self) -> pl.DataFrame:
        """Every round's completions, call ids prefixed with "r<round>-" as `validate_rounds` prefixes records."""
        frames = [_prefixed(f, f"r{n}-", ("call_id",)) for n, f in enumerate(self.rounds) if f.height]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def generate_within_budget(
    spec: BuildSpec,
    cells: pl.DataFrame,
    engine: Engine,
    method: Method,
    budget_tokens: int,
    shard_dir: Path,
    *,
    max_rounds: int = MAX_ROUNDS,
    on_round: Callable[[int, int, int], None] | None = None,
) -> BudgetedGeneration:
    """Rounds of prompts until `budget_tokens` generated tokens are spent (see the module docstring).

    Each round's shards go under shard_dir/round-NNN/, and a round already on disk is read back (resume).
    `on_round(round, tokens_used, prompts_sent)` is called after each round, for progress displays.
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
    if "quota" not in cells.columns or "n_prompts" not in cells.columns:
        raise ValueError(f"cells frame needs 'quota' and 'n_prompts' columns (columns: {cells.columns})")
    weights = [float(q) for q in cells["quota"].to_list()]
    assigned = [0] * cells.height
    batch = spec.model.batch_size
    rounds: list[pl.DataFrame] = []
    used = prompts = 0
    stop = "max_rounds"
    for number in range(max_rounds):
        if number == 0:
            # No estimate yet: as many prompts as could not overshoot even if every call (of every turn) ran to
            # max_tokens.
            worst_per_prompt = spec.sampling.n * spec.sampling.max_tokens * method.turns
            size = max(1, min(batch, budget_tokens // worst_per_prompt))
        else:
            per_prompt = used / prompts
            size = min(max(1, math.ceil((budget_tokens - used) / per_prompt)), ROUND_CAP_BATCHES * batch)
        extra = allocate_prompts(weights, assigned, size)
        assigned = [a + e for a, e in zip(assigned, extra, strict=True)]
        round_cells = cells.with_columns(pl.Series("n_prompts", extra, dtype=pl.Int64))
        # Rounds repeat the same prompts: each round its own seeds, or it would repeat the same samples too.
        frame = generate(
            spec, round_cells, engine, method, Path(shard_dir) / f"round-{number:03d}",
            seed_key=f"compare-{method.name}-round-{number:03d}",
        )  # fmt: skip
        frame = frame.with_columns(pl.lit(number, dtype=pl.Int64).alias("round"))
        rounds.append(frame)
        tokens = int(frame["completion_tokens"].sum()) if frame.height else 0
        used += tokens
        prompts += size
        if on_round is not None:
            on_round(number, used, prompts)
        if used >= budget_tokens:
            stop = "budget"
            break
        if tokens == 0:
            stop = "no_tokens"  # an engine that generates nothing would loop forever
            break
    return BudgetedGeneration(rounds, budget_tokens, used, prompts, stop)


def _prefixed(frame: pl.DataFrame, prefix: str, columns: Sequence[str]) -> pl.DataFrame:
    return frame.with_columns(
        [(pl.lit(prefix) + pl.col(c)).alias(c) for c in columns if c in frame.columns]  # null stays null
    )


def validate_rounds(spec: BuildSpec, rounds: Sequence[pl.DataFrame], method: Method) -> ValidationResult:
    """Validate each round on its own, then prefix call and record ids with "r<round>-" so they stay unique."""
    records, rejects = [], []
    for number, frame in enumerate(rounds):
        if not frame.height:
            continue
        result = validate(frame, spec, method)
        prefix = f"r{number}-"
        records.append(_prefixed(result.records, prefix, ("record_id", "call_id")))
        rejects.append(_prefixed(result.rejects, prefix, ("record_id", "call_id")))
    if not records:
        from polyculture.stages.validate import records_schema

        return ValidationResult(records=pl.DataFrame(schema=records_schema(spec)), rejects=rejects_frame())
    return ValidationResult(records=pl.concat(records, how="vertical"), rejects=pl.concat(rejects, how="vertical"))
