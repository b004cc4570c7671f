"""The decontaminate section: which benchmarks a build's records are checked against, and how (word n-gram overlap,
then the cosine of the nearest benchmark item). Absent, the stage is off. Whether the files exist and hold the
columns, and whether `fields` are record fields, preflight checks."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from polyculture.spec.base import _Strict

BUILT_IN_BENCHMARKS = ("champ",)


class BenchmarkFile(_Strict):
    """A user's benchmark: a parquet / JSON Lines / CSV file, or a folder of parquet files, with a text column."""

    path: str = Field(min_length=1, description="File or folder, relative to the spec file.")
    text_column: str = Field(default="text", min_length=1, description="Column holding each item's text.")
    id_column: str | None = Field(default=None, description="Column of item ids (default: '<file stem>:<row>').")
    name: str | None = Field(default=None, min_length=1, description="Name in rejects and reports (default: stem).")

    @property
    def label(self) -> str:
        return self.name or PurePath(self.path).stem


Benchmark = Literal["champ"] | BenchmarkFile


class DecontaminateSpec(_Strict):
    benchmarks: list[Benchmark] = Field(
        min_length=1,
        description="'champ' (the 270 CHAMP competition problems, package champ-dataset) or {path, text_column, "
        "id_column, name}: a parquet / JSON Lines / CSV file or a folder of parquet files.",
    )
    ngram: int = Field(
        default=8, ge=4, le=64, description="Word n-gram length: a record sharing one n-gram with an item is flagged."
    )
    embedding_threshold: float = Field(
        default=0.85,
        gt=0,
        le=1,
        description="A record whose nearest benchmark item has this cosine or more is flagged (bench/decontamination.py: "
        "edited CHAMP copies score 0.5-1.0 with MiniLM, unrelated problem-like texts at most 0.76).",
    )
    fields: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Record fields whose text is checked, each on its own (default: the text embedded for dedup: "
        "record.text_field, else the whole record).",
    )

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _named_built_ins(cls, value: Any) -> Any:
        # A bare string is a built-in's name: say so rather than pydantic's two-branch union message.
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str) and item not in BUILT_IN_BENCHMARKS:
                    raise ValueError(
                        f"item {i}: '{item}' is not a built-in benchmark {list(BUILT_IN_BENCHMARKS)}; "
                        "a file is {path: ..., text_column: ...}"
                    )
        return value

    @field_validator("fields")
    @classmethod
    def _distinct_fields(cls, fields: list[str] | None) -> list[str] | None:
        if fields is not None:
            repeated = sorted({f for f in fields if fields.count(f) > 1})
            if repeated:
                raise ValueError(f"fields must be distinct; repeated: {repeated}")
        return fields

    @model_validator(mode="after")
    def _distinct_names(self) -> DecontaminateSpec:
        names = self.benchmark_names
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"benchmarks: names must be distinct (set `name` on a file); repeated: {repeated}")
        return self

    @property
    def benchmark_names(self) -> list[str]:
        return [b if isinstance(b, str) else b.label for b in self.benchmarks]
