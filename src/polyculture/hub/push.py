"""hub: push a published dataset folder to a Hugging Face Hub dataset repo, in one commit tagged with the run id.

One push = every file of the dataset folder (data, card, report, plots) added and every other file of the repo's
main deleted (bar `.gitattributes`, which the Hub manages), in a single commit: huggingface_hub uploads the large
files first and only then posts the commit, so a failure before the commit leaves the repo as it was. The commit
then gets the run id as its tag, and a run whose tag exists is refused before anything is uploaded.

The token comes from the environment variable `hub.token_env` (HF_TOKEN by default) or the usual Hugging Face login
(`hf auth login`); it is passed to huggingface_hub only, and no message here ever contains it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from pydantic import ValidationError

from polyculture import __version__, progress
from polyculture.spec import HubSpec, PublishSpec

KEEP_REMOTE = {".gitattributes"}  # the Hub writes it at creation; LFS routing depends on it
# Git refuses these in ref names; a run id is a folder name, so check before uploading anything.
_BAD_TAG = re.compile(r"(^[.-])|(\.\.)|([\x00-\x20~^:?*\[\\/])|(@\{)|(\.lock$)|(\.$)")


class HubError(RuntimeError):
    """The push could not be done; the message says why and what to do. exit_code is the CLI's exit status."""

    exit_code = 8


class HubInputError(HubError):
    """Nothing to push: no such run folder, no repo named, a run id that cannot be a tag."""

    exit_code = 2


class HubAuthError(HubError):
    """No token, or the Hub rejected it."""

    exit_code = 4


class HubPermissionError(HubError):
    """The token cannot write to that repo (another owner's, or a read-only token)."""

    exit_code = 5


class HubUnreachable(HubError):
    """The Hub could not be reached (connection refused, DNS, timeout, connection dropped)."""

    exit_code = 6


class HubConflict(HubError):
    """This run is already published (its tag exists), or the repo moved on during the push."""

    exit_code = 7


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_url: str
    endpoint: str
    user: str
    private: bool | None  # the repo's visibility after the push (an existing repo keeps its own)
    run_id: str
    commit_oid: str
    commit_url: str
    parent_oid: str | None
    tag: str | None
    files: list[str]
    deleted: list[str]
    bytes: int
    unchanged: bool  # the repo already held exactly these files: no new commit, the tag points at the old one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunToPublish:
    run_dir: Path
    dataset_dir: Path
    run_id: str
    hub: HubSpec | None  # publish.hub of the run's spec.yaml


# ---- token --------------------------------------------------------------------------------------------------------


def resolve_token(hub: HubSpec) -> str:
    """The variable named by hub.token_env, else HF_TOKEN, else the `hf auth login` token file."""
    token = os.environ.get(hub.token_env, "").strip()
    if not token:
        try:
            token = get_token() or ""
        except (OSError, ValueError, HfHubHTTPError):  # an OIDC exchange set up but failing: no token, same advice
            token = ""
    if not token:
        where = "HF_TOKEN" if hub.token_env == "HF_TOKEN" else f"{hub.token_env} (or HF_TOKEN)"
        raise HubAuthError(f"no Hugging Face token: set {where} or run `hf auth login`")
    return token


