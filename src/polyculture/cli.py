"""polyculture command line: build diverse synthetic datasets from a YAML build spec."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

# Offline by design, and Prefect quiet and local unless the user configured otherwise.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)

app = typer.Typer(
    name="polyculture",
    help="Build diverse synthetic datasets with language models: Verbalized Sampling, embedding dedup, "
    "exact attribute targets, JSON Schema validation and a diversity report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="Build spec (YAML); see schemas/build-spec.schema.json.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(spec_path: Path) -> Any:
    from polyculture.spec import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as exc:
        _fail(str(exc))


def _check_models(spec: Any) -> None:
    """Resolve both models before any long work, so a missing model fails in seconds, not after minutes."""
    from polyculture.engines.models import (
        ModelUnavailable,
        resolve_chat_model,
        resolve_embedding_model,
    )

    try:
        if spec.model.engine != "openai":  # a server's model id is checked by the engine against the server
            resolve_chat_model(spec.model.name, spec.base_dir)
        resolve_embedding_model(spec.dedup.embedding_model, spec.base_dir)
    except ModelUnavailable as exc:
        _fail(str(exc), 3)


class _RichReporter:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, note: str) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=max(total, 1), note=note)
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1), note=note)


@app.command()
def build(
    spec_path: SpecArg,
    run_id: Annotated[str | None, typer.Option(help="Run folder name; reuse one to resume an interrupted build.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Root for run folders (default: the spec's publish.dir).")] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Run the whole pipeline for SPEC and print where the dataset and its report are."""
    from polyculture import progress
    from polyculture.engines.base import EngineError

    spec = _load(spec_path)
    _check_models(spec)
    from polyculture.flows.build_dataset import build_dataset

    columns = [SpinnerColumn(), TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
    bar = Progress(*columns, console=err, disable=quiet, transient=False)
    try:
        with bar, progress.reporting(_RichReporter(bar)):
            result = build_dataset(str(spec_path), run_id=run_id, output_root=str(output_dir) if output_dir else None)
    except EngineError as exc:
        _fail(str(exc), 3)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"{spec.name}: {result['records']} records (target {result['target_size']})", show_header=False)
    for stage, count in result["counts"].items():
        table.add_row(stage, str(count))
    usage = result["usage"]
    table.add_row("tokens/s", f"{usage['generated_tokens_per_second']}")
    table.add_row("wall time", f"{usage['wall_seconds']:.0f} s")
    Console().print(table)
    Console().print(f"dataset: {result['dataset_dir']}\nreport:  {result['report_md']}\n         {result['report_json']}")


@app.command("compare-methods")
def compare_methods_command(
    spec_path: SpecArg,
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated methods to compare (each replaces the spec's method.name)."),
    ] = "direct,cot,sequence,multi_turn,vs_standard,vs_cot,vs_multi",
    budget_tokens: Annotated[
        int, typer.Option(min=1, help="Generated tokens each method may spend (it stops at the first round reaching it).")
    ] = 2000,
    output_dir: Annotated[Path | None, typer.Option(help="Root for run folders (default: the spec's publish.dir).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Run id (folder compare-<run-id>); reuse one to resume.")] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Run several prompting methods on SPEC with the same generated-token budget and compare their diversity,
    validity, answer coverage and calibration (comparison.json, comparison.md and a chart)."""
    from polyculture import progress
    from polyculture.engines.base import EngineError
    from polyculture.spec import SpecError
    from polyculture.stages.compare import format_value, parse_methods, summary_columns

    spec = _load(spec_path)
    try:
        names = parse_methods(methods)
    except SpecError as exc:
        _fail(str(exc))
    _check_models(spec)
    from polyculture.flows.compare_methods import compare_methods

    columns = [SpinnerColumn(), TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
    bar = Progress(*columns, console=err, disable=quiet, transient=False)
    try:
        with bar, progress.reporting(_RichReporter(bar)):
            report = compare_methods(
                str(spec_path),
                methods=names,
                budget_tokens=budget_tokens,
                run_id=run_id,
                output_root=str(output_dir) if output_dir else None,
            )
    except (EngineError, SpecError) as exc:
        _fail(str(exc), 3 if isinstance(exc, EngineError) else 2)
    ok = [r for r in report["methods"] if r.get("status") == "ok"]
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        table = Table(
            title=f"{spec.name}: {report['budget_tokens']:,} generated tokens per method ({spec.model.name}, "
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


@app.command()
def check(spec_path: SpecArg, as_json: JsonOpt = False) -> None:
    """Validate SPEC and show the plan (cells, quotas, prompts) without generating anything."""
    from polyculture.stages.plan import plan

    spec = _load(spec_path)
    cells = plan(spec)
    summary = {
        "name": spec.name,
        "target_size": spec.target_size,
        "cells": cells.height,
        "prompts": int(cells["n_prompts"].sum()),
        "samples_per_prompt": spec.sampling.n,
        "method": spec.method.name,
        "model": spec.model.name,
        "engine": spec.model.engine,
    }
    if as_json:
        sys.stdout.write(json.dumps(summary | {"plan": cells.to_dicts()}, indent=2) + "\n")
        return
    Console().print(summary)
    Console().print(cells)


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of build specs (the file in schemas/ is generated by this)."""
    from polyculture.spec import build_spec_json_schema

    text = json.dumps(build_spec_json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the embedded models (usable offline by name)."""
    from polyculture.engines.models import (
        EMBEDDED_CHAT_MODELS,
        EMBEDDED_EMBEDDING_MODELS,
    )

    listing = {"chat": EMBEDDED_CHAT_MODELS, "embedding": EMBEDDED_EMBEDDING_MODELS}
    if as_json:
        sys.stdout.write(json.dumps(listing, indent=2) + "\n")
        return
    for kind, names in listing.items():
        for name, what in names.items():
            Console().print(f"[bold]{name}[/] ({kind}): {what}")


if __name__ == "__main__":
    app()
