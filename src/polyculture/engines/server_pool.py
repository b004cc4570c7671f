"""A pool of OpenAI-compatible servers behind one engine: which server takes a request, retries, and server health.

- At most `max_concurrency` requests in flight per server. A request goes to the server with the fewest requests in
  flight among those with room (ties in turn), so a slow server never holds requests that a free one could take.
- A request that fails in a retryable way is retried at once on a server it has not failed on yet; only when every
  usable server has failed it does it back off and start over.
- A server whose attempts fail `failures_before_skip` times in a row (no answer, a timeout or a 5xx; a 429 is load,
  not ill health) gets no new requests for `skip_seconds`, then gets one request at a time: one more failure skips it
  again, a success puts it back in full. Health is judged from the requests themselves: there is no separate probe.
  When every server is being skipped, requests go to them anyway (and fail with the usual retries). A pool of one
  server never skips it.
- Each attempt is bounded by `request_timeout` seconds (the whole request, not only each read). Connection errors,
  timeouts, HTTP 429 and 5xx are retried `max_retries` times (every attempt counts, on whichever server) with
  exponential backoff and jitter (a Retry-After header is honoured, capped, when retrying on the server that sent it);
  any other 4xx fails at once. So is a 2xx answer that cannot be used (a body that is not JSON or is cut short, or
  one the caller's `check` refuses, e.g. without `choices`): a glitch of the server or of a proxy on the way, which
  counts against the server's health like a 5xx. What still fails raises EngineError naming the URL and the last
  error.
- The API key is sent as a bearer token and never written into an error message or a log line (`scrub`).

The pool's state is read and written only on the one event loop that runs its coroutines (`open` included).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from polyculture.engines.base import EngineError

log = logging.getLogger(__name__)

_RETRY_AFTER_CAP = 30.0

Payload = dict[str, Any]  # a request's or an answer's JSON object


class _RetryableError(Exception):
    """An attempt that failed in a way worth retrying (connection, timeout, 429, 5xx); args: (reason, retry_after)."""


class _TransportFailure(_RetryableError):
    """No HTTP answer at all: refused or broken connection, or a timeout."""


class _Throttled(_RetryableError):
    """HTTP 429: the server is busy, not unwell; it does not count towards skipping it."""


class _Malformed(_RetryableError):
    """A 2xx answer that cannot be used: not JSON, cut short, or refused by the caller's check."""


class _FatalError(Exception):
    """An attempt that failed in a way no retry can fix (a 4xx other than 429)."""


@dataclass(eq=False)
class Server:
    """One server's dispatch state."""

    url: str  # the base URL, without a trailing slash
    index: int  # its place in the pool (ties between equally loaded servers are broken in this order)
    in_flight: int = 0
    failures: int = 0  # attempts in a row that failed for the server's sake; a success resets it
    skip_until: float = 0.0  # time.monotonic() before which the server gets no new requests
    is_vllm: bool = False  # a vLLM server (set by the engine's start-up check)
    answered: int = 0


