"""Shared test set-up: offline, quiet, a private Prefect home, one Prefect test server per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_PREFECT_HOME = tempfile.mkdtemp(prefix="polyculture-prefect-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "PREFECT_HOME": _PREFECT_HOME,
    # load_dataset caches a local folder by its name only: a fresh cache per session, so a run folder name reused
    # by an earlier session never serves that session's rows.
    "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="polyculture-hf-datasets-"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}.items():
    os.environ[key] = value

import pytest  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
# The full run (make test-full) adds the costliest end-to-end forms of behaviours the default run also covers.
FULL = os.environ.get("POLYCULTURE_TEST_FULL") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FULL:
        return
    skip = pytest.mark.skip(reason="full run only (POLYCULTURE_TEST_FULL=1, make test-full); a cheaper test covers it")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)

SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 40},
        "birth_year": {"type": "integer", "minimum": 1900, "maximum": 2005},
        "occupation": {"type": "string"},
        "bio": {"type": "string", "minLength": 10, "maxLength": 200},
    },
    "required": ["name", "birth_year", "occupation", "bio"],
    "additionalProperties": False,
}


def small_spec_dict(**overrides):
    """A small but complete biographies spec; the schema file is written by the `spec_dir` fixture."""
    spec = {
        "name": "tiny-bios",
        "prompt": {"template": "Write a short biography of a fictional {{ occupation }}."},
        "record": {"schema": "record.schema.json", "text_field": "bio"},
        "attributes": [{"name": "occupation", "values": ["doctor", "farmer"], "weights": [1, 1]}],
        "target_size": 4,
        "method": {"name": "direct"},
        "model": {"name": "smollm2-135m-instruct", "engine": "transformers"},
        "sampling": {"temperature": 1.0, "max_tokens": 120, "n": 2},
        "generation": {"oversample": 2.0},
        "seed": 3,
    }
    for key, value in overrides.items():
        spec[key] = value if not isinstance(value, dict) or key not in spec else {**spec[key], **value}
    return spec


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    import json

    (tmp_path / "record.schema.json").write_text(json.dumps(SMALL_SCHEMA))
    return tmp_path


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-test POLYCULTURE_CACHE, so cache tests never read or write the user's cache."""
    monkeypatch.setenv("POLYCULTURE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def embedder():
    """The real MiniLM embedder, loaded once for the session (its disk cache follows POLYCULTURE_CACHE per call)."""
    from polyculture.stages.embed import load_embedder

    return load_embedder("minilm-l6")


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for every flow test; stopped at the end of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on 2 shared cores, two busy-waiting thread pools slow decoding tens of times,
    and one thread costs little for a model this small."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` for the build-level fault tests, shared by their modules (one start, ~12 s+)."""
    from fault_servers import start_prefect_server, stop_group

    server, url = start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield url
    finally:
        assert not stop_group(server), "Prefect server processes left running"
