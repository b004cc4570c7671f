"""compare: run prompting methods on one spec under the same generated-token budget, and measure each.

Plain functions over frames (no Prefect): `flows/compare_methods.py` wires them.

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

Metric definitions (all over the method's VALID records unless said otherwise):
- tokens_used: generated (completion) tokens summed over every call, the quantity the budget limits.
- calls: completions (for multi-turn methods every turn's completion is an answer of its own, so a call is a turn).
- valid_rate: valid items / candidates, where candidates are the items parsed out of completions (valid records,
  items a VS selection did not keep, and items rejected as malformed or schema-violating) and valid items are those
  that passed the schema (kept or not by the selection). parse_failure_rate: calls whose completion could not be
  parsed at all / calls. The figures below are over the records the method kept ("valid").
- unique_valid_per_1k_tokens: valid records left after exact dedup of the normalised text (stages.dedup.normalize_text)
  per 1,000 generated tokens.
- semantic_diversity (metrics.semantic, VS paper: 100 x mean over pairs of 1 - clip(cos, 0, 1)), distinct_1/2
  (metrics.lexical), mean_rouge_l (metrics.overlap: mean pairwise ROUGE-L F; a similarity, lower is more diverse).
- answers (spec attributes with `source: field`, whose values are the answer set): each valid record's value is
  matched to the allowed values after normalize_text (so "california." counts as "California"); anything else is
  off-set ("other"). From metrics.attribute.attribute_summary: coverage (distinct allowed values seen / set size),
  entropy_bits and normalized_entropy (over the allowed values), kl_bits (observed || target, allowed values),
  total_variation (with off-set answers as one more category of target 0); plus in_set_rate (valid records whose
  answer is in the set / valid records) and top_answer / top_share (the most frequent answer, in the set or not, and
  its share of the valid records).
- calibration (VS methods): metrics.calibration over the valid records, keyed by the first field attribute's answer
  (or the normalised text when the spec has none); per-call raw sums are over the call's valid items.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import ValidationError

from polyculture.engines.base import Engine
from polyculture.index.text import normalize_text
from polyculture.methods.base import Method
from polyculture.metrics.answers import answer_summary, canonical_answers
from polyculture.metrics.calibration import calibration
from polyculture.metrics.lexical import distinct_n, tokenize
from polyculture.metrics.overlap import DEFAULT_MAX_PAIRS, mean_pairwise_rouge_l
from polyculture.metrics.semantic import semantic_diversity
from polyculture.report.format import md_cell
from polyculture.runs.files import jsonable, write_text_atomic
from polyculture.spec import BuildSpec, MethodName, MethodSpec, SpecError
from polyculture.stages.generate import generate
from polyculture.stages.rejects import rejects_frame
from polyculture.stages.validate import ValidationResult, validate

ALL_METHODS: tuple[str, ...] = get_args(MethodName)
ROUND_CAP_BATCHES = 16  # a round is at most this many engine batches
MAX_ROUNDS = 200  # a safety stop; a budget normally ends the loop long before
SELECT_STAGE = "select"  # validate's stage name for items a VS selection did not keep
CALIBRATION_VALUES = 30  # per-value rows kept in the output (totals use every value)


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
        result = validate(spec, frame, method)
        prefix = f"r{number}-"
        records.append(_prefixed(result.records, prefix, ("record_id", "call_id")))
        rejects.append(_prefixed(result.rejects, prefix, ("record_id", "call_id")))
    if not records:
        from polyculture.stages.validate import records_schema

        return ValidationResult(records=pl.DataFrame(schema=records_schema(spec)), rejects=rejects_frame())
    return ValidationResult(records=pl.concat(records, how="vertical"), rejects=pl.concat(rejects, how="vertical"))


# ---- metrics ---------------------------------------------------------------------------------------------------------


def method_metrics(
    spec: BuildSpec,
    *,
    method: str,
    completions: pl.DataFrame,
    records: pl.DataFrame,
    rejects: pl.DataFrame,
    embeddings: np.ndarray,
    budget_tokens: int,
    rounds: int | None = None,
    seed: int = 0,
    rouge_pairs: int = DEFAULT_MAX_PAIRS,
) -> dict[str, Any]:
    """One method's figures (definitions in the module docstring). Frames follow the contracts in stages/__init__.py;
    `completions` may carry `round`, `shard` and `batch_seconds` columns for timing."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if records.height and (embeddings.ndim != 2 or embeddings.shape[0] != records.height):
        raise ValueError(f"{method}: {records.height} records but embeddings of shape {embeddings.shape}")
    calls = completions.height
    tokens_used = int(completions["completion_tokens"].sum()) if calls else 0
    parse_failures = rejects.filter(pl.col("record_id").is_null()).height
    item_rejects = rejects.filter(pl.col("record_id").is_not_null())
    candidates = records.height + item_rejects.height
    # A VS selection (sample/threshold) drops valid items on purpose: they count as valid, not as rejects.
    unselected = item_rejects.filter(pl.col("stage") == SELECT_STAGE).height
    valid_items = records.height + unselected
    texts = [t or "" for t in records["text"].to_list()] if records.height else []
    unique = len({normalize_text(t) for t in texts})

    result: dict[str, Any] = {
        "method": method,
        "status": "ok",
        "budget_tokens": budget_tokens,
        "tokens_used": tokens_used,
        "prompt_tokens": int(completions["prompt_tokens"].sum()) if calls else 0,
        "rounds": rounds,
        "generation_seconds": _generation_seconds(completions),
        "counts": {
            "calls": calls,
            "parse_failures": parse_failures,
            "candidates": candidates,
            "valid_items": valid_items,
            "valid": records.height,
            "unique_valid": unique,
        },
        "valid_rate": valid_items / candidates if candidates else None,
        "parse_failure_rate": parse_failures / calls if calls else None,
        "valid_per_call": records.height / calls if calls else None,
        "unique_valid_per_1k_tokens": 1000.0 * unique / tokens_used if tokens_used else None,
        "semantic_diversity": semantic_diversity(embeddings, seed=seed) if records.height >= 2 else None,
        "distinct_1": _distinct(texts, 1),
        "distinct_2": _distinct(texts, 2),
        "mean_rouge_l": mean_pairwise_rouge_l(texts, max_pairs=rouge_pairs, seed=seed),
        "rouge_l_pairs": min(rouge_pairs, len(texts) * (len(texts) - 1) // 2),
    }
    seconds = result["generation_seconds"]
    result["generated_tokens_per_second"] = tokens_used / seconds if seconds else None

    answers: dict[str, Any] = {}
    for attr in spec.field_attributes:
        column = records[attr.name].cast(pl.String).to_list() if records.height else []
        answers[attr.name] = answer_summary(column, attr.target_distribution())
    result["answers"] = answers

    result["calibration"] = None
    if method.startswith("vs_") and records.height:
        if spec.field_attributes:
            attr = spec.field_attributes[0]
            keys = canonical_answers(records[attr.name].cast(pl.String).to_list(), attr.values)
        else:
            keys = [normalize_text(t) for t in texts]
        result["calibration"] = calibration(
            records["call_id"].to_list(),
            ["(missing)" if k is None else k for k in keys],
            records["verbalized_probability"].to_list(),
            max_values=CALIBRATION_VALUES,
        )
    return result


def _distinct(texts: Sequence[str], n: int) -> float | None:
    """distinct-n, or None where no text has n tokens (one-word answers have no bigram: undefined, not 0)."""
    if not any(len(tokenize(t)) >= n for t in texts):
        return None
    return distinct_n(texts, n)


def _generation_seconds(completions: pl.DataFrame) -> float | None:
    if not completions.height or "batch_seconds" not in completions.columns:
        return None
    keys = [c for c in ("round", "shard") if c in completions.columns]
    # batch_seconds is repeated on every row of its shard: count it once per (round, shard).
    per_shard = completions.unique(keys) if keys else completions.head(1)
    return float(per_shard["batch_seconds"].sum())


def failed_method(method: str, error: str) -> dict[str, Any]:
    return {"method": method, "status": "failed", "error": error}


# ---- the comparison --------------------------------------------------------------------------------------------------


def comparison_report(
    spec: BuildSpec,
    results: Sequence[dict[str, Any]],
    *,
    run_id: str,
    budget_tokens: int,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole comparison as strict-JSON-ready data (NaN/inf become None)."""
    return jsonable(
        {
            "dataset": spec.name,
            "run_id": run_id,
            "spec_fingerprint": spec.fingerprint(),
            "model": spec.model.label,
            "engine": spec.model.engine,
            "method_options": spec.method.model_dump(mode="json", exclude={"name"}),
            "sampling": spec.sampling.model_dump(mode="json"),
            "seed": spec.seed,
            "budget_tokens": budget_tokens,
            "answer_sets": {a.name: len(a.values) for a in spec.field_attributes},
            "methods": list(results),
            "failed": {r["method"]: r["error"] for r in results if r.get("status") == "failed"},
            "usage": dict(usage or {}),
        }
    )


def write_comparison(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """comparison.json, comparison.md and comparison.png under out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = plot_comparison(report, out_dir / "comparison.png")
    files = {
        "json": str(out_dir / "comparison.json"),
        "markdown": str(out_dir / "comparison.md"),
        "chart": str(chart),
    }
    report["files"] = files
    write_text_atomic(out_dir / "comparison.md", render_markdown(report))
    write_text_atomic(out_dir / "comparison.json", json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return files


@dataclass(frozen=True)
class Column:
    """One figure of a method's result, as shown in tables and the chart."""

    key: str
    label: str
    get: Callable[[dict[str, Any]], Any]
    fmt: str = "{:.3f}"
    note: str = ""
    tags: tuple[str, ...] = field(default=())


def summary_columns(report: dict[str, Any]) -> list[Column]:
    """The per-method figures a table shows, in order (answer-set columns only when the spec has an answer set)."""
    columns = [
        Column("tokens_used", "tokens used", lambda r: r["tokens_used"], "{:,}"),
        Column("calls", "calls", lambda r: r["counts"]["calls"], "{:,}"),
        Column("valid", "valid records", lambda r: r["counts"]["valid"], "{:,}"),
        Column("valid_rate", "valid rate", lambda r: r["valid_rate"], "{:.0%}", tags=("chart",)),
        Column("parse_failure_rate", "parse failures", lambda r: r["parse_failure_rate"], "{:.0%}"),
        Column("unique", "unique valid", lambda r: r["counts"]["unique_valid"], "{:,}"),
        Column(
            "unique_per_1k", "unique valid / 1k tok", lambda r: r["unique_valid_per_1k_tokens"], "{:.1f}", tags=("chart",)
        ),
        Column("semantic", "semantic div.", lambda r: r["semantic_diversity"], "{:.1f}", "0-100, higher is more diverse",
               tags=("chart",)),  # fmt: skip
        Column("distinct_1", "distinct-1", lambda r: r["distinct_1"], tags=("chart-text",)),
        Column("distinct_2", "distinct-2", lambda r: r["distinct_2"], tags=("chart-text",)),
        Column("rouge_l", "ROUGE-L", lambda r: r["mean_rouge_l"], note="mean pairwise, lower is more diverse",
               tags=("chart",)),  # fmt: skip
    ]
    for name, size in report.get("answer_sets", {}).items():
        a = lambda r, name=name: r["answers"][name]  # noqa: E731
        columns += [
            Column(f"{name}.in_set", f"{name}: in set", lambda r, a=a: a(r)["in_set_rate"], "{:.0%}"),
            Column(f"{name}.coverage", f"{name}: coverage", lambda r, a=a: a(r)["coverage"], "{:.0%}",
                   f"distinct answers of the {size} in the set"),
            Column(f"{name}.entropy", f"{name}: norm. entropy", lambda r, a=a: a(r)["normalized_entropy"]),
            Column(f"{name}.kl", f"{name}: KL bits", lambda r, a=a: a(r)["kl_bits"], "{:.2f}"),
            Column(f"{name}.top", f"{name}: top answer", lambda r, a=a: _top(a(r)), "{}"),
        ]
    columns += [
        Column("calibration_tvd", "calib. TVD", lambda r: (r.get("calibration") or {}).get("total_variation")),
        Column("calibration_rho", "calib. Spearman", lambda r: (r.get("calibration") or {}).get("spearman"), "{:.2f}"),
        Column("raw_sum", "mean raw prob. sum", lambda r: ((r.get("calibration") or {}).get("raw_sum") or {}).get("mean"),
               "{:.2f}"),  # fmt: skip
    ]
    return columns


def _top(answers: dict[str, Any]) -> str | None:
    if answers.get("top_answer") is None:
        return None
    return f"{answers['top_answer']} ({answers['top_share']:.0%})"


def format_value(column: Column, result: dict[str, Any]) -> str:
    try:
        value = column.get(result)
    except (KeyError, TypeError):
        return "n/a"
    if value is None:
        return "n/a"
    return column.fmt.format(value)


def render_markdown(report: dict[str, Any]) -> str:
    ok = [r for r in report["methods"] if r.get("status") == "ok"]
    lines = [
        f"# Method comparison: {report['dataset']}",
        "",
        f"Run `{report['run_id']}`: model `{report['model']}` on {report['engine']}, the same budget of "
        f"{report['budget_tokens']:,} generated tokens per method (each stops after the first round that reaches it; "
        f"'tokens used' is what it spent). Method options: {_options(report['method_options'])}; sampling: "
        f"{_options(report['sampling'])}; seed {report['seed']}.",
        "",
    ]
    columns = summary_columns(report)
    if ok:
        lines += ["| figure | " + " | ".join(r["method"] for r in ok) + " |"]
        lines += ["|---|" + "|".join("---:" for _ in ok) + "|"]
        for c in columns:
            lines.append(f"| {md_cell(c.label)} | " + " | ".join(md_cell(format_value(c, r)) for r in ok) + " |")
        notes = [f"{c.label}: {c.note}" for c in columns if c.note]
        lines += ["", "Notes: " + "; ".join(notes) + ".", "", "![comparison](comparison.png)"]
    else:
        lines.append("No method produced results.")

    for name in report.get("answer_sets", {}):
        lines += ["", f"## Answers: `{name}`", "", "| method | n | in set | coverage | entropy (bits) | KL (bits) |"
                  " TV | off-set examples |", "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in ok:
            a = r["answers"][name]
            others = ", ".join(f"{md_cell(str(e['value']), 30)} ({e['count']})" for e in a["other_examples"])
            lines.append(
                f"| {r['method']} | {a['n']} | {_fmt(a['in_set_rate'], '{:.0%}')} | {a['distinct_in_set']}/{a['set_size']}"
                f" | {_fmt(a['entropy_bits'], '{:.2f}')} | {_fmt(a['kl_bits'], '{:.2f}')}"
                f" | {_fmt(a['total_variation'], '{:.2f}')} | {others} |"
            )

    calibrated = [r for r in ok if r.get("calibration")]
    if calibrated:
        lines += [
            "",
            "## Calibration of verbalized probabilities",
            "",
            "Per call, the verbalized probabilities are normalised to sum to 1; the verbalized share of an answer is the "
            "mean over calls of the probability mass put on it, compared with how often the answer was written.",
            "",
            "| method | calls | items | TV distance | Spearman | raw sum mean | median | min | max | calls summing to 1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in calibrated:
            c, s = r["calibration"], r["calibration"]["raw_sum"]
            lines.append(
                f"| {r['method']} | {c['calls']} | {c['items']} | {c['total_variation']:.3f} | {_fmt(c['spearman'], '{:.2f}')}"
                f" | {s['mean']:.2f} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f}"
                f" | {s['share_summing_to_1']:.0%} |"
            )
        # Per-answer rows only where answers repeat (an answer set); free texts are each written once.
        for r in calibrated if report.get("answer_sets") else []:
            lines += ["", f"{r['method']}: most frequent answers", "", "| answer | count | observed share |"
                      " verbalized share | mean normalised p |", "|---|---:|---:|---:|---:|"]  # fmt: skip
            for v in r["calibration"]["per_value"][:10]:
                lines.append(
                    f"| {md_cell(str(v['value']), 60)} | {v['count']} | {v['observed_share']:.3f} | "
                    f"{v['verbalized_share']:.3f} | {v['mean_probability']:.3f} |"
                )

    if report["failed"]:
        lines += ["", "## Methods that failed", "", "| method | error |", "|---|---|"]
        lines += [f"| {m} | {md_cell(e, 300)} |" for m, e in report["failed"].items()]
    if report.get("usage"):
        lines += ["", "## Usage", "", "| measure | value |", "|---|---:|"]
        lines += [f"| {md_cell(k)} | {md_cell(str(v))} |" for k, v in report["usage"].items()]
    return "\n".join(lines) + "\n"


def plot_comparison(report: dict[str, Any], path: Path) -> Path:
    """One small bar chart per headline figure, one bar per method that ran."""
    ok = [r for r in report["methods"] if r.get("status") == "ok"]
    columns = summary_columns(report)
    panels = [c for c in columns if "chart" in c.tags]
    answer_sets = list(report.get("answer_sets", {}))
    if answer_sets:  # the first answer set's coverage and entropy: these are what such tasks are about
        panels += [c for c in columns if c.key in (f"{answer_sets[0]}.coverage", f"{answer_sets[0]}.entropy")]
    else:
        panels += [c for c in columns if "chart-text" in c.tags]
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    names = [r["method"] for r in ok]
    x = np.arange(len(names))
    for ax, column in zip(axes, panels, strict=False):
        values = []
        for r in ok:
            try:
                value = column.get(r)
            except (KeyError, TypeError):
                value = None
            values.append(np.nan if value is None else float(value))
        bars = ax.bar(x, np.nan_to_num(values), color="#2f6f9f")
        labels = ["n/a" if math.isnan(v) else _short(column, v) for v in values]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(column.label + (f"\n({column.note})" if column.note else ""), fontsize=9)
        top = max([v for v in values if not math.isnan(v)], default=0.0)
        ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{report['dataset']}: methods at {report['budget_tokens']:,} generated tokens each ({report['model']})", fontsize=10
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _short(column: Column, value: float) -> str:
    if "%" in column.fmt:
        return f"{value:.0%}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if v is not None)


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)

