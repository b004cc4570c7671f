"""The build commands: check a spec, build it, index a reference dataset, publish a run to the Hub."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from polyculture.cli.display import RichReporter, err, progress_bar, stdout, write_json
from polyculture.cli.errors import fail
from polyculture.cli.options import JsonOpt, QuietOpt, SpecArg


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
        bool,
        typer.Option(
            "--new-run", help="Start a new run even when an unfinished run of this spec exists or is being built."
        ),
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
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline for SPEC and print where the dataset and its report are.

    A build that died (crash, kill -9) or stopped (a server gone: exit 3, the message says so) resumes when the same
    command runs again: finished shards are reused, and each shard samples from its own seed, so the result equals
    an uninterrupted run (transformers, vllm). While another build of the same spec runs, the command is refused
    (exit 2, naming its run folder and holder) unless --new-run.
    """
    from polyculture import progress
    from polyculture.preflight import check_models, load_spec

    spec = load_spec(spec_path)
    check_models(spec)
    runner_choice = _runner_choice(spec, runner, runner_address, workers)
    hub = spec.publish.hub
    if hub is not None and hub.push_on_build:
        from polyculture.hub.push import preflight as hub_preflight

        hub_preflight(hub)  # a bad token or a repo we cannot write fails now, not after the generation
    import httpx

    _check_prefect_api()
    from polyculture.flows.build_dataset import build_dataset

    bar = progress_bar(quiet, label_width=10)
    api_lost: httpx.HTTPError | None = None
    with bar, progress.reporting(RichReporter(bar)):
        try:
            result = build_dataset(
                str(spec_path),
                run_id=run_id,
                output_root=str(output_dir) if output_dir else None,
                resume=not new_run,
                runner=runner_choice,
            )
        except httpx.HTTPError as exc:  # only Prefect's client lets these out: engines and the Hub wrap their own
            api_lost = exc
    if api_lost is not None:
        result = _after_prefect_api_lost(api_lost)
    _show(result, spec.name, as_json)
    if api_lost is not None:
        _exit_now(0)


