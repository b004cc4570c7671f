"""Where and when a build runs: the task runner for its generation shards and the cron schedule of `serve`."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from polyculture.spec.base import _Strict


class RunnerSpec(_Strict):
    """Where the generation shards run: the Prefect task runner. Not part of the spec's fingerprint: every runner
    gives the same dataset (each shard has its own seed)."""

    kind: Literal["threads", "dask", "ray"] = Field(
        default="threads",
        description="threads: in this process (default); dask: prefect-dask; ray: prefect-ray.",
    )
    address: str | None = Field(
        default=None,
        description="An existing cluster: dask scheduler (tcp://host:8786) or ray (ray://host:10001, or 'auto'). "
        "Without one, dask and ray start a local cluster of `workers` processes.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="threads: shard tasks in flight (default 4); local dask/ray cluster: worker processes (default 2).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunnerSpec:
        if self.kind == "threads" and self.address is not None:
            raise ValueError("address is for runner kind dask or ray; threads run in this process")
        if self.address is not None and self.workers is not None:
            raise ValueError("workers sizes a local cluster; with an address the cluster has its own workers")
        if self.kind == "dask" and self.address is not None and not re.match(r"^(tcp|tls|inproc|ucx)://\S+$", self.address):
            raise ValueError(f"'{self.address}' is not a dask scheduler address (tcp://host:port)")
        if self.kind == "ray" and self.address is not None and not (
            self.address == "auto" or re.match(r"^(ray://)?[\w.-]+:\d+$", self.address)
        ):
            raise ValueError(f"'{self.address}' is not a ray address (ray://host:10001, host:6379 or 'auto')")
        return self


class ScheduleSpec(_Strict):
    """When `polyculture serve` builds this spec again (a Prefect deployment with a cron schedule)."""

    cron: str = Field(description="Five-field cron expression, e.g. '0 3 * * 1' (Mondays 03:00).")
    timezone: str = Field(default="UTC", description="IANA time zone the cron expression is read in.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        from croniter import croniter

        fields = cron.split()
        # croniter also takes random/hashed fields (R, H) and a seconds field; Prefect does not.
        if len(fields) != 5 or not croniter.is_valid(cron) or any(f.casefold() in ("r", "h") for f in fields):
            raise ValueError(f"'{cron}' is not a five-field cron expression (minute hour day-of-month month day-of-week)")
        return cron

    @field_validator("timezone")
    @classmethod
    def _tz(cls, tz: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"'{tz}' is not an IANA time zone (e.g. UTC, Europe/Paris)") from None
        return tz
