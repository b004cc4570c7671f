"""report: diversity before/after, attribute targets vs what was kept, rejects and short cells.

Writes report.json (strict JSON: no NaN/inf), report.md (for people, embedded in the dataset card) and one bar chart per
attribute under plots/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from polyculture.metrics.attribute import attribute_summary
from polyculture.metrics.lexical import distinct_n
from polyculture.metrics.semantic import mean_pairwise_similarity, semantic_diversity
from polyculture.spec import Attribute, BuildSpec
from polyculture.stages.files import clip, jsonable, md_cell, write_text_atomic
from polyculture.stages.plan import largest_remainder

REJECT_EXAMPLES = 3
EXAMPLE_CHARS = 200  # reject details can hold whole completions; the report only needs a glimpse


def write_report(
    spec: BuildSpec,
    *,
    run_id: str,
    counts: dict[str, int],
    validated: pl.DataFrame,
    validated_embeddings: np.ndarray,
    final: pl.DataFrame,
    final_embeddings: np.ndarray,
    rejects: pl.DataFrame,
    cells: pl.DataFrame,
    usage: dict[str, float],
    out_dir: Path,
    pool: pl.DataFrame | None = None,
    pool_embeddings: np.ndarray | None = None,
    marginals: pl.DataFrame | None = None,
    rounds: list[dict[str, Any]] | None = None,
    stop_reason: str | None = None,
) -> dict[str, Any]:
    """Compute the report, write report.json, report.md and plots/attribute_<name>.png under out_dir; return it."""
    out_dir = Path(out_dir)
    before = _diversity(validated, validated_embeddings, "validated", spec.seed)
    after = _diversity(final, final_embeddings, "final", spec.seed)

    # The pool is what rebalancing chose from: validated, deduplicated, attributes extracted.
    pool = validated if pool is None else pool
    attributes: dict[str, Any] = {}
    for attr in spec.attributes:
        target_counts = _target_counts(attr, cells, spec.target_size)
        total = sum(target_counts.values())
        # A joint table sets the marginals itself; otherwise they are the attribute's own weights.
        from_table = spec.rebalance.targets == "table" and total
        target = {v: c / total for v, c in target_counts.items()} if from_table else attr.target_distribution()
        # An extracted attribute does not exist before extraction: its "validated" column is the pool's.
        before_frame = pool if attr.source == "extract" else validated
        attributes[attr.name] = {
            "source": attr.source,
            "field": attr.record_field if attr.source != "extract" else None,
            "target_counts": target_counts,
            "before": attribute_summary(_column(before_frame, attr.name, "validated"), target),
            "before_rebalance": attribute_summary(_column(pool, attr.name, "pool"), target),
            "after": attribute_summary(_column(final, attr.name, "final"), target),
        }

    reject_groups = _reject_groups(rejects)
    short = _short_cells(cells)
    # Calls whose whole answer could not be read (as opposed to single bad items inside a readable answer).
    failed_calls = rejects.filter((pl.col("stage") == "parse") & pl.col("record_id").is_null()).height
    completions = int(counts.get("completions", 0))
    plots_dir = out_dir / "plots"
    plots = {name: _plot_attribute(name, entry, plots_dir) for name, entry in attributes.items()}

    report: dict[str, Any] = {
        "dataset": spec.name,
        "run_id": run_id,
        "spec_fingerprint": spec.fingerprint(),
        "generation": {
            "model": spec.model.label,
            "engine": spec.model.engine,
            "method": spec.method.model_dump(mode="json"),
            "sampling": spec.sampling.model_dump(mode="json"),
            "dedup": spec.dedup.model_dump(mode="json"),
            "seed": spec.seed,
        },
        "headline": {
            "records": final.height,
            "target_size": spec.target_size,
            "semantic_diversity_before": before["semantic_diversity"],
            "semantic_diversity_after": after["semantic_diversity"],
            "distinct_2_before": before["distinct_2"],
            "distinct_2_after": after["distinct_2"],
            "rejects": int(rejects.height),
            "short_cells": len(short),
            "parse_failure_rate": failed_calls / completions if completions else 0.0,
        },
        "counts": {str(k): int(v) for k, v in counts.items()},
        "diversity": {"before": before, "after": after},
        "attributes": attributes,
        "rejects": {"total": int(rejects.height), "by_reason": reject_groups},
        "short_cells": short,
        "rebalance": {
            "targets": spec.rebalance.targets,
            "surplus": spec.rebalance.surplus,
            "rounds": list(rounds or []),
            "stop_reason": stop_reason,
            "cells": int(cells.height),
            "cells_on_target": int(cells.filter(pl.col("deficit") == 0).height) if "deficit" in cells.columns else 0,
            "marginals": marginals.to_dicts() if marginals is not None else [],
        },
        "usage": dict(usage),
        "plots": plots,
    }
    report = jsonable(report)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    return report


# ---- computations -------------------------------------------------------------------------------------------------


def _diversity(frame: pl.DataFrame, embeddings: np.ndarray, label: str, seed: int) -> dict[str, Any]:
    if "text" not in frame.columns:
        raise ValueError(f"the {label} records frame has no 'text' column (columns: {frame.columns})")
    embeddings = np.asarray(embeddings)
    if frame.height and (embeddings.ndim != 2 or embeddings.shape[0] != frame.height):
        # Misaligned rows would silently measure the wrong records.
        raise ValueError(f"{label}: {frame.height} records but embeddings of shape {embeddings.shape}")
    texts = [t or "" for t in frame["text"].to_list()]
    has_rows = embeddings.ndim == 2 and embeddings.shape[0] > 0
    return {
        "rows": frame.height,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "semantic_diversity": semantic_diversity(embeddings, seed=seed) if has_rows else 0.0,
        "mean_pairwise_similarity": mean_pairwise_similarity(embeddings, seed=seed) if has_rows else 0.0,
    }


def _column(frame: pl.DataFrame, name: str, label: str) -> list[str | None]:
    if name not in frame.columns:
        raise ValueError(f"the {label} records frame has no column for attribute '{name}' (columns: {frame.columns})")
    return frame[name].cast(pl.String).to_list()


def _target_counts(attr: Attribute, cells: pl.DataFrame, target_size: int) -> dict[str, int]:
    """Exact target counts per value: the rebalance cells' targets summed (prompt attributes), else the marginal."""
    if attr.name in cells.columns and "target" in cells.columns and cells.height:
        sums = cells.group_by(attr.name).agg(pl.col("target").sum())
        by_value = dict(zip(sums[attr.name].to_list(), sums["target"].to_list(), strict=True))
        return {v: int(by_value.get(v) or 0) for v in attr.values}
    weights = attr.weights or [1.0] * len(attr.values)
    return dict(zip(attr.values, largest_remainder(target_size, weights), strict=True))


