"""compare.render: the comparison written as comparison.json, comparison.md (a table per figure) and comparison.png."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from polyculture.report.format import md_cell
from polyculture.runs.files import write_text_atomic


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
        Column("salvaged", "salvaged", lambda r: r["counts"].get("salvaged", 0), "{:,}",
               "valid records read from answers cut short"),
        Column("unique", "unique valid", lambda r: r["counts"]["unique_valid"], "{:,}"),
        Column(
            "unique_per_1k", "unique valid / 1k tok", lambda r: r["unique_valid_per_1k_tokens"], "{:.1f}", tags=("chart",)
        ),
        *_quality_columns(report),
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


def _quality_columns(report: dict[str, Any]) -> list[Column]:
    """With quality checks: each check's pass rate, the records passing every check, and the unique ones among them
    per 1k generated tokens (beside unique valid / 1k tok: the quality-diversity trade-off)."""
    checks = report.get("quality_checks") or []
    if not checks:
        return []
    columns = [
        Column(f"quality.{c['name']}", f"{c['name']}: pass rate", lambda r, n=c["name"]: r["quality"][n]["pass_rate"],
               "{:.0%}", f"{c['name']}: {_check_cut(c)}")  # fmt: skip
        for c in checks
    ]
    return columns + [
        Column("passing", "passing records", lambda r: r["counts"]["passing"], "{:,}", "valid records passing every check"),
        Column("unique_passing_per_1k", "unique valid passing / 1k tok",
               lambda r: r["unique_valid_passing_per_1k_tokens"], "{:.1f}", tags=("chart",)),  # fmt: skip
    ]


def _check_cut(check: dict[str, Any]) -> str:
    if check.get("quantile") is not None and check.get("threshold") is None:
        return f"{check['kind']}, quantile {check['quantile']:g} (nothing scored)"
    if check.get("quantile") is not None:
        return f"{check['kind']}, quantile {check['quantile']:g} of all methods' scores = {check['threshold']:.3f}"
    if check.get("threshold") is not None:
        return f"{check['kind']}, score >= {check['threshold']:g}"
    return f"{check['kind']}, its own verdict"


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
