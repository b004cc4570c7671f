"""The rejects frame every stage appends to: what was dropped, where, and why."""

from __future__ import annotations

import polars as pl

REJECTS_SCHEMA = {"record_id": pl.String, "call_id": pl.String, "stage": pl.String, "reason": pl.String, "detail": pl.String}


def reject(record_id: str | None, call_id: str | None, stage: str, reason: str, detail: str) -> dict[str, str | None]:
    return {"record_id": record_id, "call_id": call_id, "stage": stage, "reason": reason, "detail": detail}


def rejects_frame(rows: list[dict[str, str | None]] | None = None) -> pl.DataFrame:
    return pl.DataFrame(rows or [], schema=REJECTS_SCHEMA)
