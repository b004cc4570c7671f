"""A local stand-in for the Hugging Face Hub: the HTTP calls huggingface_hub makes to push and read a dataset repo.

In memory: users and their tokens, dataset repos (owner, private flag, commits, branches, tags) and LFS objects.
Commits are snapshots (path -> file), so a test can compare a repo before and after a failed push. Writes to a repo of
another owner get 403, an unknown token 401, a private repo of another owner looks missing (404), as on the Hub.
`fail_next(step)` makes the next request of a step ("lfs_upload", "commit", "preupload", "lfs_batch", "tag",
"create_repo") answer an error status (507 by default: huggingface_hub retries 429/5xx-gateway codes, not this one).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".parquet", ".arrow", ".png", ".jpg", ".zip", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


@dataclass
class Blob:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:  # what the Hub reports: git blob sha1, or the sha256 for an LFS file
        if self.lfs:
            return hashlib.sha256(self.content).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    date: str = field(default_factory=lambda: datetime.now(UTC).isoformat().replace("+00:00", "Z"))


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev) or rev
        return self.commits.get(oid)

    def head(self) -> Commit:
        return self.commits[self.branches["main"]]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubServer:
    """`with HubServer(tokens={...}) as hub:` serves on 127.0.0.1 (a free port) until the block ends."""

    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None) -> None:
        self.tokens = dict(tokens)  # token -> user name
        self.orgs = orgs or {}  # org -> member names
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path), for tests asking what was attempted
        self.failures: dict[str, int] = {}
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = False  # so server_close() joins the handler threads
        self.connections: set[socket.socket] = set()  # kept-alive client connections, closed at exit
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        for conn in list(self.connections):  # handler threads wait on kept-alive sockets: wake them to finish
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.httpd.server_close()  # joins the handler threads
        self.thread.join(timeout=10)

    def fail_next(self, step: str, status: int = 507) -> None:
        self.failures[step] = status

    def _maybe_fail(self, step: str) -> None:
        status = self.failures.pop(step, None)
        if status is not None:
            raise HubError(status, f"injected failure of {step}")

    # ---- helpers for tests --------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, owner: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, owner, private)
        self._commit(repo, None, "initial commit", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None, rev
        return {path: blob.content for path, blob in commit.files.items()}

    # ---- the protocol -------------------------------------------------------------------------------------------

    def _commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\0".encode())
        commit = Commit(digest.hexdigest(), parent, message, files)
        repo.commits[commit.oid] = commit
        repo.branches["main"] = commit.oid
        return commit

    def _user(self, headers: Any, required: bool) -> str | None:
        auth = headers.get("Authorization", "")
        if not auth:
            if required:
                raise HubError(401, "Invalid credentials in Authorization header")
            return None
        user = self.tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:  # never echo the token back
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: str | None, owner: str) -> bool:
        return user is not None and (user == owner or user in self.orgs.get(owner, []))

    def _repo(self, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(user, repo.owner)):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if write and not self._can_write(user, repo.owner):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _rev(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(unquote(rev))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Any:
        """Answer one request: a JSON-able value, or (status, headers, bytes) for raw replies."""
        self.requests.append((method, path))
        if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)):
            self._maybe_fail("lfs_upload")
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                raise HubError(400, "uploaded content does not match its oid")
            self.lfs[m["oid"]] = body
            return {}
        if method == "GET" and path == "/api/whoami-v2":
            user = self._user(headers, required=True)
            orgs = [{"name": org, "roleInOrg": "write"} for org, members in self.orgs.items() if user in members]
            return {"type": "user", "name": user, "orgs": orgs, "auth": {"accessToken": {"role": "write"}}}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            front = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
            if front is None or not isinstance(yaml.safe_load(front[1]), dict):
                message = "README.md metadata is not a YAML mapping"
                raise HubError(400, message, errors=[{"message": message}])
            return {"errors": [], "warnings": []}
        if method == "POST" and path == "/api/repos/create":
            user = self._user(headers, required=True)
            payload = json.loads(body)
            owner = payload.get("organization") or user
            repo_id = f"{owner}/{payload['name']}"
            self._maybe_fail("create_repo")
            if repo_id in self.repos:
                raise HubError(409, "You already created this dataset repo", url=f"{self.url}/datasets/{repo_id}")
            if not self._can_write(user, owner):
                raise HubError(403, f"You don't have the rights to create a dataset under the namespace {owner}")
            private = payload.get("private", payload.get("visibility") == "private")
            self.add_repo(repo_id, owner, private=bool(private))
            return {"url": f"{self.url}/datasets/{repo_id}", "name": repo_id}
        if m := re.fullmatch(rf"/api/datasets/{REPO}(?:/revision/{REV})?", path):
            repo = self._repo(m["repo"], self._user(headers, required=False))
            commit = self._rev(repo, m["rev"] or "main")
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            return {"id": repo.repo_id, "author": repo.owner, "sha": commit.oid, "private": repo.private,
                    "lastModified": commit.date, "siblings": siblings, "tags": []}  # fmt: skip
        if m := re.fullmatch(rf"/api/datasets/{REPO}/refs", path):
            repo = self._repo(m["repo"], self._user(headers, required=False))
            refs = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()]
            return {"branches": refs, "converts": [], "tags": tags, "pullRequests": []}
        if m := re.fullmatch(rf"/api/datasets/{REPO}/tree/{REV}(?P<path>/.*)?", path):
            repo = self._repo(m["repo"], self._user(headers, required=False))
            commit = self._rev(repo, m["rev"])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return _tree(commit, unquote(m["path"] or "").strip("/"), recursive)
        if method == "POST" and (m := re.fullmatch(rf"/api/datasets/{REPO}/paths-info/{REV}", path)):
            repo = self._repo(m["repo"], self._user(headers, required=False))
            commit = self._rev(repo, m["rev"])
            wanted = parse_qs(body.decode()).get("paths", [])
            entries = {e["path"]: e for e in _tree(commit, "", recursive=True)}
            return [entries[p] for p in wanted if p in entries]
        if method == "POST" and (m := re.fullmatch(rf"/api/datasets/{REPO}/preupload/{REV}", path)):
            repo = self._repo(m["repo"], self._user(headers, required=True), write=True)
            self._maybe_fail("preupload")
            current = repo.resolve(unquote(m["rev"]))
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                known = current.files.get(f["path"]) if current else None
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": known.oid if known else None})  # fmt: skip
            return {"files": files}
        if method == "POST" and (m := re.fullmatch(rf"/datasets/{REPO}\.git/info/lfs/objects/batch", path)):
            self._repo(m["repo"], self._user(headers, required=True), write=True)
            self._maybe_fail("lfs_batch")
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.lfs:  # already stored: no action, the client skips the upload
                    entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return {"transfer": "basic", "objects": objects}
        if method == "POST" and (m := re.fullmatch(rf"/api/datasets/{REPO}/commit/{REV}", path)):
            repo = self._repo(m["repo"], self._user(headers, required=True), write=True)
            self._maybe_fail("commit")
            return self._apply_commit(repo, unquote(m["rev"]), body)
        if method == "POST" and (m := re.fullmatch(rf"/api/datasets/{REPO}/tag/{REV}", path)):
            repo = self._repo(m["repo"], self._user(headers, required=True), write=True)
            self._maybe_fail("tag")
            tag = json.loads(body)["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._rev(repo, m["rev"]).oid
            return {}
        if method in ("GET", "HEAD") and (m := re.fullmatch(rf"/datasets/{REPO}/resolve/{REV}/(?P<path>.+)", path)):
            repo = self._repo(m["repo"], self._user(headers, required=False))
            commit = self._rev(repo, m["rev"])
            blob = commit.files.get(unquote(m["path"]))
            if blob is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            reply = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.oid}"', "Content-Type": "application/octet-stream"}
            return 200, reply, blob.content
        raise HubError(404, f"no route for {method} {path}")

    def _apply_commit(self, repo: Repo, rev: str, body: bytes) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if rev != "main":
            raise HubError(400, "this stand-in only commits to main")
        head = repo.head()
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = Blob(self.lfs[value["oid"]], lfs=True)
            elif line["key"] == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif line["key"] == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
        commit = self._commit(repo, head.oid, message, files)
        url = f"{self.url}/datasets/{repo.repo_id}/commit/{commit.oid}"
        return {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""}


def _tree(commit: Commit, folder: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = f"{folder}/" if folder else ""
    if folder and not any(p.startswith(prefix) for p in commit.files):
        raise HubError(404, f"{folder} does not exist", "EntryNotFound")
    entries: dict[str, dict[str, Any]] = {}
    for path, blob in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):  # the folders on the way
            sub = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(
                    sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(), "path": sub}
                )
        if recursive or len(parts) == 1:
            entry = {"type": "file", "oid": blob.oid, "size": len(blob.content), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.oid, "size": len(blob.content), "pointerSize": 134}
            entries[path] = entry
    return list(entries.values())


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall per call

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read their own output
            return None

        def setup(self) -> None:
            super().setup()
            server.connections.add(self.connection)

        def finish(self) -> None:
            server.connections.discard(self.connection)
            super().finish()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed file uploads
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            url = urlsplit(self.path)
            body = self._body()
            try:
                with server.lock:
                    reply = server.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
                status, headers, payload = reply if isinstance(reply, tuple) else (200, {}, json.dumps(reply).encode())
                headers = {"Content-Type": "application/json", **headers}
            except HubError as exc:
                status, payload = exc.status, json.dumps({"error": exc.message, **exc.extra}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Message": exc.message}
                if exc.code:
                    headers["X-Error-Code"] = exc.code
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_HEAD = _serve

    return Handler