def _reject_groups(rejects: pl.DataFrame) -> list[dict[str, Any]]:
    if rejects.height == 0:
        return []
    grouped = (
        rejects.group_by("stage", "reason", maintain_order=True)
        .agg(
            pl.len().alias("count"),
            pl.col("detail").drop_nulls().unique(maintain_order=True).head(REJECT_EXAMPLES).alias("examples"),
        )
        .sort(["count", "stage", "reason"], descending=[True, False, False])
    )
    return [
        {
            "stage": row["stage"],
            "reason": row["reason"],
            "count": int(row["count"]),
            "examples": [clip(d, EXAMPLE_CHARS) for d in row["examples"]],
        }
        for row in grouped.iter_rows(named=True)
    ]


def _short_cells(cells: pl.DataFrame) -> list[dict[str, Any]]:
    if cells.height == 0 or "deficit" not in cells.columns:
        return []
    wanted = [c for c in ("cell_key", "target", "available", "kept", "deficit", "reason") if c in cells.columns]
    short = cells.filter(pl.col("deficit") > 0).sort(["deficit", "cell_key"], descending=[True, False])
    return short.select(wanted).to_dicts()






# ---- plots --------------------------------------------------------------------------------------------------------


def _plot_attribute(name: str, entry: dict[str, Any], plots_dir: Path) -> str:
    """Grouped bars: target share vs final share per value (plus the off-target share when there is one)."""
    after = entry["after"]
    labels = list(after["target_share"])
    target = [after["target_share"][v] for v in labels]
    final = [after["observed_share"][v] for v in labels]
    if after["other"]:
        labels.append("(other)")
        target.append(0.0)
        final.append(after["other_share"])

    # Figure + Agg canvas directly: no pyplot global state, safe in worker threads and without a display.
    width = max(6.0, 0.9 * len(labels) + 2.0)
    fig = Figure(figsize=(width, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(labels))
    bar = 0.4
    target_bars = ax.bar(x - bar / 2, target, bar, label="target", color="#9aa5b1")
    final_bars = ax.bar(x + bar / 2, final, bar, label=f"final (n={after['n']})", color="#2f6f9f")
    for bars in (target_bars, final_bars):
        ax.bar_label(bars, labels=[f"{v:.0%}" if v else "" for v in bars.datavalues], fontsize=7, padding=1)
    long_labels = len(labels) > 6 or max((len(label) for label in labels), default=0) > 10
    ax.set_xticks(x, labels, rotation=30 if long_labels else 0, ha="right" if long_labels else "center")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylim(0, max([*target, *final, 0.01]) * 1.18)
    ax.set_ylabel("share of records")
    ax.set_xlabel(name)
    ax.set_title(f"{name}: target vs final share")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)

    plots_dir.mkdir(parents=True, exist_ok=True)
    relative = f"plots/attribute_{name}.png"
    fig.savefig(plots_dir / f"attribute_{name}.png", dpi=120)
    return relative


