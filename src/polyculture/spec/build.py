"""BuildSpec: one dataset build, made of the sections, with the checks that span sections.

Building one from a mapping reads no file and asks no model registry; `polyculture.preflight` does that once the
spec is valid, and attaches what it found (`base_dir`, `record_schema`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePath
from typing import Any

import jinja2
import jinja2.meta
from pydantic import Field, field_validator, model_validator

from polyculture.spec.base import _Strict
from polyculture.spec.decontaminate import DecontaminateSpec
from polyculture.spec.model import ModelSpec
from polyculture.spec.outputs import PublishSpec, ReportSpec
from polyculture.spec.quality import SCORE_PREFIX, QualityCheck, quality_names_problem
from polyculture.spec.scheduling import RunnerSpec, ScheduleSpec
from polyculture.spec.sections import (
    Attribute,
    DedupSpec,
    GenerationSpec,
    MethodSpec,
    PromptSpec,
    RebalanceSpec,
    RecordSpec,
    SamplingSpec,
)

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class BuildSpec(_Strict):
    """One dataset build."""

    name: str = Field(description="Dataset name (letters, digits, - _ .); the run folder is named after it.")
    description: str = ""
    prompt: PromptSpec
    record: RecordSpec
    attributes: list[Attribute] = Field(default_factory=list)
    target_size: int = Field(ge=1, le=10_000_000, description="Records in the published dataset.")
    method: MethodSpec = MethodSpec()
    model: ModelSpec = ModelSpec()
    sampling: SamplingSpec = SamplingSpec()
    generation: GenerationSpec = GenerationSpec()
    dedup: DedupSpec = DedupSpec()
    decontaminate: DecontaminateSpec | None = Field(
        default=None,
        description="Benchmark decontamination after dedup, in every round: records overlapping a benchmark item by "
        "word n-grams or by embedding are rejects (absent: off).",
    )
    quality: list[QualityCheck] = Field(
        default_factory=list,
        description="Checks run after dedup on every round's records: a record failing a gated check is a reject and "
        "never counts toward a quota; scores are published as _quality_<name> columns.",
    )
    rebalance: RebalanceSpec = RebalanceSpec()
    seed: int = Field(default=0, ge=0)
    publish: PublishSpec = PublishSpec()
    report: ReportSpec = ReportSpec()
    runner: RunnerSpec = Field(default_factory=RunnerSpec, description="Where generation shards run (task runner).")
    schedule: ScheduleSpec | None = Field(default=None, description="Cron schedule for `polyculture serve`.")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_string(cls, value: Any) -> Any:
        return {"cron": value} if isinstance(value, str) else value  # `schedule: "0 3 * * *"` is the common case

    # Attached by preflight (the spec file's folder, the record schema read from it, and where the other files the
    # spec names were found: "model.adapter", "dedup.reference", "report.reference.path",
    # "decontaminate.benchmarks.<i>.path" -> absolute paths); not part of the YAML.
    _base_dir: Path = Path(".")
    _record_schema: dict[str, Any] = {}
    _located: dict[str, str | list[str]] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not DATASET_NAME.match(name):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '-', '_' or '.'")
        return name

    @model_validator(mode="after")
    def _cross_checks(self) -> BuildSpec:
        # preflight's record schema checks come between the attribute names and the prompt (it relies on this order)
        problem = attribute_names_problem(self.attributes)
        if problem is not None:
            raise ValueError(problem)
        names = [a.name for a in self.attributes]
        builtins = TEMPLATE_BUILTINS | ({EXEMPLARS_VARIABLE} if self.prompt.exemplars else set())
        undeclared = template_variables(self.prompt) - {a.name for a in self.attributes} - builtins
        if undeclared:
            raise ValueError(
                f"prompt.template: uses undefined variables {sorted(undeclared)}; allowed: attribute names "
                f"{names} and {sorted(builtins)}"
            )
        self._check_exemplars()
        self._check_table()
        self._check_quality()
        return self

    def _check_exemplars(self) -> None:
        # Examples shown to the model are exactly what decontamination looks for: a benchmark in the prompt would
        # leak into the records it then flags (or fail to flag paraphrases of it).
        exemplars = self.prompt.exemplars
        if exemplars is None or self.decontaminate is None:
            return
        for benchmark in self.decontaminate.benchmarks:
            same = benchmark == exemplars.source if isinstance(benchmark, str) else (
                PurePath(benchmark.path) == PurePath(exemplars.source)
            )
            if same:
                raise ValueError(
                    f"prompt.exemplars.source: '{exemplars.source}' is also a decontaminate benchmark; examples "
                    "shown to the model must not come from a benchmark the records are checked against"
                )

    def _check_quality(self) -> None:
        problem = quality_names_problem(self.quality)
        if problem is not None:
            raise ValueError(problem)
        for i, check in enumerate(self.quality):
            if check.kind == "fluency" and self.model.engine == "openai":
                raise ValueError(
                    f"quality.{i}.kind: fluency scores log-probabilities with the build's model, which an "
                    "OpenAI-compatible server does not give; use model.engine transformers or vllm"
                )
        shadowed = sorted(a.name for a in self.attributes if a.name.startswith(SCORE_PREFIX.rstrip("_")))
        if shadowed and self.quality:
            raise ValueError(f"attributes: {shadowed} start with '_quality', the prefix of the quality score columns")

    def _check_table(self) -> None:
        table = self.rebalance.table or []
        names = [a.name for a in self.attributes]
        allowed = {a.name: a.values for a in self.attributes}
        seen: set[tuple[str, ...]] = set()
        for i, row in enumerate(table):
            where = f"rebalance.table.{i}.cell"
            if sorted(row.cell) != sorted(names):
                raise ValueError(f"{where}: needs exactly one value for each attribute {names}; got {sorted(row.cell)}")
            for name, value in row.cell.items():
                if value not in allowed[name]:
                    raise ValueError(f"{where}.{name}: {value!r} is not one of {allowed[name]}")
            key = tuple(row.cell[n] for n in names)
            if key in seen:
                raise ValueError(f"{where}: the cell {row.cell} is listed twice")
            seen.add(key)
        if table and sum(row.weight for row in table) <= 0:
            raise ValueError("rebalance.table: weights must not all be 0")

    def attach(
        self, base_dir: Path, record_schema: dict[str, Any], located: dict[str, str | list[str]] | None = None
    ) -> BuildSpec:
        """A copy of this spec that knows the folder its relative paths start from, its record schema and where the
        files it names were found (`located`: dotted keys -> absolute paths)."""
        attached = self.model_copy()
        attached._base_dir = base_dir
        attached._record_schema = record_schema
        attached._located = dict(located or {})
        return attached

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the spec start from ('.' until preflight attaches the spec file's folder)."""
        return self._base_dir

    @property
    def record_schema(self) -> dict[str, Any]:
        """The record's JSON Schema ({} until preflight has read and checked it)."""
        return self._record_schema

    @property
    def located_files(self) -> dict[str, str | list[str]]:
        """Where preflight found the files the spec names besides the record schema, as absolute paths by dotted key
        ("model.adapter", "dedup.reference", "report.reference.path"); only the keys the spec sets ({} until
        preflight)."""
        return dict(self._located)

    @property
    def prompt_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.source == "prompt"]

    @property
    def field_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.source == "field"]

    @property
    def extract_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.source == "extract"]

    def fingerprint(self, *, paths_as_written: bool = False) -> str:
        """Stable hash of everything that decides the output (spec and record schema; not the runner).

        The record schema counts by its content, not by its path, and the other files the spec names by where
        preflight found them (absolute paths): a copy of the spec that points at a copy of the schema and names the
        same files by absolute paths (a run folder's spec.resolved.yaml) has the same fingerprint as the original.
        `paths_as_written`: the hash of the spec with every path as written (what run folders started before paths
        were located hold in run.json; still accepted to resume them)."""
        # The runner decides where shards run, not what they hold: a run resumes under any runner.
        # A section left out hashes as before the section existed: runs started then still resume.
        unset = {**({"quality": True} if not self.quality else {}),
                 **({"decontaminate": True} if self.decontaminate is None else {}),
                 **({"model": {"sequences_per_call"}} if self.model.sequences_per_call is None else {})}  # fmt: skip
        if paths_as_written:
            spec = self.model_dump(mode="json", by_alias=True, exclude={"runner": True, **unset})
        else:
            spec = self.model_dump(
                mode="json", by_alias=True, exclude={"runner": True, "record": {"schema_path"}, **unset}
            )
            for key, value in self._located.items():
                set_dotted(spec, key, value)
        payload = json.dumps({"spec": spec, "schema": self._record_schema}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data["a"]["b"] = value for key "a.b"; a numeric part indexes a list ("a.0.b"). The containers on the way must
    exist."""
    *parents, last = key.split(".")
    target: Any = data
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


# Pipeline columns an attribute (a column of its own in every frame) must not shadow.
RESERVED_COLUMNS = frozenset(
    {"call_id", "cell_id", "cell_key", "prompt_index", "sample_index", "system", "user", "completion", "prompt_tokens",
     "completion_tokens", "finish_reason", "method", "model", "engine", "batch_seconds", "shard", "turn", "messages",
     "record_id", "item_index",
     "verbalized_probability", "record_json", "text", "quota", "n_prompts", "target", "available", "kept",
     "deficit", "reason"}
)  # fmt: skip
# Variables every template may use besides the attributes.
TEMPLATE_BUILTINS = frozenset({"k", "index"})
# With prompt.exemplars: the list of example texts sampled for the prompt.
EXEMPLARS_VARIABLE = "exemplars"


def attribute_names_problem(attributes: list[Attribute]) -> str | None:
    """Why the attribute names cannot all be columns (repeated or reserved); None when they can."""
    names = [a.name for a in attributes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"attributes: names must be distinct; repeated: {repeated}"
    clashing = sorted(set(names) & RESERVED_COLUMNS)
    if clashing:
        return f"attributes: {clashing} are reserved column names; reserved: {sorted(RESERVED_COLUMNS)}"
    return None


def template_variables(prompt: PromptSpec) -> set[str]:
    """The variables the prompt's templates use that they do not define themselves."""
    env = jinja2.Environment()
    found: set[str] = set()
    for text in (prompt.template, prompt.system):
        if text:
            found |= jinja2.meta.find_undeclared_variables(env.parse(text))
    return found


def build_spec_json_schema() -> dict[str, Any]:
    schema = BuildSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://polyculture.dev/schemas/build-spec.schema.json"
    return schema
