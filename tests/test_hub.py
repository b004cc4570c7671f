"""push_dataset and `polyculture publish` against a local server speaking the Hub's protocol, through the real
huggingface_hub client: one commit per run, a tag per run, stale files removed, clear errors, nothing partial, and
the token never in any output."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
import yaml
from hub_server import HubServer
from huggingface_hub import DatasetCard, HfApi, constants, snapshot_download
from test_publish import card_body, final_frame, make_spec, report_dir, spec_dict
from typer.testing import CliRunner

from polyculture.cli import app
from polyculture.hub.push import (
    HubAuthError,
    HubConflict,
    HubError,
    HubInputError,
    HubPermissionError,
    HubUnreachable,
    hub_settings,
    locate_run,
    preflight,
    push_dataset,
    resolve_token,
)
from polyculture.spec import HubSpec
from polyculture.stages.publish import publish_local

ALICE = "hf_aliceTOKEN0123456789abcdefSECRET"  # distinctive: searched for in every output
BOB = "hf_bobTOKEN9876543210zyxwvuSECRET"
WRONG = "hf_wrongTOKEN5555555555555555SECRET"
# huggingface_hub 2.x streams LFS uploads with httpx2's deprecated data=<file>: its warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
WRITES = ("/preupload/", "/info/lfs/objects/batch", "/lfs-upload/", "/commit/", "/tag/")


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain LFS uploads: the stand-in speaks no Xet
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # no login of the user's
    for name in ("HF_TOKEN", "HF_ENDPOINT", "POLY_HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with HubServer({ALICE: "alice", BOB: "bob"}, orgs={"lab": ["alice"]}) as hub:
        yield hub


def dataset(tmp_path: Path, run_id: str, rows: int = 3, extra: dict[str, bytes] | None = None) -> Path:
    """A dataset folder as publish_local writes it (from a hand-made frame), plus any extra files."""
    work = tmp_path / "work" / run_id
    work.mkdir(parents=True)
    report, rdir = report_dir(work)
    report["run_id"] = run_id
    spec, frame = make_spec(work), final_frame()[:rows]
    out = publish_local(spec, frame, card_body(spec, report, rdir, frame), rdir, tmp_path / run_id / f"people-{run_id}")
    for rel, content in (extra or {}).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(content)
    return out


def closed_port() -> int:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def download(hub: HubServer, repo_id: str, revision: str, dest: Path) -> Path:
    """The repo at a revision, fetched back with the real client (offline mode lifted for the call)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        folder = snapshot_download(
            repo_id, repo_type="dataset", revision=revision, endpoint=hub.url, token=ALICE, local_dir=dest
        )
    shutil.rmtree(Path(folder) / ".cache", ignore_errors=True)  # the client's own bookkeeping
    return Path(folder)


def hub_spec(hub: HubServer, repo_id: str = "alice/people", **fields: object) -> HubSpec:
    return HubSpec.model_validate({"repo_id": repo_id, "endpoint": hub.url, **fields})