# ---- markdown -----------------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown; image links are relative to the folder holding report.md."""
    lines = [f"# Diversity report: {report['dataset']}", ""]
    gen = report["generation"]
    lines += [
        f"Run `{report['run_id']}`: {report['headline']['records']} records (target {report['headline']['target_size']}),"
        f" model `{gen['model']}` on {gen['engine']}, method `{gen['method']['name']}`;"
        f" {report['headline']['parse_failure_rate']:.1%} of calls gave an answer that could not be parsed.",
        "",
        "## Records after each stage",
        "",
        "| stage | records | vs previous stage |",
        "|---|---:|---:|",
    ]
    previous: int | None = None
    for stage, count in report["counts"].items():
        change = f"{count / previous:.0%}" if previous else ""
        lines.append(f"| {md_cell(stage)} | {count} | {change} |")
        previous = count

    before, after = report["diversity"]["before"], report["diversity"]["after"]
    lines += ["", "## Diversity", "", "| metric | validated | final |", "|---|---:|---:|"]
    lines.append(f"| records | {before['rows']} | {after['rows']} |")
    for key, label, digits in (
        ("semantic_diversity", "semantic diversity (0-100, higher is more diverse)", 1),
        ("mean_pairwise_similarity", "mean pairwise cosine similarity", 3),
        ("distinct_1", "distinct-1", 3),
        ("distinct_2", "distinct-2", 3),
    ):
        lines.append(f"| {label} | {before[key]:.{digits}f} | {after[key]:.{digits}f} |")

    for name, entry in report["attributes"].items():
        b, a = entry["before"], entry["after"]
        lines += [
            "",
            f"## Attribute `{name}` ({entry['source']})",
            "",
            "| value | target share | target count | validated | before rebalancing | final | final share |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        p = entry.get("before_rebalance", b)
        for value, share in a["target_share"].items():
            lines.append(
                f"| {md_cell(value)} | {share:.1%} | {entry['target_counts'].get(value, 0)} | {b['counts'][value]}"
                f" | {p['counts'][value]} | {a['counts'][value]} | {a['observed_share'][value]:.1%} |"
            )
        if a["other"] or b["other"] or p["other"]:
            lines.append(
                f"| (other) | 0.0% | 0 | {b['other']} | {p['other']} | {a['other']} | {a['other_share']:.1%} |"
            )
        kl = "infinite (mass where the target is 0)" if a["kl_infinite"] else _num(a["kl_bits"])
        lines += [
            "",
            f"Final: entropy {_num(a['entropy_bits'])} bits (normalised {_num(a['normalized_entropy'])}),"
            f" KL to target {kl} bits, total variation {_num(a['total_variation'])},"
            f" coverage {a['coverage']:.0%}.",
        ]
        if a["other_examples"]:
            seen = ", ".join(
                f"{'(missing)' if e['value'] is None else md_cell(e['value'])} ({e['count']})" for e in a["other_examples"]
            )
            lines.append(f"Off-target values in the final set: {seen}.")
        if name in report["plots"]:
            lines += ["", f"![{name}: target vs final share]({report['plots'][name]})"]

    lines += ["", "## Rejects", ""]
    groups = report["rejects"]["by_reason"]
    if groups:
        lines += [f"{report['rejects']['total']} rejected in all.", "", "| stage | reason | count | example |", "|---|---|---:|---|"]
        for g in groups:
            example = md_cell(g["examples"][0], 120) if g["examples"] else ""
            lines.append(f"| {md_cell(g['stage'])} | {md_cell(g['reason'])} | {g['count']} | {example} |")
    else:
        lines.append("None.")

    rb = report.get("rebalance") or {}
    if rb.get("rounds"):
        lines += [
            "",
            "## Rebalancing",
            "",
            f"Targets: {rb['targets']}; surplus cut by {rb['surplus'].replace('_', ' ')}. "
            f"{rb['cells_on_target']} of {rb['cells']} cells on target. {(rb.get('stop_reason') or '').capitalize()}.",
            "",
            "| round | cells asked | prompts | completions | generated tokens | unique valid | final | cells short | missing |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rb["rounds"]:
            lines.append(
                f"| {r['round']} | {r['cells']} | {r['prompts']} | {r['completions']} | {r['generated_tokens']:,}"
                f" | {r['unique_valid']} | {r['final']} | {r['short_cells']} | {r['missing']} |"
            )
        short_marginals = [m for m in rb.get("marginals", []) if m["deficit"]]
        if short_marginals:
            lines += ["", "| attribute | value | target | available | kept | deficit |", "|---|---|---:|---:|---:|---:|"]
            lines += [
                f"| {md_cell(m['attribute'])} | {md_cell(m['value'])} | {m['target']} | {m['available']} | {m['kept']}"
                f" | {m['deficit']} |"
                for m in short_marginals
            ]

    lines += ["", "## Cells short of target", ""]
    if report["short_cells"]:
        lines += ["| cell | target | available | kept | deficit | reason |", "|---|---:|---:|---:|---:|---|"]
        for c in report["short_cells"]:
            lines.append(
                f"| {md_cell(c.get('cell_key'))} | {c.get('target', '')} | {c.get('available', '')} | {c.get('kept', '')}"
                f" | {c.get('deficit', '')} | {md_cell(c.get('reason'))} |"
            )
    else:
        lines.append("None: every cell met its target.")

    if report["usage"]:
        lines += ["", "## Usage", "", "| measure | value |", "|---|---:|"]
        lines += [f"| {md_cell(k)} | {_num(v)} |" for k, v in report["usage"].items()]
    return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return md_cell(str(value))
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"