class ServerPool:
    """Servers of one model, with the settings that decide dispatch and retries (read at each use: they may change)."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        max_concurrency: int = 16,
        request_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
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
        self.urls = urls
        self.servers = [Server(url, i) for i, url in enumerate(urls)]
        self.max_concurrency = max_concurrency
        self.request_timeout = float(request_timeout)
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.failures_before_skip = failures_before_skip
        self.skip_seconds = float(skip_seconds)
        self._api_key = api_key
        self._transport = transport
        self._turn = 0  # where the next tie between equally loaded servers is broken
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        """Start the HTTP client, on the event loop that will run the requests."""
        self._wake = asyncio.Event()  # set (and replaced) whenever a slot frees up
        connections = self.max_concurrency * len(self.servers)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.request_timeout, connect=min(self.request_timeout, self.connect_timeout)),
            headers={"Authorization": f"Bearer {self._api_key or 'EMPTY'}"},
            transport=self._transport,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            follow_redirects=True,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def scrub(self, text: str) -> str:
        """`text` with the API key masked."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def states(self) -> list[dict[str, Any]]:
        """Per server: URL, requests answered, failures in a row, and whether it is being skipped now."""
        now = time.monotonic()
        return [
            {"url": s.url, "answered": s.answered, "failures": s.failures, "skipped": s.skip_until > now}
            for s in self.servers
        ]

    # -- requests --------------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        payload_for: Callable[[Server], Payload],
        check: Callable[[Payload], str | None] | None = None,
    ) -> tuple[Payload, Server]:
        """One request on whichever server has room (its payload may depend on the server); retried on another server
        at once, or with backoff when every usable server has failed it. `check` says what is wrong with an answer
        (None: usable); a refused answer is retried like a 5xx. Returns the answer and who gave it."""
        retries = self.max_retries
        attempt = 0
        backoffs = 0
        failed: set[Server] = set()  # servers this request failed on since its last backoff
        tried: list[str] = []
        while True:
            server = await self._acquire(failed)
            url = f"{server.url}{path}"
            if server.url not in tried:
                tried.append(server.url)
            failure: _RetryableError | None = None
            try:
                data = await self._attempt(method, url, payload_for(server))
                problem = check(data) if check is not None else None
                if problem is not None:
                    raise _Malformed(f"HTTP 200 with an unusable answer: {problem}")
                server.answered += 1
                return data, server
            except _FatalError as exc:  # the server answered: the request is at fault, not the server
                raise EngineError(self.scrub(f"{method} {url} failed: {exc}")) from None
            except _RetryableError as exc:
                failure = exc
            finally:
                self._release(server, failure)
            assert failure is not None  # the only way here
            failed.add(server)
            if attempt >= retries:
                where = f" (servers tried: {', '.join(tried)})" if len(tried) > 1 else ""
                raise EngineError(
                    self.scrub(
                        f"{method} {url} failed after {attempt + 1} attempt(s){where}; last error: {failure.args[0]}"
                    )
                ) from None
            attempt += 1
            now = time.monotonic()
            if any(s not in failed and s.skip_until <= now for s in self.servers):
                log.warning("%s", self.scrub(f"{method} {url}: {failure.args[0]}; retry {attempt}/{retries} elsewhere"))
                continue
            failed.clear()
            delay = self._backoff_delay(backoffs, _retry_after_of(failure))
            backoffs += 1
            log.warning(
                "%s", self.scrub(f"{method} {url}: {failure.args[0]}; retry {attempt}/{retries} in {delay:.2f} s")
            )
            await asyncio.sleep(delay)

    async def request_on(
        self, server: Server, method: str, path: str, payload: Payload | None = None, *, retry_transport: bool = True
    ) -> Payload:
        """One request on this one server, retried there with backoff (a start-up check must reach every server).
        Without `retry_transport`, a connection error or timeout fails at once."""
        url = f"{server.url}{path}"
        retries = self.max_retries
        attempt = 0
        while True:
            try:
                return await self._attempt(method, url, payload)
            except _FatalError as exc:
                raise EngineError(self.scrub(f"{method} {url} failed: {exc}")) from None
            except _RetryableError as exc:
                if attempt >= retries or (isinstance(exc, _TransportFailure) and not retry_transport):
                    raise EngineError(
                        self.scrub(f"{method} {url} failed after {attempt + 1} attempt(s); last error: {exc.args[0]}")
                    ) from None
                delay = self._backoff_delay(attempt, _retry_after_of(exc))
                log.warning(
                    "%s", self.scrub(f"{method} {url}: {exc.args[0]}; retry {attempt + 1}/{retries} in {delay:.2f} s")
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _attempt(self, method: str, url: str, payload: Payload | None) -> Payload:
        """One HTTP exchange, its failure sorted into retryable or fatal."""
        assert self._client is not None, "ServerPool.open() first"
        try:
            async with asyncio.timeout(self.request_timeout):
                response = await self._client.request(method, url, json=payload)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _TransportFailure(f"timed out after {self.request_timeout:g} s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _TransportFailure(f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 429:
            raise _Throttled(f"HTTP 429: {_body_excerpt(response)}", _retry_after(response))
        if response.status_code >= 500:
            raise _RetryableError(f"HTTP {response.status_code}: {_body_excerpt(response)}", _retry_after(response))
        if response.status_code >= 400:
            raise _FatalError(f"HTTP {response.status_code}: {_body_excerpt(response)}")
        try:
            data = response.json()
        except ValueError:
            raise _Malformed(
                f"HTTP {response.status_code} with a body that is not JSON: {_body_excerpt(response)}"
            ) from None
        if not isinstance(data, dict):
            raise _Malformed(f"HTTP {response.status_code} with unexpected JSON: {_body_excerpt(response)}")
        return data

    def _backoff_delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter: half the step fixed, half random; a server's Retry-After wins (capped)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), _RETRY_AFTER_CAP)
        step = min(self.backoff_max, self.backoff_base * (2**attempt))
        return step / 2 + random.uniform(0, step / 2)

    # -- choosing a server and keeping its health ------------------------------------------------------------------

    def _choose(self, avoid: set[Server]) -> Server | None:
        """The least loaded server with room, preferring servers not skipped and not in `avoid`; None: all full."""
        now = time.monotonic()
        live = [s for s in self.servers if s.skip_until <= now] or self.servers
        preferred = [s for s in live if s not in avoid] or live
        free = [s for s in preferred if s.in_flight < self._room(s)]
        if not free:
            return None
        count = len(self.servers)
        best = min(free, key=lambda s: (s.in_flight, (s.index - self._turn) % count))
        self._turn = (best.index + 1) % count
        return best

    def _room(self, server: Server) -> int:
        # A server back from being skipped gets one request until one succeeds, not a full batch to fail at once.
        if len(self.servers) > 1 and server.failures >= self.failures_before_skip:
            return 1
        return self.max_concurrency

    async def _acquire(self, avoid: set[Server]) -> Server:
        while (server := self._choose(avoid)) is None:
            # No await between the check and taking the current event: a release cannot slip in unseen.
            await self._wake.wait()
        server.in_flight += 1
        return server

    def _release(self, server: Server, failure: _RetryableError | None) -> None:
        server.in_flight -= 1
        if failure is None:
            server.failures = 0
        elif not isinstance(failure, _Throttled):
            server.failures += 1
            now = time.monotonic()
            if len(self.servers) > 1 and server.failures >= self.failures_before_skip and server.skip_until <= now:
                server.skip_until = now + self.skip_seconds
                log.warning(
                    "%s",
                    self.scrub(
                        f"{server.url}: {server.failures} failed attempts in a row (last: {failure.args[0]}); "
                        f"no new requests for {self.skip_seconds:g} s"
                    ),
                )
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()


def _retry_after_of(failure: _RetryableError) -> float | None:
    return failure.args[1] if len(failure.args) > 1 else None


def _body_excerpt(response: httpx.Response, limit: int = 300) -> str:
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
