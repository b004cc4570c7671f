"""Servers that misbehave on cue, for build-level fault tests.

`FaultProxy`: a stdlib HTTP proxy in front of a real OpenAI-compatible server (vLLM serving the embedded model). It
forwards every request unchanged unless its script says otherwise for the next chat request: answer HTTP 500, hang
(answer nothing until released), answer 200 with a body that is not JSON / JSON without `choices` / JSON cut short /
fewer bytes than its Content-Length, hold it until the test releases it, or die (stop listening; every later request is refused until `revive`). It keeps
its port across a death, so a build's spec (and its fingerprint) still names it when it comes back.

`RecordServer`: a canned OpenAI-compatible server for tests where the text does not matter (locks, concurrency): every
choice is a schema-valid biography record, varied by a counter. `hold()` keeps chat requests waiting until `release()`,
so a test can keep a build in the middle of its generation for as long as it needs.

`start_prefect_server` / `stop_group`: a real `prefect server start` of a test's own, and stopping a process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

HANG_LIMIT_SECONDS = 300  # a hung answer gives up by itself after this, so a failed test never leaves a thread behind

# What the proxy can do to one chat request instead of forwarding it.
FAULTS = ("500", "hang", "not_json", "no_choices", "cut_json", "short_body", "die", "hold")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """A ThreadingHTTPServer on one fixed port that can be stopped and started again on that port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._httpd: ThreadingHTTPServer | None = None
        self._state = threading.Lock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> None:
        with self._state:
            if self._httpd is not None:
                return
            httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
            self._httpd = httpd

    def stop(self) -> None:
        """Stop listening: connections are refused from now on (requests already being answered finish)."""
        with self._state:
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    @property
    def alive(self) -> bool:
        return self._httpd is not None

    @staticmethod
    def reply(handler: BaseHTTPRequestHandler, code: int, body: bytes, *, length: int | None = None) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class FaultProxy(_Server):
    """See the module docstring. `script` holds the faults for the next chat requests, in order; `die_after(n)`
    forwards n more chat requests and dies on the one after; `served` lists what every chat request got."""

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/").removesuffix("/v1")
        self.lock = threading.Lock()
        self.script: list[str] = []
        self.served: list[str] = []  # per chat request: "forward" or the fault it got
        self.hang_all = False  # every chat request hangs (until release_hung)
        self._forwards_left: int | None = None  # die_after: forwards before the proxy dies
        self.dead = False  # died and not revived: whatever still reaches it gets its connection closed
        self._unhang = threading.Event()
        self._unhold = threading.Event()
        self.client = httpx.Client(timeout=120)
        self.start()

    def die_after(self, forwards: int) -> None:
        with self.lock:
            self._forwards_left = forwards

    def release_hung(self) -> None:
        self._unhang.set()

    def release_held(self) -> None:
        self._unhold.set()

    def revive(self) -> None:
        with self.lock:
            self._forwards_left = None
            self.script = []
            self.hang_all = False
            self.dead = False
        self.start()

    def close(self) -> None:
        self.release_hung()
        self.release_held()
        self.stop()
        self.client.close()

    def _next(self) -> str:
        with self.lock:
            if self.dead:
                action = "die"
            elif self._forwards_left is not None:
                if self._forwards_left == 0:
                    self._forwards_left = None
                    self.dead = True
                    action = "die"
                else:
                    self._forwards_left -= 1
                    action = "forward"
            elif self.hang_all:
                action = "hang"
            else:
                action = self.script.pop(0) if self.script else "forward"
            self.served.append(action)
            return action

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if proxy.dead:
                    self.close_connection = True
                    return
                proxy._forward(self, None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.path.endswith("/chat/completions"):
                    proxy._forward(self, body)
                    return
                proxy._chat(self, body)

        return Handler

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes | None) -> httpx.Response:
        upstream = self.client.request(
            handler.command, self.upstream + handler.path, content=body, headers={"Content-Type": "application/json"}
        )
        self.reply(handler, upstream.status_code, upstream.content)
        return upstream

    def _chat(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        action = self._next()
        if action == "hold":  # forwarded once the test lets it go: the build waits mid-generation meanwhile
            self._unhold.wait(HANG_LIMIT_SECONDS)
            action = "forward"
        if action == "forward":
            self._forward(handler, body)
            return
        if action == "die":
            # The server goes away with this request unanswered: the client sees its connection closed.
            threading.Thread(target=self.stop, daemon=True).start()
            handler.close_connection = True
            return
        if action == "hang":
            self._unhang.wait(HANG_LIMIT_SECONDS)
            handler.close_connection = True
            return
        if action == "500":
            self.reply(handler, 500, b'{"error": {"message": "internal error (injected)"}}')
            return
        # The rest are answered 200 from a real answer, spoiled on the way back.
        upstream = self.client.post(self.upstream + handler.path, content=body,
                                    headers={"Content-Type": "application/json"})  # fmt: skip
        text = upstream.content
        if action == "not_json":
            self.reply(handler, 200, b"<html><body>502 Bad Gateway (injected)</body></html>")
        elif action == "no_choices":
            data = upstream.json()
            data.pop("choices", None)
            self.reply(handler, 200, json.dumps(data).encode())
        elif action == "cut_json":
            self.reply(handler, 200, text[: len(text) // 2])
        elif action == "short_body":  # promises the whole body, sends half, hangs up
            self.reply(handler, 200, text[: len(text) // 2], length=len(text))
            handler.close_connection = True
        else:
            raise AssertionError(f"unknown fault {action!r}; known: {FAULTS}")


_FIRST = ["Ada", "Bruno", "Chiara", "Dmitri", "Esi", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
_LAST = ["Moreau", "Okafor", "Lindqvist", "Tanaka", "Silva", "Novak", "Haddad", "Kowalski", "Reyes", "Byrne"]
_PLACES = ["a fishing village", "a mountain town", "a desert oasis", "a river port", "an island", "a mining city",
           "a border market", "a university town", "a rice terrace valley", "a northern harbour"]  # fmt: skip
_DEEDS = ["mapped forgotten caves", "raised rare goats", "repaired clock towers", "taught night classes",
          "collected folk songs", "built a solar kiln", "ran a floating clinic", "bred frost-proof wheat",
          "wrote a dictionary of whistles", "restored a lighthouse", "trained rescue dogs", "kept bees on rooftops"]  # fmt: skip


def canned_record(count: int, occupation: str) -> dict[str, Any]:
    """A biography record that fits the tests' small schema; neighbouring counts share few words."""
    name = f"{_FIRST[count % len(_FIRST)]} {_LAST[(count // len(_FIRST)) % len(_LAST)]}"
    bio = (
        f"{name} grew up in {_PLACES[(count * 7) % len(_PLACES)]} and {_DEEDS[(count * 5) % len(_DEEDS)]}; "
        f"later {_DEEDS[(count * 11 + 3) % len(_DEEDS)]}."
    )
    return {"name": name, "birth_year": 1900 + (count * 37) % 106, "occupation": occupation, "bio": bio[:200]}


class RecordServer(_Server):
    """GET /v1/models and POST /v1/chat/completions answered with canned records (see `canned_record`)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.lock = threading.Lock()
        self.count = 0
        self.chats = 0  # chat requests received (held ones included)
        self._open = threading.Event()
        self._open.set()
        self.start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.release()
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                entry = {"id": server.model, "object": "model", "owned_by": "canned"}
                server.reply(self, 200, json.dumps({"object": "list", "data": [entry]}).encode())

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                server._chat(self, request)

        return Handler

    def _chat(self, handler: BaseHTTPRequestHandler, request: dict[str, Any]) -> None:
        with self.lock:
            self.chats += 1
        self._open.wait(HANG_LIMIT_SECONDS)
        user = next(m["content"] for m in request["messages"] if m["role"] == "user")
        occupation = next((word for word in ("doctor", "farmer") if word in user), "teacher")
        with self.lock:
            first, self.count = self.count, self.count + request.get("n", 1)
        texts = [json.dumps(canned_record(first + i, occupation)) for i in range(request.get("n", 1))]
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                   for i, t in enumerate(texts)]  # fmt: skip
        usage = {"prompt_tokens": len(user.split()), "completion_tokens": sum(len(t.split()) for t in texts)}
        self.reply(handler, 200, json.dumps({"object": "chat.completion", "choices": choices, "usage": usage}).encode())


def start_prefect_server(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`prefect server start` on a free port with its own PREFECT_HOME, in its own process group; (process, API URL)
    once healthy. Stop it with `stop_group`."""
    import pytest

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    with (home / "server.log").open("w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"the Prefect server exited with {server.returncode}: {(home / 'server.log').read_text()[-2000:]}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_group(server)
    pytest.fail(f"the Prefect server was not healthy within 240 s (log: {home / 'server.log'})")


def stop_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> list[int]:
    """Stop a process we started in its own group, and everything in that group; returns pids still running."""
    import psutil

    family = [proc.pid]
    try:
        family += [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not left:
            return []
        time.sleep(0.25)
    return left
