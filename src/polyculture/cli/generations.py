"""The generations command: the self-consuming loop (build, tune on the build, build again) and its drift report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from polyculture.cli.display import RichReporter, progress_bar, stdout, write_json
from polyculture.cli.errors import fail
from polyculture.cli.options import JsonOpt, QuietOpt


def generations(
    config_path: Annotated[
        Path | None, typer.Argument(help="Loop config (YAML), e.g. configs/generations/logic.yaml.")
    ] = None,
    schema: Annotated[bool, typer.Option("--schema", help="Print the JSON Schema of loop configs and exit.")] = False,
    schema_output: Annotated[
        Path | None, typer.Option("--schema-output", help="With --schema: write it to this file.")
    ] = None,
    combine: Annotated[
        list[Path] | None,
        typer.Option(
            "--combine",
            help="A finished loop's folder (<output_dir>/<name>); repeat it: one drift report over several loops "
            "(e.g. replace vs accumulate), one line per arm and regime. Needs --output.",
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="With --combine: the report's folder.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Self-consuming generations: per arm, build with the base model (generation 0), LoRA-tune the next model on
    the build's records (by regime: replace, accumulate, fresh), build again with it, G times; then a drift report of
    every figure over generations. A re-run resumes at the first unfinished step."""
    from polyculture.tuning.generations_config import generations_json_schema, load_generations_config

    if schema:
        text = json.dumps(generations_json_schema(), indent=2) + "\n"
        if schema_output is None:
            sys.stdout.write(text)
        else:
            schema_output.write_text(text)
        return
    if combine:
        from polyculture.tuning.drift_report import combine_reports

        if output is None:
            fail("--combine needs --output (the combined report's folder)")
        try:
            paths = combine_reports(combine, output)
        except FileNotFoundError as exc:
            fail(str(exc))
        if as_json:
            write_json({k: str(v) for k, v in paths.items()})
        else:
            stdout().print(f"report: {paths['html']}")
        return
    if config_path is None:
        fail("give a loop config (YAML), --combine or --schema")
    from polyculture import progress

    config, specs = load_generations_config(config_path)  # refuse a bad config before any model time
    from polyculture.tuning.generations import check_loop_identity, loop_identity

    check_loop_identity((Path(config.output_dir) / config.name).absolute(), loop_identity(config, specs))
    from polyculture.flows.generations import generations as run_loop

    bar = progress_bar(quiet, label_width=14)
    with bar, progress.reporting(RichReporter(bar)):
        result = run_loop(str(config_path))
    if as_json:
        write_json({k: v for k, v in result.items() if k != "arms"} | {"arms": result["arms"]})
        return
    table = Table(title=f"{config.name}: {config.regime}, {config.generations} generation(s)")
    for column in ("arm", "gen", "records", "correctness", "semantic div.", "Vendi", "tail n-grams", "unique"):
        table.add_column(column)
    for arm, gens in result["arms"].items():
        for g in gens:
            f = g["figures"]
            cells = [f.get(k) for k in ("records", "correctness", "semantic_diversity", "vendi_score",
                                        "tail_ngram_coverage", "unique_answers")]  # fmt: skip
            table.add_row(arm, str(g["generation"]), *["-" if c is None else f"{c:.3g}" for c in cells])
    stdout().print(table)
    stdout().print(f"report: {result['html']}")