def _check_prefect_api() -> None:
    """A configured Prefect API that does not answer fails now (exit 3), before a run folder is made: Prefect would
    raise a RuntimeError with its traceback when the flow starts."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        return  # a temporary local server starts with the flow
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        fail(
            f"cannot reach the Prefect API at PREFECT_API_URL={api} ({problem}): start it (`prefect server start`) "
            "or unset PREFECT_API_URL to use a temporary local one",
            3,
        )


def _after_prefect_api_lost(exc: Exception) -> dict[str, Any]:
    """The finished build's result when the Prefect API went away but the build got to its end; else fail (exit 3)
    saying how to resume."""
    from prefect.settings import PREFECT_API_URL

    from polyculture.flows.build_dataset import resume_hint
    from polyculture.runs.folders import RESULT_FILE, last_held_run

    api = PREFECT_API_URL.value() or "(a temporary local server)"
    run_dir = last_held_run()
    lost = f"the Prefect API at {api} went away during the build ({type(exc).__name__}: {exc})"
    if run_dir is None:
        err.print(f"[bold red]error:[/] cannot reach the Prefect API at {api} ({type(exc).__name__}: {exc}): start it "
                  "(`prefect server start`) or unset PREFECT_API_URL to use a temporary local one",
                  highlight=False, soft_wrap=True)  # fmt: skip
        _exit_now(3)
    if not (run_dir / RESULT_FILE).is_file():
        err.print(f"[bold red]error:[/] {lost}; {resume_hint(run_dir)}, with the server back or without "
                  "PREFECT_API_URL (a temporary local server)", highlight=False, soft_wrap=True)  # fmt: skip
        _exit_now(3)
    err.print(f"[yellow]warning:[/] {lost}; the build finished all the same, but its flow run on that server is not "
              "marked completed", highlight=False, soft_wrap=True)  # fmt: skip
    return json.loads((run_dir / RESULT_FILE).read_text())


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's exit hooks: with its API gone, Prefect's exit hook tries to send every queued
    event (about 8 s each, ten reconnects), minutes for a small build and hours for a large one. Nothing of ours is
    left to flush: the run folder's files are written and synced, and its lock goes with the process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _show(result: dict[str, Any], dataset: str, as_json: bool) -> None:
    if as_json:
        write_json(result)
        return
    table = Table(title=f"{dataset}: {result['records']} records (target {result['target_size']})", show_header=False)
    for stage, count in result["counts"].items():
        table.add_row(stage, str(count))
    usage = result["usage"]
    table.add_row("tokens/s", f"{usage['generated_tokens_per_second']}")
    table.add_row("wall time", f"{usage['wall_seconds']:.0f} s")
    stdout().print(table)
    if result.get("resumed"):
        stdout().print(f"resumed run {result['run_id']}: finished shards were reused")
    stdout().print(
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
        fail(f"--runner/--runner-address/--workers: {where}: {error['msg']}", 2)


def index(
    source: Annotated[Path, typer.Argument(help="A parquet/JSONL/CSV file, or a folder of parquet files (a dataset).")],
    output: Annotated[Path, typer.Argument(help="The reference folder to write (replaced whole if it exists).")],
    text_field: Annotated[str, typer.Option(help="Column holding the text to index.")] = "text",
    id_field: Annotated[str | None, typer.Option(help="Column holding a record id (default: file:row).")] = None,
    embedding_model: Annotated[
        str, typer.Option(help="Embedding model; must match the builds' dedup.embedding_model.")
    ] = "minilm-l6",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Index a reference dataset (or an earlier release) so builds can dedup against it (dedup.reference)."""
    from polyculture.index.releases import write_release_index
    from polyculture.index.sources import read_texts
    from polyculture.stages.embed import load_embedder

    ids, texts = read_texts(source, text_field, id_field)
    if not texts:
        fail(f"'{source}' has no non-empty '{text_field}' values to index")
    embedder = load_embedder(embedding_model)
    vectors = embedder.encode(texts, show_progress=not quiet)
    folder = write_release_index(output, ids, texts, vectors, embedding_model=embedding_model, source=str(source))
    result = {"reference": str(folder), "records": len(ids), "embedding_model": embedding_model}
    if as_json:
        write_json(result)
        return
    stdout().print(f"indexed {len(ids)} records from {source} into {folder} ({embedding_model})")
    stdout().print(f"use it in a spec: dedup: {{reference: [{folder}]}}")


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
    quiet: QuietOpt = False,
) -> None:
    """Push a run's dataset folder (data, card, report, plots) to a Hugging Face Hub dataset repo in one commit,
    tagged with the run id; files of an earlier run that this one lacks are deleted in the same commit.

    The token comes from publish.hub.token_env (HF_TOKEN by default), else from `hf auth login`; it is never printed.
    Exit codes: 2 bad argument or run folder, 4 no token or token rejected, 5 no write access to the repo,
    6 Hub unreachable, 7 run already published (its tag exists) or the repo changed during the push,
    8 other Hub refusal.
    """
    from polyculture import progress
    from polyculture.hub.push import hub_settings, locate_run, push_dataset

    bar = progress_bar(quiet, label_width=6, transient=True)
    run = locate_run(run_dir)
    hub = hub_settings(run.hub, repo=repo, private=private)
    with bar, progress.reporting(RichReporter(bar)):
        result = push_dataset(run.dataset_dir, hub, run_id=run.run_id)
    if as_json:
        write_json(result.to_dict())
        return
    visibility = {True: "private", False: "public", None: "visibility unknown"}[result.private]
    out = stdout()
    out.print(f"pushed run {result.run_id} to {result.repo_id} ({visibility}) as {result.user}", highlight=False)
    what = "no change since the last push" if result.unchanged else f"{len(result.files)} files, {result.bytes:,} bytes"
    if result.deleted:
        what += f", {len(result.deleted)} removed"
    out.print(f"commit: {result.commit_url} ({what})", highlight=False)
    if result.tag:
        out.print(f"tag:    {result.tag}", highlight=False)
    if hub.private != result.private and result.private is not None:
        out.print(f"note: {result.repo_id} already existed and stays {visibility}", highlight=False)


def check(spec_path: SpecArg, as_json: JsonOpt = False) -> None:
    """Validate SPEC and show the plan (cells, quotas, prompts) without generating anything."""
    from polyculture.preflight import load_spec
    from polyculture.stages.plan import plan

    spec = load_spec(spec_path)
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
        "fingerprint": spec.fingerprint(),
    }
    if as_json:
        write_json(summary | {"plan": cells.to_dicts()})
        return
    stdout().print(summary)
    stdout().print(cells)