def test_push_then_read_back_with_the_real_client(server: HubServer, tmp_path: Path) -> None:
    folder = dataset(tmp_path, "run-1")
    result = push_dataset(folder, hub_spec(server), run_id="run-1", token=ALICE)

    repo = server.repos["alice/people"]
    assert result.user == "alice" and result.repo_id == "alice/people" and result.private is True and repo.private
    assert result.tag == "run-1" and repo.tags == {"run-1": result.commit_oid} == {"run-1": repo.branches["main"]}
    assert result.files == sorted(local_files(folder)) and result.deleted == [] and not result.unchanged
    assert result.bytes == sum(len(b) for b in local_files(folder).values())
    commit = repo.commits[result.commit_oid]
    assert commit.parent == result.parent_oid and repo.commits[commit.parent].parent is None  # one commit on creation
    assert commit.message.startswith("Publish run run-1")
    assert result.commit_url == f"{server.url}/datasets/alice/people/commit/{result.commit_oid}"
    # Data and images went through LFS, the card and reports as regular files; all under the one commit.
    assert {p for p, blob in commit.files.items() if blob.lfs} == {
        "data/train-00000-of-00001.parquet",
        "plots/attribute_job.png",
    }

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        api = HfApi(endpoint=server.url, token=ALICE)
        tree = {e.path for e in api.list_repo_tree("alice/people", repo_type="dataset", revision="run-1")}
        info = api.get_paths_info("alice/people", ["data/train-00000-of-00001.parquet"], repo_type="dataset")
    assert tree == {".gitattributes", "README.md", "report.json", "report.md", "data", "plots"}
    assert info[0].lfs is not None and info[0].size == (folder / "data/train-00000-of-00001.parquet").stat().st_size

    back = download(server, "alice/people", "run-1", tmp_path / "back")
    assert local_files(back) == {
        **local_files(folder),
        ".gitattributes": server.files("alice/people")[".gitattributes"],
    }
    cache = str(tmp_path / "hf-cache")
    pushed = datasets.load_dataset(str(back), split="train", cache_dir=cache)
    built = datasets.load_dataset(str(folder), split="train", cache_dir=cache)
    assert pushed.num_rows == 3 and pushed.to_list() == built.to_list()
    assert DatasetCard.load(back / "README.md").data.to_dict() == DatasetCard.load(folder / "README.md").data.to_dict()


def test_second_run_is_a_new_tagged_commit_without_stale_files(server: HubServer, tmp_path: Path) -> None:
    first = dataset(tmp_path, "run-1", extra={"data/train-old-shard.parquet": b"PAR1 stale shard"})
    second = dataset(tmp_path, "run-2", rows=2)
    one = push_dataset(first, hub_spec(server), run_id="run-1", token=ALICE)
    uploads_before = [p for m, p in server.requests if m == "PUT"]
    two = push_dataset(second, hub_spec(server), run_id="run-2", token=ALICE)

    repo = server.repos["alice/people"]
    assert two.parent_oid == one.commit_oid and repo.commits[two.commit_oid].parent == one.commit_oid
    assert two.deleted == ["data/train-old-shard.parquet"]
    assert server.files("alice/people") == {
        **local_files(second),
        ".gitattributes": server.files("alice/people")[".gitattributes"],
    }
    assert repo.tags == {"run-1": one.commit_oid, "run-2": two.commit_oid}
    assert "data/train-old-shard.parquet" in server.files("alice/people", "run-1")  # history keeps the first run
    # The identical plot was not uploaded again: one new LFS object, the new parquet shard.
    assert len([p for m, p in server.requests if m == "PUT"]) - len(uploads_before) == 1
    back = download(server, "alice/people", "main", tmp_path / "back")
    assert datasets.load_dataset(str(back), split="train", cache_dir=str(tmp_path / "c")).num_rows == 2


def test_visibility_on_create_and_existing_repo_kept(server: HubServer, tmp_path: Path) -> None:
    folder = dataset(tmp_path, "run-1")
    public = push_dataset(folder, hub_spec(server, "alice/open", private=False), run_id="run-1", token=ALICE)
    assert public.private is False and server.repos["alice/open"].private is False
    server.add_repo("alice/secret", owner="alice", private=True)
    kept = push_dataset(folder, hub_spec(server, "alice/secret", private=False), run_id="run-1", token=ALICE)
    assert kept.private is True and server.repos["alice/secret"].private is True
    org = push_dataset(folder, hub_spec(server, "lab/people"), run_id="run-1", token=ALICE)  # alice is in "lab"
    assert org.user == "alice" and server.repos["lab/people"].owner == "lab"


