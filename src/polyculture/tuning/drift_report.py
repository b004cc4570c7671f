"""The drift report of a generations loop: report.json, report.md, report.html and one plot per figure (each figure
over generations, one line per arm), plus a summary table (generation 0 vs the last generation, per arm)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from polyculture.runs.files import jsonable, write_text_atomic

# (key in metrics.json, label) of the figures plotted and tabulated, in report order.
FIGURES: tuple[tuple[str, str], ...] = (
    ("correctness", "correctness (weakest check's pass rate)"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("compression_ratio", "gzip compression ratio (lower is more diverse)"),
    ("semantic_diversity", "semantic diversity (0-100)"),
    ("vendi_score", "Vendi score"),
    ("attribute_entropy", "attribute normalised entropy (mean)"),
    ("attribute_coverage", "attribute coverage (mean)"),
    ("tail_value_coverage", "tail coverage: gen-0 rare values present"),
    ("tail_ngram_coverage", "tail coverage: gen-0 rare n-grams present"),
    ("unique_answers", "unique answers"),
)


PROBE_PREFIX = "probe_"  # figures keys of the model probe's families (tuning.generations.probe_key)


def figure_list(arms: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """FIGURES, then the model-probe figures the loop measured (one per probed family)."""
    probed = sorted({k for gens in arms.values() for g in gens for k in g["figures"] if k.startswith(PROBE_PREFIX)})
    return [*FIGURES, *[(k, f"model: {k[len(PROBE_PREFIX):]} normalised entropy (exact)") for k in probed]]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _ratio(a: Any, b: Any) -> float | None:
    return b / a if isinstance(a, int | float) and isinstance(b, int | float) and a else None


def summary_rows(
    arms: dict[str, list[dict[str, Any]]], replicates: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Per arm and figure: generation 0, the last generation, and last / first (None where undefined); with a
    replicate (generation 0 again, next seed), its value and replicate / generation 0: the noise floor."""
    rows = []
    figures = figure_list(arms)
    for arm, gens in arms.items():
        first, last = gens[0]["figures"], gens[-1]["figures"]
        again = ((replicates or {}).get(arm) or {}).get("figures") or {}
        for key, label in figures:
            a, b, r = first.get(key), last.get(key), again.get(key)
            rows.append({"arm": arm, "figure": key, "label": label, "gen_0": a, "last": b, "ratio": _ratio(a, b),
                         "replicate": r, "replicate_ratio": _ratio(a, r)})  # fmt: skip
    return rows


