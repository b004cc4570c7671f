"""polyculture command line: build diverse synthetic datasets from a YAML build spec."""

from __future__ import annotations

import json
import os
import sys
import time
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


def _stdout() -> Console:
    # Piped or redirected output gets room for whole tables instead of rich's 80-column default.
    return Console() if sys.stdout.isatty() else Console(width=200)


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
    from polyculture.engines.model_files import (
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
    from polyculture.index.similarity import choose_index

    try:  # a GPU index asked for where FAISS has no GPU build fails now, not after generation
        choose_index(1, kind=spec.dedup.index, device=spec.dedup.device)
    except ValueError as exc:
        _fail(f"dedup.device: {exc}", 3)


def _progress_bar(quiet: bool, *, label_width: int, transient: bool = False) -> Progress:
    """The progress display every long command uses: stage label, bar, count, elapsed time, a note."""
    columns = [SpinnerColumn(), TextColumn(f"{{task.description:<{label_width}}}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
    return Progress(*columns, console=err, disable=quiet, transient=transient)


class _RichReporter:
    """Live bars on a terminal; elsewhere (a log file, CI) one plain line per stage start, end and every
    LOG_EVERY_S seconds, since a redirected live display only shows up when the command ends."""

    LOG_EVERY_S = 30.0

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.lines = not err.is_terminal and not progress.disable
        self.last_line: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int, note: str) -> None:
        if self.lines:
            self._line(stage, done, total, note)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=max(total, 1), note=note)
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1), note=note)

    def _line(self, stage: str, done: int, total: int, note: str) -> None:
        now = time.monotonic()
        first = stage not in self.last_line
        if first or done >= total or now - self.last_line[stage] >= self.LOG_EVERY_S:
            self.last_line[stage] = now
            err.print(f"{time.strftime('%H:%M:%S')} {stage}: {done}/{total} {note}".rstrip(), highlight=False)