def hub_endpoint(hub: HubSpec) -> str:
    # HF_ENDPOINT read now, not at huggingface_hub's import, so a later setting (or a test server) counts.
    return (hub.endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@contextmanager
def _online() -> Iterator[None]:
    # The CLI and tests set HF_HUB_OFFLINE=1 so nothing reaches out by accident; a push is the deliberate exception.
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


# ---- the run folder -----------------------------------------------------------------------------------------------


def locate_run(run_dir: Path) -> RunToPublish:
    """The dataset folder, run id and publish.hub of a finished run folder (outputs/<dataset>/<run-id>/)."""
    run_dir = Path(run_dir)
    result_file = run_dir / "result.json"
    if not result_file.is_file():
        raise HubInputError(f"'{run_dir}' is not a finished run folder (no result.json); build it first")
    try:
        result = yaml.safe_load(result_file.read_text())  # JSON is YAML
        run_id, dataset_dir = str(result["run_id"]), Path(result["dataset_dir"])
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise HubInputError(f"'{result_file}' is not a build result (needs run_id and dataset_dir): {exc}") from None
    # The run folder may have moved since the build: the dataset folder is looked up inside it first.
    inside = run_dir / dataset_dir.name
    dataset_dir = inside if inside.is_dir() else dataset_dir
    return RunToPublish(run_dir, dataset_dir, run_id, _spec_hub(run_dir / "spec.yaml"))


def _spec_hub(spec_file: Path) -> HubSpec | None:
    # Only publish.*: the whole spec would need the record schema and models it was built with, next to it.
    if not spec_file.is_file():
        return None
    try:
        data = yaml.safe_load(spec_file.read_text()) or {}
        section = (data.get("publish") or {}) if isinstance(data, dict) else {}
        return PublishSpec.model_validate(section).hub
    except yaml.YAMLError as exc:
        raise HubInputError(f"'{spec_file}' is not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise HubInputError(f"'{spec_file}': {_validation_message(exc, 'publish')}") from None


def _validation_message(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join([prefix, *(str(p) for p in err["loc"])])
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def hub_settings(hub: HubSpec | None, repo: str | None = None, private: bool | None = None) -> HubSpec:
    """publish.hub with the command line's --repo / --private / --public on top."""
    if hub is None and repo is None:
        raise HubInputError("no repo to publish to: pass --repo owner/name or set publish.hub.repo_id in the spec")
    fields = hub.model_dump() if hub is not None else {}
    if repo is not None:
        fields["repo_id"] = repo
    if private is not None:
        fields["private"] = private
    try:
        return HubSpec.model_validate(fields)
    except ValidationError as exc:
        raise HubInputError(_validation_message(exc, "repo" if repo is not None else "publish.hub")) from None


def dataset_files(dataset_dir: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) for every file of the dataset folder, hidden ones (editor, OS litter) excepted."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "README.md").is_file() or not any((dataset_dir / "data").glob("*.parquet")):
        raise HubInputError(
            f"'{dataset_dir}' is not a published dataset folder (needs README.md and data/*.parquet); "
            "run the build (its publish stage writes it) first"
        )
    files = []
    for path in sorted(dataset_dir.rglob("*")):
        rel = path.relative_to(dataset_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path))
    return files


# ---- the push -----------------------------------------------------------------------------------------------------


def preflight(hub: HubSpec, token: str | None = None) -> str:
    """Check the token and the write access to hub.repo_id without changing anything; return the user name.

    A build with publish.hub.push_on_build calls this before generating, so a bad token fails in seconds.
    """
    token = token or resolve_token(hub)
    endpoint = hub_endpoint(hub)
    with _online(), _mapped_errors(hub, endpoint, token, "checking the token"):
        return _check_access(_api(endpoint), hub, token)


def push_dataset(dataset_dir: Path, hub: HubSpec, *, run_id: str, token: str | None = None) -> PushResult:
    """Push dataset_dir to the dataset repo hub.repo_id in one commit, tagged run_id if hub.tag (see the module doc)."""
    files = dataset_files(dataset_dir)
    tag = run_id if hub.tag else None
    if tag is not None and _BAD_TAG.search(tag):
        raise HubInputError(f"run id '{run_id}' cannot be a git tag; publish with tag: false or rename the run")
    token = token or resolve_token(hub)
    endpoint = hub_endpoint(hub)
    api = _api(endpoint)
    repo = hub.repo_id
    steps = 4
    with _online():
        with _mapped_errors(hub, endpoint, token, "checking the token"):
            progress.report("push", 0, steps, f"token for {endpoint}")
            user = _check_access(api, hub, token)
        with _mapped_errors(hub, endpoint, token, "opening the repo"):
            progress.report("push", 1, steps, f"repo {repo}")
            repo_url = api.create_repo(repo, repo_type="dataset", private=hub.private, exist_ok=True, token=token)
            info = api.dataset_info(repo, token=token)
            if tag is not None:
                existing = {
                    ref.name: ref.target_commit
                    for ref in api.list_repo_refs(repo, repo_type="dataset", token=token).tags
                }
                if tag in existing:
                    raise HubConflict(
                        f"run {run_id} is already published to {repo} (tag {tag} -> commit {existing[tag][:12]}); "
                        "a run is published once: build a new run to publish again"
                    )
            remote = (
                set(api.list_repo_files(repo, repo_type="dataset", revision=info.sha, token=token))
                if info.sha
                else set()
            )
        local = {rel for rel, _ in files}
        stale = sorted(remote - local - KEEP_REMOTE)
        operations: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        size = sum(path.stat().st_size for _, path in files)
        summary = f"polyculture run {run_id}: {len(files)} files ({size:,} bytes), {len(stale)} deleted"
        with _mapped_errors(hub, endpoint, token, "uploading and committing"):
            progress.report("push", 2, steps, f"{len(files)} files, {size:,} bytes")
            commit = api.create_commit(
                repo,
                operations,
                repo_type="dataset",
                commit_message=f"Publish run {run_id}",
                commit_description=summary,
                parent_commit=info.sha,  # a push by someone else in between makes the Hub refuse, not merge
                token=token,
            )
        if tag is not None:
            with _mapped_errors(hub, endpoint, token, f"tagging commit {commit.oid[:12]}"):
                progress.report("push", 3, steps, f"tag {tag}")
                api.create_tag(repo, tag=tag, revision=commit.oid, tag_message=f"polyculture run {run_id}",
                               repo_type="dataset", token=token)  # fmt: skip
        with _mapped_errors(hub, endpoint, token, "reading the repo back"):
            private = api.dataset_info(repo, token=token).private
    progress.report("push", steps, steps, "done")
    return PushResult(
        repo_id=repo,
        repo_url=str(repo_url),
        endpoint=endpoint,
        user=user,
        private=private,
        run_id=run_id,
        commit_oid=commit.oid,
        commit_url=str(commit.commit_url),
        parent_oid=info.sha,
        tag=tag,
        files=sorted(local),
        deleted=stale,
        bytes=size,
        unchanged=commit.oid == info.sha,
    )


def pushed_before(dataset_dir: Path, hub: HubSpec, *, run_id: str, token: str | None = None) -> PushResult | None:
    """The push of `run_id` already on the Hub (its tag exists and holds exactly dataset_dir's files), else None.

    A build killed after its push but before result.json recorded it resumes to push: this tells it the push was
    made, so the run is not refused as already published, nor pushed twice."""
    if not hub.tag:
        return None  # without a tag a push leaves no mark of its run
    files = dataset_files(dataset_dir)
    token = token or resolve_token(hub)
    endpoint = hub_endpoint(hub)
    api = _api(endpoint)
    with _online(), _mapped_errors(hub, endpoint, token, "looking for this run's tag"):
        user = _check_access(api, hub, token)
        if not api.repo_exists(hub.repo_id, repo_type="dataset", token=token):
            return None
        tags = {ref.name: ref.target_commit for ref in api.list_repo_refs(hub.repo_id, repo_type="dataset", token=token).tags}
        if run_id not in tags:
            return None
        remote = set(api.list_repo_files(hub.repo_id, repo_type="dataset", revision=tags[run_id], token=token))
        info = api.dataset_info(hub.repo_id, token=token)
    local = sorted(rel for rel, _ in files)
    if remote - KEEP_REMOTE != set(local):
        return None  # the tag holds other files: push_dataset refuses it as published, and says so
    commit = tags[run_id]
    return PushResult(
        repo_id=hub.repo_id, repo_url=f"{endpoint}/datasets/{hub.repo_id}", endpoint=endpoint, user=user,
        private=info.private, run_id=run_id, commit_oid=commit,
        commit_url=f"{endpoint}/datasets/{hub.repo_id}/commit/{commit}", parent_oid=None, tag=run_id, files=local,
        deleted=[], bytes=sum(path.stat().st_size for _, path in files), unchanged=True,
    )  # fmt: skip


def _api(endpoint: str) -> HfApi:
    return HfApi(endpoint=endpoint, library_name="polyculture", library_version=__version__)


def _check_access(api: HfApi, hub: HubSpec, token: str) -> str:
    """whoami, then refuse a namespace the token cannot write to before anything is created or uploaded."""
    who = api.whoami(token=token)
    user = str(who.get("name", ""))
    owner, name = hub.repo_id.split("/")
    # The Hub resolves names regardless of case.
    roles = {str(org.get("name")).casefold(): org.get("roleInOrg") for org in who.get("orgs") or []}
    orgs = [str(org.get("name")) for org in who.get("orgs") or []]
    token_role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if token_role == "read":
        raise HubPermissionError(
            f"the token (user '{user}') is read-only; create one with write access at {api.endpoint}/settings/tokens"
        )
    if owner.casefold() != user.casefold() and owner.casefold() not in roles:
        raise HubPermissionError(
            f"repo {hub.repo_id} belongs to '{owner}', and the token is for '{user}', who cannot write there "
            f"(it can write to: {', '.join([user, *orgs])}); use --repo {user}/{name} or a token of '{owner}'"
        )
    if roles.get(owner.casefold()) == "read":
        raise HubPermissionError(
            f"'{user}' has only read access to the organisation '{owner}'; no write access to {hub.repo_id}"
        )
    return user


@contextmanager
def _mapped_errors(hub: HubSpec, endpoint: str, token: str, step: str) -> Iterator[None]:
    """huggingface_hub and transport errors -> HubError subclasses with a message that never holds the token."""
    try:
        yield
    except HubError as exc:
        raise type(exc)(_scrub(str(exc), token)) from None
    except Exception as exc:  # classified below; re-raised as is when it is not a Hub failure
        mapped = _classify(exc, hub, endpoint, step)
        if mapped is None:
            raise
        raise type(mapped)(_scrub(str(mapped), token)) from None


def _classify(exc: BaseException, hub: HubSpec, endpoint: str, step: str) -> HubError | None:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:  # upload errors arrive wrapped in a RuntimeError
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    transport = next((e for e in chain if isinstance(e, _transport_errors())), None)
    repo, owner = hub.repo_id, hub.repo_id.split("/")[0]
    if http is None and transport is not None:
        detail = f"{type(transport).__name__}: {transport}".rstrip(": ")
        hint = " (run the command again: files already uploaded are not sent twice)" if "commit" in step else ""
        return HubUnreachable(f"cannot reach the Hub at {endpoint} while {step}: {detail}{hint}")
    if isinstance(exc, ValueError) and str(exc).startswith("Invalid metadata in README.md"):
        # Checked by the Hub before any upload: nothing was sent.
        detail = " ".join(str(exc).split("\n")[1:]).strip() or "no detail"
        return HubError(f"the Hub at {endpoint} refused the dataset card's YAML metadata (README.md): {detail}")
    if http is None:
        return None
    status = http.response.status_code
    server = (getattr(http, "server_message", None) or "").strip() or str(http).strip().splitlines()[0]
    if exc is not http and str(exc):  # the wrapper names the file whose upload failed
        server = f"{exc} {server}"
    # The Hub answered: an upload or the commit it refused means no commit was made.
    after = "; nothing of this run was committed" if "committing" in step else ""
    if "tagging" in step:
        after = "; the data is on the Hub untagged: run the command again to tag it (nothing is uploaded twice)"
    if status == 401:
        return HubAuthError(
            f"the Hub at {endpoint} rejected the token (401 Unauthorized) while {step}; create a token with write "
            f"access at {endpoint}/settings/tokens and set {hub.token_env} or run `hf auth login`"
        )
    if status == 403:
        return HubPermissionError(
            f"no write access to dataset repo {repo} (owner '{owner}') while {step}: {server}{after}"
        )
    if status == 404 and "opening" in step:
        return HubPermissionError(
            f"dataset repo {repo} cannot be seen with this token while {step} (a private repo of '{owner}'?): {server}"
        )
    if status in (409, 412):
        return HubConflict(f"{repo} changed while {step} ({status}: {server}){after}")
    return HubError(f"the Hub at {endpoint} answered {status} while {step} for {repo}: {server}{after}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x speaks httpx, 2.x its fork httpx2: whichever is installed raises these on a lost connection.
    kinds = []
    for name in ("httpx2", "httpx"):
        try:
            kinds.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(kinds)


def _scrub(message: str, token: str) -> str:
    return message.replace(token, "***") if token else message
