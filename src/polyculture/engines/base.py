"""The one small interface every engine implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    n: int = 1


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


def create_engine(
    engine: str,
    model_name: str,
    *,
    seed: int = 0,
    dtype: str = "auto",
    max_model_len: int = 2048,
    base_dir: Any = ".",
) -> Engine:
    """Build an engine by name; imports are lazy so one engine's dependencies never load for the other."""
    from pathlib import Path

    from polyculture.engines.models import resolve_chat_model

    resolved = resolve_chat_model(model_name, Path(base_dir))
    if engine == "transformers":
        from polyculture.engines.transformers_engine import TransformersEngine

        return TransformersEngine(resolved, seed=seed, dtype=dtype)
    if engine == "vllm":
        from polyculture.engines.vllm_engine import VLLMEngine

        return VLLMEngine(resolved, seed=seed, dtype=dtype, max_model_len=max_model_len)
    raise EngineError(f"unknown engine '{engine}'; allowed: vllm, transformers")
