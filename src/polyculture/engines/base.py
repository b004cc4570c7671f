"""The one small interface every engine implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from polyculture.spec import ModelSpec

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    n: int = 1
    # The sampling stream of this one call: the same seed and the same conversations give the same completions,
    # whatever ran before (resume regenerates a missing shard exactly). None: continue the engine's own stream.
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one conversation."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@runtime_checkable
class Engine(Protocol):
    name: str
    model_name: str

    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> list[list[Completion]]:
        """n completions for each conversation, in order. With a JSON Schema, output is constrained to it."""
        ...

    def sequence_logprobs(self, conversation: Conversation, continuations: list[str]) -> list[float]:
        """log p(continuation + end-of-turn | conversation) for each whole continuation."""
        ...

    def close(self) -> None: ...


class EngineError(RuntimeError):
    """An engine that cannot start or run; the message says why."""


ADAPTER_WITH_SERVER = (
    "engine 'openai' cannot apply a local adapter: the server serves its own adapters. Load the adapter into the "
    "server (vLLM: --enable-lora --lora-modules NAME=FOLDER) and give that served name as model.name instead"
)


def create_engine(model: ModelSpec, *, seed: int = 0, base_dir: Path | str = ".") -> Engine:
    """Build the engine a spec's `model:` section describes; imports are lazy so one engine's dependencies never
    load for another."""
    from polyculture.engines.models import resolve_chat_model

    if model.engine == "transformers":
        from polyculture.engines.transformers_engine import TransformersEngine

        resolved = resolve_chat_model(model.name, Path(base_dir), adapter=model.adapter)
        return TransformersEngine(resolved, seed=seed, dtype=model.dtype)
    if model.engine == "vllm":
        from polyculture.engines.vllm_engine import VLLMEngine, VLLMParallel

        resolved = resolve_chat_model(model.name, Path(base_dir), adapter=model.adapter)
        return VLLMEngine(
            resolved,
            seed=seed,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            parallel=VLLMParallel(
                tensor=model.tensor_parallel_size,
                pipeline=model.pipeline_parallel_size,
                data=model.data_parallel_size,
                gpu_memory_utilization=model.gpu_memory_utilization,
            ),
            engine_args=model.engine_args,
        )
    if model.engine == "openai":
        from polyculture.engines.openai_engine import OpenAIEngine

        if model.adapter is not None:
            raise EngineError(ADAPTER_WITH_SERVER)
        if not model.base_urls:
            raise EngineError("engine 'openai' needs base_url (the server's URL, e.g. http://127.0.0.1:8000/v1)")
        return OpenAIEngine(
            model.name,
            base_url=model.base_urls,
            api_key_env=model.api_key_env,
            max_concurrency=model.max_concurrency,
            request_timeout=model.request_timeout,
            max_retries=model.max_retries,
            seed=seed,
        )
    raise EngineError(f"unknown engine '{model.engine}'; allowed: vllm, transformers, openai")