def plot_figures(
    arms: dict[str, list[dict[str, Any]]], plots_dir: Path, replicates: dict[str, dict[str, Any]] | None = None
) -> dict[str, str]:
    """One PNG per figure (a replicate is a hollow marker at generation 0 in its arm's colour); returns figure key ->
    path relative to the report's folder."""
    from polyculture.report.plots import _figure, _save

    out = {}
    for key, label in figure_list(arms):
        fig = _figure(5.0, 3.2)
        ax = fig.add_subplot(1, 1, 1)
        drawn = False
        for arm, gens in arms.items():
            points = [(g["generation"], g["figures"].get(key)) for g in gens if g["figures"].get(key) is not None]
            if points:
                (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm)
                drawn = True
                again = (((replicates or {}).get(arm) or {}).get("figures") or {}).get(key)
                if again is not None:
                    ax.plot([0], [again], marker="o", markerfacecolor="none", color=line.get_color(), linestyle="")
        if not drawn:
            continue
        ax.set_xlabel("generation")
        ax.set_title(label, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        out[key] = _save(fig, plots_dir, f"drift-{key}.png")
    return out


def write_drift_report(
    folder: Path,
    loop: dict[str, Any],
    arms: dict[str, list[dict[str, Any]]],
    replicates: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """`arms`: arm -> [{generation, figures, ...}] in generation order; `replicates`: arm -> generation 0 built
    again with the next seed ({figures, ...})."""
    folder.mkdir(parents=True, exist_ok=True)
    replicates = replicates or {}
    plots = plot_figures(arms, folder / "plots", replicates)
    summary = summary_rows(arms, replicates)
    payload = {"loop": loop, "arms": arms, "replicates": replicates, "summary": summary, "plots": plots}
    write_text_atomic(folder / "report.json", json.dumps(jsonable(payload), indent=2) + "\n")
    write_text_atomic(folder / "report.md", _markdown(loop, arms, summary, plots))
    write_text_atomic(folder / "report.html", _html(loop, summary, plots, folder))
    return {"json": folder / "report.json", "md": folder / "report.md", "html": folder / "report.html"}


def combine_reports(loop_folders: list[Path], folder: Path) -> dict[str, Path]:
    """One drift report over several finished loops (e.g. the same arms under replace and under accumulate): each
    line is an arm of one loop, labelled "<arm> (<regime>)" (plus the loop's name when two loops share a regime)."""
    loops = []
    for loop_folder in loop_folders:
        path = Path(loop_folder) / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{loop_folder}: no report.json (is it a finished loop's folder?)")
        loops.append(json.loads(path.read_text(encoding="utf-8")))
    regimes = [loop["loop"]["regime"] for loop in loops]
    arms: dict[str, list[dict[str, Any]]] = {}
    replicates: dict[str, dict[str, Any]] = {}
    for loop, regime in zip(loops, regimes, strict=True):
        tag = regime if regimes.count(regime) == 1 else f"{regime}, {loop['loop']['name']}"
        for arm, gens in loop["arms"].items():
            arms[f"{arm} ({tag})"] = gens
            if arm in (loop.get("replicates") or {}):
                replicates[f"{arm} ({tag})"] = loop["replicates"][arm]
    combined = {"name": " + ".join(loop["loop"]["name"] for loop in loops), "regime": " + ".join(regimes),
                "generations": max(loop["loop"]["generations"] for loop in loops),
                "loops": [str(f) for f in loop_folders]}  # fmt: skip
    return write_drift_report(folder, combined, arms, replicates)


def _markdown(loop: dict[str, Any], arms: dict[str, list[dict[str, Any]]], summary: list[dict[str, Any]],
              plots: dict[str, str]) -> str:  # fmt: skip
    lines = [
        f"# Drift report: {loop['name']}",
        "",
        f"Regime **{loop['regime']}**, {loop['generations']} generation(s) after the base model, arms: "
        f"{', '.join(arms)}. Figures are measured on each generation's published records.",
        "",
        "## Summary (generation 0 vs the last generation)",
        "",
        "gen 0 again: generation 0 built a second time with the next seed; its ratio to gen 0 is the sampling noise a "
        "drift has to exceed to mean anything.",
        "",
        "| arm | figure | gen 0 | last | last / gen 0 | gen 0 again / gen 0 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['arm']} | {r['label']} | {_fmt(r['gen_0'])} | {_fmt(r['last'])} | {_fmt(r['ratio'])} | "
              f"{_fmt(r['replicate_ratio'])} |" for r in summary]  # fmt: skip
    lines += ["", "## Per generation", ""]
    figures = figure_list(arms)
    header = ["arm", "gen", "records", *[k for k, _ in figures], "build s", "tune s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, gens in arms.items():
        for g in gens:
            f = g["figures"]
            cells = [arm, str(g["generation"]), _fmt(f.get("records")), *[_fmt(f.get(k)) for k, _ in figures],
                     _fmt(f.get("build_seconds")), _fmt((g.get("tuning") or {}).get("seconds"))]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""] + [f"![{k}]({p})" for k, p in plots.items()]
    return "\n".join(lines) + "\n"


def _html(loop: dict[str, Any], summary: list[dict[str, Any]], plots: dict[str, str], folder: Path) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(r['arm'])}</td><td>{html.escape(r['label'])}</td><td>{_fmt(r['gen_0'])}</td>"
        f"<td>{_fmt(r['last'])}</td><td>{_fmt(r['ratio'])}</td><td>{_fmt(r['replicate_ratio'])}</td></tr>"
        for r in summary
    )
    images = "".join(  # inlined, so the page reads offline on its own
        f'<img alt="{k}" src="data:image/png;base64,{base64.b64encode((folder / p).read_bytes()).decode()}">'
        for k, p in plots.items()
    )
    title = html.escape(f"Drift report: {loop['name']} ({loop['regime']})")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body><h1>{title}</h1>"
        "<table border='1'><tr><th>arm</th><th>figure</th><th>gen 0</th><th>last</th><th>last / gen 0</th>"
        "<th>gen 0 again / gen 0</th></tr>"
        f"{rows}</table><div>{images}</div></body></html>\n"
    )
