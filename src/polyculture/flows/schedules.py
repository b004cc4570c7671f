"""Schedules: build specs as Prefect deployments of the build_dataset flow, served by `polyculture serve`.

One deployment per spec, named after the spec's dataset name, with the spec's `schedule:` (cron + time zone) and the
spec's absolute path as its only parameter, so every run re-reads the spec and takes build_dataset's default run id: a
new one, or the unfinished folder a crashed run of the same spec left (a run still going is never joined). Serving
registers the deployments with the Prefect API and then executes their runs in this process; stopping it pauses their
schedules (Prefect's pause-on-shutdown), and serving again resumes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID
from zoneinfo import ZoneInfo

from polyculture.preflight import load_spec
from polyculture.spec import BuildSpec, ScheduleSpec, SpecError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

FLOW_NAME = "build_dataset"
TAGS = ["polyculture"]


class ScheduleError(ValueError):
    """Specs that cannot be served together; the message names the files."""


@dataclass(frozen=True)
class ScheduledSpec:
    path: Path  # absolute: the deployment's parameter, read again by every run
    spec: BuildSpec

    @property
    def deployment_name(self) -> str:
        return self.spec.name

    @property
    def full_name(self) -> str:
        """What `prefect deployment run` takes."""
        return f"{FLOW_NAME}/{self.spec.name}"


def load_scheduled_specs(paths: Sequence[str | Path], *, allow_unscheduled: bool = False) -> list[ScheduledSpec]:
    """Load and check every spec before anything is registered: a bad spec (SpecError, naming the field), a spec
    without `schedule:` (unless allow_unscheduled), or two specs sharing a dataset name refuse them all."""
    loaded: list[ScheduledSpec] = []
    for path in paths:
        absolute = Path(path).expanduser().resolve()
        if not absolute.is_file():
            raise SpecError(f"spec file '{path}' not found")
        try:
            spec = load_spec(absolute)
        except SpecError as exc:  # several specs on one command line: say which one is bad
            raise SpecError(f"{path}: {exc}") from None
        if spec.schedule is None and not allow_unscheduled:
            raise ScheduleError(
                f'{path}: no `schedule:` key; add one (e.g. `schedule: "0 3 * * *"` or '
                '`schedule: {cron: "0 3 * * 1", timezone: Europe/Paris}`), or pass --allow-unscheduled to register '
                "it for on-demand runs only"
            )
        loaded.append(ScheduledSpec(absolute, spec))
    by_name: dict[str, list[Path]] = {}
    for item in loaded:
        by_name.setdefault(item.spec.name, []).append(item.path)
    for name, files in by_name.items():
        if len(set(files)) > 1:  # one deployment per dataset name: the second would silently replace the first
            raise ScheduleError(
                f"specs {', '.join(map(str, files))} share the dataset name '{name}'; names must differ"
            )
        if len(files) > 1:
            raise ScheduleError(f"spec {files[0]} is given {len(files)} times")
    return loaded


def next_run_times(schedule: ScheduleSpec, count: int = 3, after: datetime | None = None) -> list[datetime]:
    """The next `count` times the schedule fires, as aware datetimes in the schedule's time zone.

    Computed by the Prefect server's own cron schedule (the code its scheduler service runs), so what --dry-run prints
    is what the server will create, daylight-saving transitions included (plain croniter differs there).
    """
    from prefect.server.schemas.schedules import CronSchedule

    zone = ZoneInfo(schedule.timezone)
    cron = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    dates = cron._get_dates_generator(n=count, start=after or datetime.now(zone))
    return [datetime.fromtimestamp(d.timestamp(), zone) for d in dates]


def to_deployment(item: ScheduledSpec) -> RunnerDeployment:
    """The Prefect deployment for one spec (nothing is sent to a server here)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from polyculture.flows.build_dataset import build_dataset

    schedule = item.spec.schedule
    when = f"cron '{schedule.cron}' ({schedule.timezone})" if schedule else "on demand only"
    return build_dataset.to_deployment(
        name=item.deployment_name,
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)] if schedule else None,
        parameters={"spec_path": str(item.path)},
        tags=TAGS,
        description=item.spec.description or f"polyculture build of {item.path}, {when}",
        # The flow is imported by module, so a run's process finds it whatever folder serve was started in.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def describe(item: ScheduledSpec, deployment: RunnerDeployment, *, runs: int = 3) -> dict[str, Any]:
    """What a deployment will do, as printed by `polyculture serve` (--json and --dry-run)."""
    schedule = item.spec.schedule
    return {
        "name": item.full_name,
        "spec": str(item.path),
        "dataset": item.spec.name,
        "cron": schedule.cron if schedule else None,
        "timezone": schedule.timezone if schedule else None,
        "next_runs": [t.isoformat() for t in next_run_times(schedule, runs)] if schedule else [],
        "parameters": deployment.parameters,
        "tags": deployment.tags,
        "entrypoint": deployment.entrypoint,
        "publish_dir": item.spec.publish.dir,
    }


def serve_deployments(
    deployments: Sequence[RunnerDeployment], on_registered: Callable[[list[UUID]], None] | None = None
) -> None:
    """Register the deployments, then execute their runs here until SIGINT or SIGTERM.

    This is `prefect.serve` with a hook between registering and serving, so the caller reports the deployments only
    once the server has them. SIGINT and SIGTERM only ask to stop, whenever they arrive: a registration in flight
    finishes, nothing more is registered, and every deployment registered so far is paused before this returns
    (the next serve un-pauses them: a registered deployment is never left running unserved nor left paused).
    Once the runner serves, a stop cancels it and its exit pauses the schedules (Prefect's pause-on-shutdown); Prefect's
    own handlers (KeyboardInterrupt anywhere, its SIGTERM exit from inside the event loop) are not used.
    Raises what pausing raised (e.g. httpx.ConnectError when the server went away first).
    """
    import signal
    import threading

    from prefect.runner import Runner

    stop = threading.Event()
    main_task: asyncio.Task[None] | None = None

    def request_stop(*_: Any) -> None:
        stop.set()
        if main_task is not None:
            main_task.get_loop().call_soon_threadsafe(main_task.cancel)

    class _Runner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:  # installed by Runner.start
            request_stop()

    runner = _Runner(pause_on_shutdown=True)
    ids: list[UUID] = []
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for deployment in deployments:
            if stop.is_set():
                break
            ids.append(runner.add_deployment(deployment))
        if on_registered is not None and not stop.is_set():
            on_registered(ids)

        async def main() -> None:
            nonlocal main_task
            main_task = asyncio.current_task()
            if not stop.is_set():  # a stop that came before this task existed had nothing to cancel
                await runner.start()

        if not stop.is_set():
            try:
                asyncio.run(main())
            except asyncio.CancelledError:
                pass  # the normal way to stop; the runner's exit has paused the schedules
        # Stopped before the runner served (or while it started): pause what was registered ourselves. Pausing a
        # paused deployment changes nothing, so this is safe after the runner's own pause too.
        pause_deployments(ids)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def pause_deployments(ids: Sequence[UUID]) -> None:
    """Pause the schedules of these deployments on the Prefect API."""
    if not ids:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for deployment_id in ids:
            client.pause_deployment(deployment_id)
