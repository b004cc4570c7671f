"""The one small interface every engine implements."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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

    def sequence_logprobs(
        self, conversation: Conversation, continuations: list[str], *, mean_per_token: bool = False
    ) -> list[float]:
        """log p(continuation + end-of-turn | conversation) for each whole continuation; with `mean_per_token`, that
        sum divided by its token count (end-of-turn included): a score that does not fall with length."""
        ...

    def close(self) -> None: ...


class EngineError(RuntimeError):
    """An engine that cannot start or run; the message says why."""


def completions_as_finished(
    engine: Engine,
    conversations: list[Conversation],
    params: SamplingParams,
    json_schema: dict[str, Any] | None = None,
) -> Iterator[tuple[int, list[Completion]]]:
    """(index, its n completions) for each conversation, as soon as the engine finishes it when it can say so (an
    engine with `generate_as_finished`: vLLM), else all at the end in order; the same samples either way."""
    as_finished = getattr(engine, "generate_as_finished", None)
    if callable(as_finished):
        yield from as_finished(conversations, params, json_schema)
    else:
        yield from enumerate(engine.generate(conversations, params, json_schema=json_schema))


def in_order(finished: Iterable[tuple[int, list[Completion]]], count: int) -> list[list[Completion]]:
    """Completions handed back as they finished (index, completions), put back in the conversations' order."""
    results: list[list[Completion]] = [[] for _ in range(count)]
    for index, completions in finished:
        results[index] = completions
    return results
