"""Where a build's output goes and how it is described: run folders, the Hub repo, the dataset card and the report."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from polyculture.spec.base import _Strict

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class HubSpec(_Strict):
    """Where `polyculture publish` (and a build with publish.hub) pushes the dataset on a Hugging Face Hub."""

    repo_id: str = Field(description="Dataset repo id on the Hub: owner/name.")
    private: bool = Field(default=True, description="Create the repo private (an existing repo keeps its visibility).")
    token_env: str = Field(
        default="HF_TOKEN",
        description="Environment variable holding the token; when unset, the usual Hugging Face login is used.",
    )
    endpoint: str | None = Field(
        default=None, description="Hub URL other than the default (HF_ENDPOINT in the environment works too)."
    )
    tag: bool = Field(default=True, description="Tag the pushed commit with the run id.")
    push_on_build: bool = Field(default=False, description="Push at the end of `polyculture build` (else only on publish).")

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, repo_id: str) -> str:
        if not HUB_REPO_ID.match(repo_id):
            raise ValueError(f"'{repo_id}' is not a Hub repo id; expected owner/name (letters, digits, - _ .)")
        return repo_id

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"'{name}' is not an environment variable name")
        return name

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"'{url}' is not an http(s) URL")
        return url.rstrip("/") if url else url


class PublishSpec(_Strict):
    dir: str = Field(default="outputs", description="Root folder for runs: <dir>/<dataset>/<run-id>/.")
    hub: HubSpec | None = Field(default=None, description="Optional Hub dataset repo to push to.")
    license: str = Field(default="other", description="License id for the dataset card (e.g. cc-by-4.0, apache-2.0).")
    language: list[str] = Field(default_factory=lambda: ["en"], description="Language codes for the dataset card.")
    task_categories: list[str] = Field(
        default_factory=lambda: ["text-generation"], description="Hub task categories for the dataset card."
    )
    tags: list[str] = Field(default_factory=list, description="Extra tags for the dataset card.")


class ReportReference(_Strict):
    """A dataset to compare the generated data's dispersion against (generative monoculture, Wu et al. 2024)."""

    path: str = Field(description="A parquet, JSONL or CSV file, or a folder of parquet files (relative to the spec).")
    text_field: str = Field(default="text", description="Column holding the text to embed.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Attribute name -> reference column holding the same attribute (compared by entropy).",
    )
    max_rows: int = Field(default=2000, ge=2, le=1_000_000, description="Rows sampled from the reference (seeded).")


class ReportSpec(_Strict):
    reference: ReportReference | None = Field(default=None, description="Reference dataset for monoculture figures.")
    sample: int = Field(
        default=1000, ge=10, le=100_000, description="Records sampled (seeded) for pairwise metrics (self-BLEU, Vendi)."
    )
    map: Literal["pca", "tsne"] = Field(default="pca", description="2-D embedding map: PCA (fast) or t-SNE.")
    previous: str | None = Field(
        default=None,
        description="Release-over-release drift: 'auto' (the newest finished run of the same dataset in the publish "
        "folder) or a finished run folder (relative to the spec); the report gets a 'since the previous release' "
        "section (each diversity and attribute figure then and now, and the share of records near a previous one).",
    )