def test_token_sources_and_missing_token(server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = dataset(tmp_path, "run-1")
    with pytest.raises(HubAuthError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push_dataset(folder, hub_spec(server), run_id="run-1")
    with pytest.raises(HubAuthError, match=r"set POLY_HF_TOKEN \(or HF_TOKEN\) or run `hf auth login`") as info:
        resolve_token(hub_spec(server, token_env="POLY_HF_TOKEN"))
    assert info.value.exit_code == 4 and server.requests == []  # refused before any request

    token_file = Path(constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True)
    token_file.write_text(BOB)  # what `hf auth login` leaves behind
    assert resolve_token(hub_spec(server)) == BOB
    monkeypatch.setenv("HF_TOKEN", BOB)
    monkeypatch.setenv("POLY_HF_TOKEN", ALICE)  # the spec's variable wins over HF_TOKEN and the login
    result = push_dataset(folder, hub_spec(server, token_env="POLY_HF_TOKEN"), run_id="run-1")
    assert result.user == "alice"


def test_rejected_token(server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(HubAuthError, match=r"rejected the token \(401 Unauthorized\)") as info:
        push_dataset(dataset(tmp_path, "run-1"), hub_spec(server), run_id="run-1", token=WRONG)
    assert info.value.exit_code == 4 and "alice/people" not in server.repos


def test_repo_of_someone_else_refused_before_upload(server: HubServer, tmp_path: Path) -> None:
    bobs = server.add_repo("bob/data", owner="bob", private=False)
    before = dict(bobs.commits)
    with pytest.raises(HubPermissionError, match=r"repo bob/data belongs to 'bob'.*'alice'.*--repo alice/data") as info:
        push_dataset(dataset(tmp_path, "run-1"), hub_spec(server, "bob/data"), run_id="run-1", token=ALICE)
    assert info.value.exit_code == 5
    assert bobs.commits == before and not any(w in p for _, p in server.requests for w in WRITES)
    # The check a build runs before generating (push_on_build) says the same, and creates nothing.
    with pytest.raises(HubPermissionError, match="belongs to 'bob'"):
        preflight(hub_spec(server, "bob/data"), token=ALICE)
    assert preflight(hub_spec(server, "lab/new"), token=ALICE) == "alice" and "lab/new" not in server.repos


def test_unreachable_hub(server: HubServer, tmp_path: Path) -> None:
    port = closed_port()
    spec = HubSpec(repo_id="alice/people", endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(
        HubUnreachable, match=rf"cannot reach the Hub at http://127.0.0.1:{port} while checking"
    ) as info:
        push_dataset(dataset(tmp_path, "run-1"), spec, run_id="run-1", token=ALICE)
    assert info.value.exit_code == 6


@pytest.mark.parametrize(
    ("step", "status", "error", "message"),
    [
        ("lfs_upload", 507, HubError, r"answered 507 while uploading.*'data/train-00000-of-00001.parquet'.*nothing"),
        ("commit", 507, HubError, r"answered 507 while uploading and committing.*nothing of this run was committed"),
        ("preupload", 403, HubPermissionError, r"no write access to dataset repo alice/people"),
        (
            "commit",
            412,
            HubConflict,
            r"changed while uploading and committing \(412.*nothing of this run was committed",
        ),
    ],
    ids=["upload-fails", "commit-fails", "no-write-access", "repo-moved-on"],
)
def test_failed_push_leaves_the_repo_unchanged(
    server: HubServer, tmp_path: Path, step: str, status: int, error: type[HubError], message: str
) -> None:
    first = push_dataset(dataset(tmp_path, "run-1"), hub_spec(server), run_id="run-1", token=ALICE)
    repo = server.repos["alice/people"]
    before = (dict(repo.commits), dict(repo.branches), dict(repo.tags), server.files("alice/people"))
    second = dataset(tmp_path, "run-2", rows=1)
    server.fail_next(step, status)
    with pytest.raises(error, match=message):
        push_dataset(second, hub_spec(server), run_id="run-2", token=ALICE)
    assert (repo.commits, repo.branches, repo.tags, server.files("alice/people")) == before
    assert repo.branches["main"] == first.commit_oid
    # The same command again completes the push.
    again = push_dataset(second, hub_spec(server), run_id="run-2", token=ALICE)
    assert repo.tags["run-2"] == again.commit_oid == repo.branches["main"]


def test_failed_tag_completed_by_running_again(server: HubServer, tmp_path: Path) -> None:
    folder = dataset(tmp_path, "run-1")
    server.fail_next("tag")
    with pytest.raises(HubError, match=r"tagging commit .*untagged: run the command again"):
        push_dataset(folder, hub_spec(server), run_id="run-1", token=ALICE)
    repo = server.repos["alice/people"]
    head, commits = repo.branches["main"], len(repo.commits)
    assert repo.tags == {} and "README.md" in server.files("alice/people")
    server.requests.clear()
    again = push_dataset(folder, hub_spec(server), run_id="run-1", token=ALICE)
    assert again.unchanged and again.commit_oid == head and len(repo.commits) == commits  # no second commit
    assert repo.tags == {"run-1": head} and not any(m == "PUT" for m, _ in server.requests)


def test_card_metadata_refused_before_any_upload(server: HubServer, tmp_path: Path) -> None:
    folder = dataset(tmp_path, "run-1")
    (folder / "README.md").write_text("---\n- not a mapping\n---\n\n# people\n")
    with pytest.raises(HubError, match=r"refused the dataset card's YAML metadata \(README.md\): .*not a YAML mapping"):
        push_dataset(folder, hub_spec(server), run_id="run-1", token=ALICE)
    assert not any(w in p for _, p in server.requests for w in WRITES)
    assert set(server.files("alice/people")) == {".gitattributes"}


def test_published_run_refused_before_any_upload(server: HubServer, tmp_path: Path) -> None:
    folder = dataset(tmp_path, "run-1")
    first = push_dataset(folder, hub_spec(server), run_id="run-1", token=ALICE)
    server.requests.clear()
    with pytest.raises(HubConflict, match=rf"run run-1 is already published.*{first.commit_oid[:12]}") as info:
        push_dataset(folder, hub_spec(server), run_id="run-1", token=ALICE)
    assert info.value.exit_code == 7 and not any(w in p for _, p in server.requests for w in WRITES)
    with pytest.raises(HubInputError, match="cannot be a git tag"):
        push_dataset(folder, hub_spec(server), run_id="run..1", token=ALICE)


def test_server_threads_end_with_the_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    before = set(threading.enumerate())
    with HubServer({ALICE: "alice"}) as hub:
        push_dataset(dataset(tmp_path, "run-1"), hub_spec(hub), run_id="run-1", token=ALICE)
        assert hub.connections  # the client keeps its connection open between calls
    leftover = [t.name for t in threading.enumerate() if t not in before and t.name != "tqdm_monitor"]
    assert leftover == [] and not hub.connections  # tqdm_monitor: huggingface_hub's progress bars, not the server


def test_token_never_in_output(
    server: HubServer, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    folder = dataset(tmp_path, "run-1")
    messages = [str(push_dataset(folder, hub_spec(server), run_id="run-1", token=ALICE).to_dict())]
    server.add_repo("bob/data", owner="bob")
    closed = HubSpec(repo_id="alice/people", endpoint=f"http://127.0.0.1:{closed_port()}")
    server.fail_next("lfs_upload")
    attempts = [
        (folder, hub_spec(server), "run-1", ALICE),  # already published
        (folder, hub_spec(server), "run-1", WRONG),  # rejected token
        (folder, hub_spec(server, "bob/data"), "run-1", ALICE),  # another owner's repo
        (folder, closed, "run-1", ALICE),  # unreachable
        (dataset(tmp_path, "run-2", rows=1), hub_spec(server), "run-2", ALICE),  # failed upload
    ]
    for path, spec, run_id, token in attempts:
        with pytest.raises(HubError) as info:
            push_dataset(path, spec, run_id=run_id, token=token)
        messages.append(str(info.value))
    captured = capfd.readouterr()
    for secret in (ALICE, WRONG):
        for text in (*messages, captured.out, captured.err, caplog.text):
            assert secret not in text
    assert len(messages) == 6 and len(set(messages)) == 6  # each failure says something of its own


# ---- the command --------------------------------------------------------------------------------------------------


def run_folder(tmp_path: Path, run_id: str, hub: dict[str, object] | None) -> Path:
    """outputs/people/<run-id>/ as a build leaves it: spec.yaml, result.json and the dataset folder."""
    run_dir = tmp_path / "outputs" / "people" / run_id
    folder = dataset(tmp_path, run_id)
    run_dir.mkdir(parents=True)
    shutil.move(folder, run_dir / folder.name)
    spec = spec_dict(publish={"hub": hub} if hub else {})
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = {"run_id": run_id, "run_dir": str(run_dir), "dataset_dir": str(folder)}  # a moved run: stale path
    (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


def test_cli_publish_json_end_to_end(server: HubServer, tmp_path: Path) -> None:
    run_dir = run_folder(tmp_path, "run-9", {"repo_id": "alice/people", "endpoint": server.url})
    env = {**os.environ, "HF_TOKEN": ALICE, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN_PATH": str(tmp_path / "none")}
    out = subprocess.run(
        [sys.executable, "-m", "polyculture.cli", "publish", str(run_dir), "--public", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["repo_id"] == "alice/people" and result["tag"] == "run-9" and result["private"] is False
    assert server.repos["alice/people"].tags == {"run-9": result["commit_oid"]}
    assert server.files("alice/people")["README.md"] == (run_dir / "people-run-9" / "README.md").read_bytes()
    assert ALICE not in out.stdout + out.stderr


def test_cli_publish_errors_and_exit_codes(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = run_folder(tmp_path, "run-9", None)
    runner = CliRunner()

    def publish(*args: str) -> tuple[int, str]:
        res = runner.invoke(app, ["publish", str(run_dir), *args])
        return res.exit_code, res.output

    code, output = publish()
    assert code == 2 and "pass --repo owner/name or set publish.hub.repo_id" in output
    code, output = publish("--repo", "not a repo")
    assert code == 2 and "repo.repo_id: 'not a repo' is not a Hub repo id" in output
    missing = runner.invoke(app, ["publish", str(tmp_path)])
    assert missing.exit_code == 2 and "not a finished run folder (no result.json)" in missing.output
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    code, output = publish("--repo", "alice/people")
    assert code == 4 and "no Hugging Face token" in output
    monkeypatch.setenv("HF_TOKEN", WRONG)
    code, output = publish("--repo", "alice/people")
    assert code == 4 and "rejected the token" in output and WRONG not in output
    monkeypatch.setenv("HF_TOKEN", ALICE)
    server.add_repo("bob/data", owner="bob")
    code, output = publish("--repo", "bob/data")
    assert code == 5 and "belongs to 'bob'" in output
    code, output = publish("--repo", "alice/people", "--quiet")
    assert code == 0 and "pushed run run-9 to alice/people (private) as alice" in output and ALICE not in output
    code, output = publish("--repo", "alice/people")
    assert code == 7 and "already published" in output


def test_locate_run_and_overrides(tmp_path: Path) -> None:
    run_dir = run_folder(tmp_path, "run-3", {"repo_id": "alice/people", "private": False, "tag": False})
    run = locate_run(run_dir)
    assert run.run_id == "run-3" and run.dataset_dir == run_dir / "people-run-3"  # found inside the moved run
    assert run.hub is not None and run.hub.repo_id == "alice/people" and run.hub.private is False
    merged = hub_settings(run.hub, repo="lab/people", private=True)
    assert (merged.repo_id, merged.private, merged.tag) == ("lab/people", True, False)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec_dict(publish={"hub": {"repo_id": "x"}})))
    with pytest.raises(HubInputError, match=r"publish.hub.repo_id: 'x' is not a Hub repo id"):
        locate_run(run_dir)
