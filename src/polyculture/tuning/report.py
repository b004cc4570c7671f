"""Probe tables and the tuning report (tune.json, tune.md, tune.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from polyculture.report.format import md_cell
from polyculture.runs.files import jsonable, write_text_atomic


def headline(probe: dict[str, Any]) -> dict[str, Any]:
    """The few figures a person compares: one flat row per family."""
    exact, sampled = probe["exact"], probe.get("sampled") or {}
    return {
        "family": probe["family"],
        "options": probe["options"],
        "exact_normalized_entropy": exact["normalized_entropy"],
        "exact_top_option": exact["top_option"],
        "exact_top_share": exact["top_share"],
        "exact_kl_bits": exact["kl_bits"],
        "valid_mass": exact["valid_mass"],
        "sampled_normalized_entropy": sampled.get("normalized_entropy"),
        "sampled_coverage_count": sampled.get("pooled_coverage_count"),
        "sampled_invalid_rate": sampled.get("pooled_invalid_rate"),
    }


def fmt(value: Any, spec: str = ".3f") -> str:
    """A figure for a table cell; "-" where there is none (e.g. no samples were drawn)."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def probe_markdown(probes: list[dict[str, Any]]) -> str:
    lines = [
        "| family | options | normalised entropy (exact) | top option (exact) | KL to target, bits | valid mass "
        "| normalised entropy (sampled) | coverage (sampled) | invalid (sampled) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for probe in probes:
        h = headline(probe)
        lines.append(
            f"| {md_cell(h['family'])} | {h['options']} | {fmt(h['exact_normalized_entropy'])} "
            f"| {md_cell(h['exact_top_option'], 24)} ({fmt(h['exact_top_share'], '.0%')}) | {fmt(h['exact_kl_bits'])} "
            f"| {fmt(h['valid_mass'], '.2e')} | {fmt(h['sampled_normalized_entropy'])} "
            f"| {fmt(h['sampled_coverage_count'])}/{h['options']} | {fmt(h['sampled_invalid_rate'], '.0%')} |"
        )
    return "\n".join(lines) + "\n"


def before_after_rows(before: dict[str, dict], after: dict[str, dict], roles: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for name, probe in before.items():
        b, a = headline(probe), headline(after[name])
        rows.append({"family": name, "role": roles[name], "before": b, "after": a})
    return rows


def write_tune_report(run_dir: Path, result: dict[str, Any]) -> dict[str, Path]:
    """tune.json (everything), tune.md (before/after table) and tune.png (loss curve, entropy before/after)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "tune.json", "md": run_dir / "tune.md", "plot": run_dir / "tune.png"}
    write_text_atomic(paths["json"], json.dumps(jsonable(result), indent=2) + "\n")
    write_text_atomic(paths["md"], _markdown(result))
    _plot(result, paths["plot"])
    return paths


def _markdown(result: dict[str, Any]) -> str:
    train = result["training"]
    out = [
        f"# Diffuse fine-tuning: {md_cell(result['name'])}",
        "",
        f"- Base model: `{result['base_model']}`; adapter: `{result['adapter_dir']}`",
        f"- Trained on: {', '.join(result['families'])}",
        f"- Held out: {', '.join(result['held_out']) or '(none)'}",
        f"- Steps: {train['steps']} in {train['seconds']:.0f} s ({train['stop_reason']}); "
        f"learning rate {result['config']['training']['learning_rate']}, LoRA r={result['config']['lora']['r']}",
        "",
        "## Before and after",
        "",
        "Exact figures come from the sequence log-probabilities of every whole answer (renormalised over the valid "
        "answers, mean over phrasings); sampled ones from "
        f"{result['config']['probe']['samples']} samples per phrasing at temperature "
        f"{result['config']['probe']['temperature']}.",
        "",
        "| family | role | normalised entropy (exact) | top option (exact) | coverage (sampled) | invalid (sampled) "
        "| final loss / H(w) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in result["before_after"]:
        b, a = row["before"], row["after"]
        ratio = train["final_ratio"].get(row["family"])
        out.append(
            f"| {md_cell(row['family'])} | {row['role']} "
            f"| {fmt(b['exact_normalized_entropy'])} -> {fmt(a['exact_normalized_entropy'])} "
            f"| {md_cell(b['exact_top_option'], 16)} {fmt(b['exact_top_share'], '.0%')} -> "
            f"{md_cell(a['exact_top_option'], 16)} {fmt(a['exact_top_share'], '.0%')} "
            f"| {fmt(b['sampled_coverage_count'])} -> {fmt(a['sampled_coverage_count'])} of {b['options']} "
            f"| {fmt(b['sampled_invalid_rate'], '.0%')} -> {fmt(a['sampled_invalid_rate'], '.0%')} "
            f"| {fmt(ratio)} |"
        )
    out += ["", "![loss and entropy](tune.png)", ""]
    return "\n".join(out)


def _plot(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, entropy_ax = fig.subplots(1, 2, width_ratios=[1, 1.4])
    history = result["training"]["history"]
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        for family, ratio in row["loss_ratio"].items():
            xs, ys = series.setdefault(family, ([], []))
            xs.append(row["step"])
            ys.append(ratio)
    for family, (xs, ys) in sorted(series.items()):
        loss_ax.plot(xs, ys, marker=".", linewidth=1, label=family)
    loss_ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    loss_ax.set(xlabel="step", ylabel="loss / H(w)  (1 = optimum)", title="Diffuse loss per family")
    loss_ax.set_yscale("log")
    if series:
        loss_ax.legend(fontsize=7, ncol=2)
    rows = result["before_after"]
    names = [r["family"] + (" (held out)" if r["role"] == "held out" else "") for r in rows]
    xs = range(len(rows))
    before = [r["before"]["exact_normalized_entropy"] for r in rows]
    after = [r["after"]["exact_normalized_entropy"] for r in rows]
    entropy_ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="#bbbbbb")
    entropy_ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after", color="#2a7ab0")
    entropy_ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
    entropy_ax.set(ylim=(0, 1.05), ylabel="normalised entropy (exact)", title="Normalised entropy before and after")
    entropy_ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def leave_one_out_markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "# Leave one family out",
        "",
        "| held-out family | normalised entropy (exact) | coverage (sampled) | invalid (sampled) | run |",
        "|---|---:|---:|---:|---|",
    ]
    for run in runs:
        b, a = run["before"], run["after"]
        lines.append(
            f"| {md_cell(run['held_out'])} "
            f"| {fmt(b['exact_normalized_entropy'])} -> {fmt(a['exact_normalized_entropy'])} "
            f"| {fmt(b['sampled_coverage_count'])} -> {fmt(a['sampled_coverage_count'])} of {b['options']} "
            f"| {fmt(b['sampled_invalid_rate'], '.0%')} -> {fmt(a['sampled_invalid_rate'], '.0%')} | {run['run_dir']} |"
        )
    return "\n".join(lines) + "\n"