@app.command()
def build(
    spec_path: SpecArg,
    run_id: Annotated[
        str | None,
        typer.Option(help="Run folder name (default: resume this spec's newest unfinished run, else a new one)."),
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Root for run folders (default: the spec's publish.dir).")
    ] = None,
    new_run: Annotated[
        bool, typer.Option("--new-run", help="Start a new run even when an unfinished run of this spec exists.")
    ] = False,
    runner: Annotated[
        str | None,
        typer.Option(help="Where generation shards run: threads, dask or ray (default: the spec's runner.kind)."),
    ] = None,
    runner_address: Annotated[
        str | None,
        typer.Option(help="An existing cluster: dask tcp://host:8786, ray ray://host:10001 or 'auto'."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Local cluster worker processes (dask/ray) or shard threads (threads).")
    ] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Run the whole pipeline for SPEC and print where the dataset and its report are.

    A build that died (crash, kill -9) resumes when the same command runs again: finished shards are reused,
    and each shard samples from its own seed, so the result equals an uninterrupted run (transformers, vllm).
    """
    from polyculture import progress
    from polyculture.engines.base import EngineError
    from polyculture.flows.runners import RunnerUnavailable
    from polyculture.hub.push import HubError
    from polyculture.runs.folders import RunBusy

    spec = _load(spec_path)
    _check_models(spec)
    runner_choice = _runner_choice(spec, runner, runner_address, workers)
    hub = spec.publish.hub
    if hub is not None and hub.push_on_build:
        from polyculture.hub.push import preflight

        try:  # a bad token or a repo we cannot write fails now, not after the generation
            preflight(hub)
        except HubError as exc:
            _fail(str(exc), exc.exit_code)
    from polyculture.flows.build_dataset import build_dataset

    bar = _progress_bar(quiet, label_width=10)
    try:
        with bar, progress.reporting(_RichReporter(bar)):
            result = build_dataset(
                str(spec_path),
                run_id=run_id,
                output_root=str(output_dir) if output_dir else None,
                resume=not new_run,
                runner=runner_choice,
            )
    except EngineError as exc:
        _fail(str(exc), 3)
    except RunBusy as exc:
        _fail(str(exc), 2)
    except RunnerUnavailable as exc:
        _fail(str(exc), 3)
    except HubError as exc:
        _fail(str(exc), exc.exit_code)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"{spec.name}: {result['records']} records (target {result['target_size']})", show_header=False)
    for stage, count in result["counts"].items():
        table.add_row(stage, str(count))
    usage = result["usage"]
    table.add_row("tokens/s", f"{usage['generated_tokens_per_second']}")
    table.add_row("wall time", f"{usage['wall_seconds']:.0f} s")
    _stdout().print(table)
    if result.get("resumed"):
        _stdout().print(f"resumed run {result['run_id']}: finished shards were reused")
    _stdout().print(
        f"dataset: {result['dataset_dir']}\nreport:  {result['report_html']}\n         {result['report_md']}"
        f"\n         {result['report_json']}"
    )


def _runner_choice(spec: Any, kind: str | None, address: str | None, workers: int | None) -> dict[str, Any] | None:
    """The spec's runner with the command line's overrides (None: the spec's as it is); refused early when bad."""
    from pydantic import ValidationError

    from polyculture.spec import RunnerSpec

    if kind is None and address is None and workers is None:
        return None
    chosen = spec.runner.model_dump()
    if kind is not None and kind != chosen["kind"]:
        chosen = {"kind": kind, "address": None, "workers": None}  # the spec's cluster belongs to its own kind
    if address is not None:
        chosen |= {"address": address, "workers": None}
    if workers is not None:
        chosen |= {"workers": workers, **({"address": None} if address is None else {})}
    try:
        return RunnerSpec.model_validate(chosen).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "runner"
        _fail(f"--runner/--runner-address/--workers: {where}: {error['msg']}", 2)
        raise  # unreachable: _fail exits


@app.command()
def index(
    source: Annotated[Path, typer.Argument(help="A parquet/JSONL/CSV file, or a folder of parquet files (a dataset).")],
    output: Annotated[Path, typer.Argument(help="The reference folder to write (replaced whole if it exists).")],
    text_field: Annotated[str, typer.Option(help="Column holding the text to index.")] = "text",
    id_field: Annotated[str | None, typer.Option(help="Column holding a record id (default: file:row).")] = None,
    embedding_model: Annotated[
        str, typer.Option(help="Embedding model; must match the builds' dedup.embedding_model.")
    ] = "minilm-l6",
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Index a reference dataset (or an earlier release) so builds can dedup against it (dedup.reference)."""
    from polyculture.index.releases import ReferenceError, read_texts, write_reference
    from polyculture.stages.embed import load_embedder

    try:
        ids, texts = read_texts(source, text_field, id_field)
    except ReferenceError as exc:
        _fail(str(exc))
    if not texts:
        _fail(f"'{source}' has no non-empty '{text_field}' values to index")
    embedder = load_embedder(embedding_model)
    vectors = embedder.encode(texts, show_progress=not quiet)
    folder = write_reference(output, ids, texts, vectors, embedding_model=embedding_model, source=str(source))
    result = {"reference": str(folder), "records": len(ids), "embedding_model": embedding_model}
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    _stdout().print(f"indexed {len(ids)} records from {source} into {folder} ({embedding_model})")
    _stdout().print(f"use it in a spec: dedup: {{reference: [{folder}]}}")


@app.command()
def publish(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder: <publish.dir>/<dataset>/<run-id>/.")],
    repo: Annotated[
        str | None, typer.Option(help="Dataset repo owner/name (default: publish.hub.repo_id of the run's spec).")
    ] = None,
    private: Annotated[
        bool | None,
        typer.Option(
            "--private/--public",
            help="Visibility if the repo gets created (default: publish.hub.private, else private); "
            "an existing repo keeps its own.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Push a run's dataset folder (data, card, report, plots) to a Hugging Face Hub dataset repo in one commit,
    tagged with the run id; files of an earlier run that this one lacks are deleted in the same commit.

    The token comes from publish.hub.token_env (HF_TOKEN by default), else from `hf auth login`; it is never printed.
    Exit codes: 2 bad argument or run folder, 4 no token or token rejected, 5 no write access to the repo,
    6 Hub unreachable, 7 run already published (its tag exists) or the repo changed during the push,
    8 other Hub refusal.
    """
    from polyculture import progress
    from polyculture.hub.push import HubError, hub_settings, locate_run, push_dataset

    bar = _progress_bar(quiet, label_width=6, transient=True)
    try:
        run = locate_run(run_dir)
        hub = hub_settings(run.hub, repo=repo, private=private)
        with bar, progress.reporting(_RichReporter(bar)):
            result = push_dataset(run.dataset_dir, hub, run_id=run.run_id)
    except HubError as exc:
        _fail(str(exc), exc.exit_code)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    visibility = {True: "private", False: "public", None: "visibility unknown"}[result.private]
    out = _stdout()
    out.print(f"pushed run {result.run_id} to {result.repo_id} ({visibility}) as {result.user}", highlight=False)
    what = "no change since the last push" if result.unchanged else f"{len(result.files)} files, {result.bytes:,} bytes"
    if result.deleted:
        what += f", {len(result.deleted)} removed"
    out.print(f"commit: {result.commit_url} ({what})", highlight=False)
    if result.tag:
        out.print(f"tag:    {result.tag}", highlight=False)
    if hub.private != result.private and result.private is not None:
        out.print(f"note: {result.repo_id} already existed and stays {visibility}", highlight=False)


@app.command("compare-methods")
def compare_methods_command(
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Run several prompting methods on SPEC with the same generated-token budget and compare their diversity,
    validity, answer coverage and calibration (comparison.json, comparison.md and a chart)."""
    from polyculture import progress
    from polyculture.compare.comparison import format_value, parse_methods, summary_columns
    from polyculture.engines.base import EngineError
    from polyculture.spec import SpecError

    spec = _load(spec_path)
    try:
        names = parse_methods(methods)
    except SpecError as exc:
        _fail(str(exc))
    _check_models(spec)
    from polyculture.compare.flow import compare_methods

    bar = _progress_bar(quiet, label_width=18)
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
        "model": spec.model.label,
        "engine": spec.model.engine,
    }
    if as_json:
        sys.stdout.write(json.dumps(summary | {"plan": cells.to_dicts()}, indent=2) + "\n")
        return
    _stdout().print(summary)
    _stdout().print(cells)


@app.command()
def serve(
    spec_paths: Annotated[list[Path], typer.Argument(help="Build specs (YAML), each with a `schedule:` key.")],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate and show the deployments with their next 3 runs; register nothing."),
    ] = False,
    allow_unscheduled: Annotated[
        bool,
        typer.Option(
            "--allow-unscheduled",
            help="Also register specs without `schedule:` (no schedule: they run only when triggered).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build SPECs on their cron `schedule:`: register one Prefect deployment of the build_dataset flow per spec
    (named after its dataset) and run the scheduled builds in this process until Ctrl-C or SIGTERM. Each run re-reads
    its spec and gets a new run folder, <publish.dir>/<dataset>/<run-id>/ (or resumes one a crashed run left).

    Needs a Prefect server: start one with `prefect server start` and set PREFECT_API_URL (e.g.
    http://127.0.0.1:4200/api). Its scheduler creates the runs ahead of time, and it keeps the deployments and the
    run history across restarts of serve. Without PREFECT_API_URL, Prefect would start a temporary local server with
    no scheduler, so serve refuses (exit 3); --dry-run needs no server. Stopping serve pauses the schedules; serving
    again resumes them. Trigger a run now with `prefect deployment run build_dataset/<dataset>`.

    Exit codes: 2 a bad spec (the field named), a spec without `schedule:`, or two specs with one dataset name;
    3 a model that is not available or no reachable Prefect server; 1 the server failed while serving."""
    from polyculture.flows.schedules import (
        ScheduleError,
        describe,
        load_scheduled_specs,
        serve_deployments,
        to_deployment,
    )
    from polyculture.spec import SpecError

    try:  # every spec is checked before anything is registered
        items = load_scheduled_specs(spec_paths, allow_unscheduled=allow_unscheduled)
    except (SpecError, ScheduleError) as exc:
        _fail(str(exc))
    for item in items:
        _check_models(item.spec)
    deployments = [to_deployment(item) for item in items]
    described = [describe(item, deployment) for item, deployment in zip(items, deployments, strict=True)]

    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()

    def show(registered: bool, ids: list[Any] | None = None) -> None:
        listed = [d | {"id": str(i)} for d, i in zip(described, ids, strict=True)] if ids else described
        if as_json:
            payload = {"api_url": api_url, "registered": registered, "deployments": listed}
            sys.stdout.write(json.dumps(payload, indent=2) + "\n")
            sys.stdout.flush()  # the command keeps running: a reader waiting on stdout gets it now
            return
        table = Table(title=f"{len(listed)} deployment(s)" + ("" if registered else " (dry run: not registered)"))
        for column in ("deployment", "schedule", "next runs", "spec"):
            table.add_column(column)
        for d in listed:
            when = f"{d['cron']} ({d['timezone']})" if d["cron"] else "on demand"
            table.add_row(d["name"], when, "\n".join(d["next_runs"]) or "-", d["spec"])
        _stdout().print(table)

    if dry_run:
        show(False)
        return
    if not api_url:
        _fail(
            "serve needs a Prefect server for its schedules (a temporary one has no scheduler): run "
            "`prefect server start` and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api; --dry-run needs none",
            3,
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        _fail(f"cannot reach the Prefect server at PREFECT_API_URL={api_url}: {problem}", 3)

    def registered(ids: list[Any]) -> None:
        show(True, ids)
        err.print(
            f"serving {len(ids)} deployment(s) on {api_url}; runs go to <publish.dir>/<dataset>/<run-id>/ (a relative "
            f"publish.dir is under {Path.cwd()}). Ctrl-C stops and pauses the schedules. Run one now: "
            f"prefect deployment run '{items[0].full_name}'",
            highlight=False,
            soft_wrap=True,
        )

    import httpx
    from prefect.exceptions import PrefectException

    try:
        serve_deployments(deployments, on_registered=registered)
    except (httpx.HTTPError, PrefectException) as exc:  # e.g. the server went away before the pause on the way out
        _fail(f"serve stopped on an error ({type(exc).__name__}: {exc}); check the server at {api_url}", 1)
    err.print("stopped; the schedules are paused until serve runs again", highlight=False)


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
    from polyculture.engines.model_files import (
        EMBEDDED_CHAT_MODELS,
        EMBEDDED_EMBEDDING_MODELS,
    )

    listing = {"chat": EMBEDDED_CHAT_MODELS, "embedding": EMBEDDED_EMBEDDING_MODELS}
    if as_json:
        sys.stdout.write(json.dumps(listing, indent=2) + "\n")
        return
    for kind, names in listing.items():
        for name, what in names.items():
            _stdout().print(f"[bold]{name}[/] ({kind}): {what}")


def _family_table(title: str, probes: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in (
        "family",
        "options",
        "norm. entropy (exact)",
        "top option (exact)",
        "KL bits (exact)",
        "valid mass",
        "norm. entropy (sampled)",
        "coverage (sampled)",
        "invalid (sampled)",
    ):
        table.add_column(column, justify="left" if column.startswith(("family", "top")) else "right")
    from polyculture.tuning.report import fmt, headline

    for probe in probes:
        h = headline(probe)
        table.add_row(
            h["family"],
            str(h["options"]),
            fmt(h["exact_normalized_entropy"]),
            f"{h['exact_top_option']} ({fmt(h['exact_top_share'], '.0%')})",
            fmt(h["exact_kl_bits"]),
            fmt(h["valid_mass"], ".2e"),
            fmt(h["sampled_normalized_entropy"]),
            "-" if h["sampled_coverage_count"] is None else f"{h['sampled_coverage_count']}/{h['options']}",
            fmt(h["sampled_invalid_rate"], ".0%"),
        )
    return table


@app.command()
def probe(
    tasks: Annotated[
        list[str],
        typer.Argument(help="Task families: names from configs/tuning/families (e.g. numbers_1_10) or YAML paths."),
    ],
    model: Annotated[str, typer.Option(help="Embedded model name or local HF folder (or a tuned adapter folder).")] = (
        "smollm2-135m-instruct"
    ),
    adapter: Annotated[Path | None, typer.Option(help="A LoRA adapter folder (from `polyculture tune`).")] = None,
    engine: Annotated[str, typer.Option(help="transformers or vllm.")] = "transformers",
    samples: Annotated[int, typer.Option(min=0, help="Samples per prompt phrasing (0: exact figures only).")] = 100,
    temperature: Annotated[float, typer.Option(min=0.01, max=5.0, help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Engine seed.")] = 0,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Measure a model's mode collapse on enumerable tasks: the exact distribution over every valid answer (sequence
    log-probs of whole answers, end-of-turn included) and the sampled one (N samples per phrasing): entropy,
    normalised entropy, coverage, KL to the target, top option's share, invalid-output rate."""
    from pydantic import ValidationError

    from polyculture.engines.base import EngineError
    from polyculture.engines.factory import create_engine
    from polyculture.engines.model_files import ModelUnavailable
    from polyculture.spec import ModelSpec
    from polyculture.tuning.families import FamilyError, resolve_family
    from polyculture.tuning.probe import answer_token_cap, engine_tokenizer, probe_family

    if engine not in ("transformers", "vllm"):
        _fail(f"--engine '{engine}' is not allowed; allowed: transformers, vllm")
    try:
        families = [resolve_family(t) for t in tasks]
    except FamilyError as exc:
        _fail(str(exc))
    try:
        model_spec = ModelSpec(name=model, engine=engine, adapter=str(adapter) if adapter else None)
    except ValidationError as exc:
        _fail("; ".join(f"--{'.'.join(str(p) for p in e['loc']) or 'model'}: {e['msg']}" for e in exc.errors()))
    bar = _progress_bar(quiet, label_width=10, transient=True)
    results = []
    try:
        with bar:
            loading = bar.add_task("load", total=1, note=f"{engine}: {model}")
            eng = create_engine(model_spec, seed=seed, base_dir=Path.cwd())
            bar.update(loading, completed=1)
            probing = bar.add_task("probe", total=len(families), note="")
            tokenizer = engine_tokenizer(eng)
            for family in families:
                bar.update(probing, note=family.name)
                cap = answer_token_cap(tokenizer, family) if tokenizer is not None else None
                results.append(probe_family(eng, family, samples=samples, temperature=temperature, answer_tokens=cap))
                bar.advance(probing)
            eng.close()
    except (EngineError, ModelUnavailable) as exc:
        _fail(str(exc), 3)
    if as_json:
        payload = {"model": model, "adapter": str(adapter) if adapter else None, "engine": engine, "results": results}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    name = model + (f" + {adapter}" if adapter else "")
    _stdout().print(_family_table(f"{name} ({engine}, {samples} samples per phrasing, T={temperature})", results))


@app.command()
def tune(
    config_path: Annotated[Path, typer.Argument(help="Tuning config (YAML), e.g. configs/tuning/diffuse.yaml.")],
    hold_out: Annotated[
        list[str] | None, typer.Option("--hold-out", help="Family to hold out (repeatable); replaces held_out.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override training.max_steps.")] = None,
    max_minutes: Annotated[float | None, typer.Option(min=0.01, help="Override training.max_minutes.")] = None,
    samples: Annotated[int | None, typer.Option(min=0, help="Override probe.samples (per phrasing).")] = None,
    leave_one_out: Annotated[
        bool, typer.Option("--leave-one-out", help="One run per family, each holding that family out (slow).")
    ] = False,
    run_id: Annotated[str | None, typer.Option(help="Run folder name (default: time + config hash).")] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Diffuse fine-tuning: train a LoRA adapter so the model's answers follow each family's target distribution,
    probe trained and held-out families before and after, and save the adapter with its metadata (usable as
    `model.adapter` in a build spec)."""
    from polyculture import progress
    from polyculture.engines.base import EngineError
    from polyculture.engines.model_files import ModelUnavailable
    from polyculture.tuning.config import TuneConfigError, config_families, load_tune_config
    from polyculture.tuning.report import fmt

    overrides: dict[str, Any] = {}
    if hold_out is not None:
        overrides["held_out"] = hold_out
        try:  # a family named on the command line leaves the config's training list too
            listed = load_tune_config(config_path).families
        except TuneConfigError as exc:
            _fail(str(exc))
        if listed is not None:
            overrides["families"] = [f for f in listed if f not in hold_out]
    training = {k: v for k, v in {"max_steps": max_steps, "max_minutes": max_minutes}.items() if v is not None}
    if training:
        overrides["training"] = training
    if samples is not None:
        overrides["probe"] = {"samples": samples}
    try:  # refuse a bad config before any model loads
        config = load_tune_config(config_path, overrides)
        config_families(config, config_path.resolve().parent)
    except TuneConfigError as exc:
        _fail(str(exc))
    from polyculture.flows.diffuse_tune import diffuse_tune, diffuse_tune_leave_one_out

    bar = _progress_bar(quiet, label_width=13)
    try:
        with bar, progress.reporting(_RichReporter(bar)):
            if leave_one_out:
                result = diffuse_tune_leave_one_out(str(config_path), overrides=overrides)
            else:
                result = diffuse_tune(str(config_path), run_id=run_id, overrides=overrides)
    except (EngineError, ModelUnavailable) as exc:
        _fail(str(exc), 3)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    if leave_one_out:
        _stdout().print(f"leave-one-out summary: {result['summary_dir']}/leave_one_out.md")
        return
    table = Table(
        title=f"{config.name}: {result['steps']} steps in {result['seconds']:.0f} s ({result['stop_reason']})"
    )
    for column in (
        "family",
        "role",
        "norm. entropy (exact)",
        "top option (exact)",
        "coverage (sampled)",
        "invalid (sampled)",
        "loss / H(w)",
    ):
        table.add_column(column)
    for row in result["before_after"]:
        b, a = row["before"], row["after"]
        ratio = result["final_loss_over_entropy"].get(row["family"])
        table.add_row(
            row["family"],
            row["role"],
            f"{b['exact_normalized_entropy']:.3f} -> {a['exact_normalized_entropy']:.3f}",
            f"{b['exact_top_option']} {b['exact_top_share']:.0%} -> {a['exact_top_option']} {a['exact_top_share']:.0%}",
            f"{b['sampled_coverage_count']} -> {a['sampled_coverage_count']} of {b['options']}",
            fmt(b["sampled_invalid_rate"], ".0%") + " -> " + fmt(a["sampled_invalid_rate"], ".0%"),
            "-" if ratio is None else f"{ratio:.3f}",
        )
    _stdout().print(table)
    _stdout().print(f"adapter: {result['adapter_dir']}\nreport:  {result['report_md']}")


if __name__ == "__main__":
    app()
