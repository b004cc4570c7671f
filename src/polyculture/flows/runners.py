"""Task runners: where a build's generation shards run (spec `runner:`, or `polyculture build --runner`).

threads: Prefect's thread pool in the build's own process (one engine, shared). dask / ray: prefect-dask /
prefect-ray, on a local cluster of worker processes or on an existing cluster at `address`; every worker process
loads the engine once (flows/common.shared_engine) and keeps it for every shard it runs.
"""

from __future__ import annotations

import logging
from typing import Any

from polyculture.spec import RunnerSpec

DEFAULT_THREADS = 4  # shards in flight in one process; they take turns on the one engine
DEFAULT_LOCAL_WORKERS = 2


class RunnerUnavailable(RuntimeError):
    """The runner asked for is not installed; the message says what to install."""


def task_runner_for(runner: RunnerSpec) -> Any:
    """The Prefect task runner a RunnerSpec describes (imports are lazy: dask and ray are optional)."""
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.workers or DEFAULT_THREADS)
    if runner.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise RunnerUnavailable("runner dask needs prefect-dask (a dependency of polyculture): reinstall") from exc
        # The scheduler logs every worker and client connection at INFO: noise under a progress display.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        if runner.address is not None:
            return DaskTaskRunner(address=runner.address)
        # Processes, one thread each: a worker is an engine; torch threads inside it use the cores.
        workers = runner.workers or DEFAULT_LOCAL_WORKERS
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    if runner.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RunnerUnavailable("runner ray needs prefect-ray: pip install 'polyculture[ray]'") from exc
        if runner.address is not None:
            return RayTaskRunner(address=runner.address)
        # A local Ray for this build only: no dashboard server (it would also listen on a port).
        return RayTaskRunner(
            init_kwargs={"num_cpus": runner.workers or DEFAULT_LOCAL_WORKERS, "include_dashboard": False}
        )
    raise ValueError(f"unknown runner kind '{runner.kind}'; allowed: threads, dask, ray")
