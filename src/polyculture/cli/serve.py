"""serve: build specs on their cron schedules, as Prefect deployments served from this process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from polyculture.cli.display import err, stdout, write_json
from polyculture.cli.errors import fail
from polyculture.cli.options import JsonOpt


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
    from polyculture.flows.schedules import describe, load_scheduled_specs, serve_deployments, to_deployment
    from polyculture.preflight import check_models

    # every spec is checked before anything is registered
    items = load_scheduled_specs(spec_paths, allow_unscheduled=allow_unscheduled)
    for item in items:
        check_models(item.spec)
    deployments = [to_deployment(item) for item in items]
    described = [describe(item, deployment) for item, deployment in zip(items, deployments, strict=True)]

    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()

    def show(registered: bool, ids: list[Any] | None = None) -> None:
        listed = [d | {"id": str(i)} for d, i in zip(described, ids, strict=True)] if ids else described
        if as_json:
            payload = {"api_url": api_url, "registered": registered, "deployments": listed}
            write_json(payload)
            sys.stdout.flush()  # the command keeps running: a reader waiting on stdout gets it now
            return
        table = Table(title=f"{len(listed)} deployment(s)" + ("" if registered else " (dry run: not registered)"))
        for column in ("deployment", "schedule", "next runs", "spec"):
            table.add_column(column)
        for d in listed:
            when = f"{d['cron']} ({d['timezone']})" if d["cron"] else "on demand"
            table.add_row(d["name"], when, "\n".join(d["next_runs"]) or "-", d["spec"])
        stdout().print(table)

    if dry_run:
        show(False)
        return
    if not api_url:
        fail(
            "serve needs a Prefect server for its schedules (a temporary one has no scheduler): run "
            "`prefect server start` and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api; --dry-run needs none",
            3,
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        fail(f"cannot reach the Prefect server at PREFECT_API_URL={api_url}: {problem}", 3)

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
        fail(f"serve stopped on an error ({type(exc).__name__}: {exc}); check the server at {api_url}", 1)
    err.print("stopped; the schedules are paused until serve runs again", highlight=False)
