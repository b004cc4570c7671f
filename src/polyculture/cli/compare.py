"""compare-methods: several prompting methods on one spec under one generated-token budget, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from polyculture.cli.display import RichReporter, progress_bar, write_json
from polyculture.cli.options import JsonOpt, QuietOpt, SpecArg


def compare_methods(
    spec_path: SpecArg,
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated methods to compare (each replaces the spec's method.name)."),
    ] = "direct,cot,sequence,multi_turn,vs_standard,vs_cot,vs_multi",
    budget_tokens: Annotated[
        int,
        typer.Option(min=1, help="Generated tokens each method may spend (it stops at the first round reaching it)."),
    ] = 2000,
    output_dir: Annotated[
        Path | None, typer.Option(help="Root for run folders (default: the spec's publish.dir).")
    ] = None,
    run_id: Annotated[str | None, typer.Option(help="Run id (folder compare-<run-id>); reuse one to resume.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run several prompting methods on SPEC with the same generated-token budget and compare their diversity,
    validity, answer coverage and calibration (comparison.json, comparison.md and a chart)."""
    from polyculture import progress
    from polyculture.compare.budget import parse_methods
    from polyculture.compare.render import format_value, summary_columns
    from polyculture.preflight import check_models, load_spec

    spec = load_spec(spec_path)
    names = parse_methods(methods)
    check_models(spec)
    from polyculture.compare.flow import compare_methods as run_comparison

    bar = progress_bar(quiet, label_width=18)
    with bar, progress.reporting(RichReporter(bar)):
        report = run_comparison(
            str(spec_path),
            methods=names,
            budget_tokens=budget_tokens,
            run_id=run_id,
            output_root=str(output_dir) if output_dir else None,
        )
    ok = [r for r in report["methods"] if r.get("status") == "ok"]
    if as_json:
        write_json(report, ensure_ascii=False)
    else:
        table = Table(
            title=f"{spec.name}: {report['budget_tokens']:,} generated tokens per method ({spec.model.label}, "
            f"{spec.model.engine})"
        )
        # One column per method, one row per figure: seven methods fit a terminal, twenty figures would not.
        table.add_column("figure")
        for result in ok:
            table.add_column(result["method"], justify="right", no_wrap=True)
        for column in summary_columns(report):
            table.add_row(column.label, *[format_value(column, result) for result in ok])
        console = Console()
        if not console.is_terminal:  # piped into a file: no 80-column squeeze (the table is only as wide as it needs)
            console = Console(width=200)
        console.print(table)
        for name, error in report["failed"].items():
            console.print(f"[yellow]{name} failed:[/] {error}", highlight=False, soft_wrap=True)
        files = report["files"]
        console.print(f"comparison: {files['markdown']}\n            {files['json']}\n            {files['chart']}")
    if not ok:
        raise typer.Exit(1)
