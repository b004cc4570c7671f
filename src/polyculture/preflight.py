"""preflight: the checks of a build spec that need the disk or the model registry, run once the spec itself is valid.

`parse_spec` and `load_spec` validate a mapping into a `BuildSpec` (pure configuration, `polyculture.spec`) and then
preflight it: the record schema file is read and the attributes and text field are checked against it; model.name and
dedup.embedding_model must name a model this machine can load; model.adapter and the dedup.reference folders must
exist; each decontaminate benchmark must be readable (champ: its package installed; a file: found, with its columns)
and decontaminate.fields must be record fields; the quality checks' fields must be record fields and a python check's
function must import. Problems read like the spec's own validation errors (SpecError, the field named, all fields at
once). The spec comes back with what was found attached: `spec.base_dir` (the spec file's folder),
`spec.record_schema` and `spec.located_files` (the adapter, reference indexes, report reference and benchmark files as
absolute paths).

`check_models` goes further, for commands about to do long work: it resolves both models to local weights and checks
that the dedup index can run here, so a missing model fails in seconds, not after minutes of generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import ValidationError

from polyculture.embedded import EMBEDDED_CHAT_MODELS, EMBEDDED_EMBEDDING_MODELS
from polyculture.engines.model_files import (
    ModelUnavailable,
    check_model_name,
    locate_adapter,
    resolve_chat_model,
    resolve_embedding_model,
)
from polyculture.index.benchmarks import CHAMP, CHAMP_PACKAGE, champ_file
from polyculture.index.sources import SourceError, source_columns, source_files
from polyculture.runs.previous import previous_run_folder
from polyculture.spec import (
    Attribute,
    BuildSpec,
    DecontaminateSpec,
    DedupSpec,
    ExpressionCheck,
    FluencyCheck,
    JudgeCheck,
    MathAnswerCheck,
    ModelSpec,
    ProseCheck,
    PythonCheck,
    QualityCheck,
    RecordSpec,
    SpecError,
    attribute_names_problem,
    error_lines,
    rubric_variables,
    spec_error_message,
)
from polyculture.user_functions import FunctionUnavailable, load_function

# A problem as a validation error reports it: (location in the spec, message); () is the spec as a whole.
Problem = tuple[tuple[str | int, ...], str]


class IndexUnavailable(RuntimeError):
    """The dedup index the spec asks for cannot run on this machine (a GPU index without a FAISS GPU build)."""


def load_spec(path: str | Path) -> BuildSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file '{path}' is not valid YAML: {exc}") from None
    return parse_spec(data, path.parent.resolve())


def parse_spec(data: Any, base_dir: Path | str = ".") -> BuildSpec:
    """Validate `data` and preflight it; relative paths in it are looked up beside `base_dir`, then in the working
    folder."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid build spec: expected a mapping at the top level, got {type(data).__name__}")
    base = Path(base_dir)
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(spec_error_message(_with_preflight(error_lines(exc), data, base))) from None
    return preflight(spec, base)


def preflight(spec: BuildSpec, base_dir: Path | str) -> BuildSpec:
    """`spec` checked against the disk and the model registry, with its folder and record schema attached."""
    base = Path(base_dir)
    problems = _model_problems(spec.model, base) + _dedup_problems(spec.dedup, base)
    if problems:
        raise SpecError(spec_error_message(problems))
    try:
        schema = _record_schema(spec.record, spec.attributes, base)
    except ValueError as exc:
        raise SpecError(spec_error_message([((), str(exc))])) from None
    problems = quality_problems(spec.quality, schema, base)
    if spec.report.previous not in (None, "auto"):
        try:
            previous_run_folder(spec.report.previous, base)
        except ValueError as exc:
            problems.append((("report", "previous"), str(exc)))
    if spec.decontaminate is not None:
        problems += decontaminate_problems(spec.decontaminate, schema, base)
    if spec.prompt.exemplars is not None:
        problems += exemplars_problems(spec, base)
    if problems:
        raise SpecError(spec_error_message(problems))
    return spec.attach(base, schema, _located_files(spec, base))


def quality_problems(checks: list[QualityCheck], schema: dict[str, Any], base_dir: Path) -> list[Problem]:
    """Each quality check's fields must be in the record schema, its columns must not shadow a record field, a
    judge's rubric must name record fields only and its own model (when set) must load here, and a python check's
    function must import (its module beside the spec or on the path)."""
    props = schema.get("properties", {})
    problems: list[Problem] = []
    for i, check in enumerate(checks):
        if check.score_column in props:
            problems.append(
                (("quality", i, "name"), f"the score column '{check.score_column}' is also a record field")
            )
        for column in check.extra_columns:
            if column in props:
                problems.append(
                    (("quality", i, "kind"), f"a {check.kind} check publishes the column '{column}', which is also "
                                             "a record field")
                )  # fmt: skip
        fields = {"field": check.field} if isinstance(check, FluencyCheck | ProseCheck) else {}
        if isinstance(check, ExpressionCheck):
            fields = {"expression_field": check.expression_field, "value_field": check.value_field}
        if isinstance(check, MathAnswerCheck):
            fields = {"problem_field": check.problem_field, "answer_field": check.answer_field}
        for key, name in fields.items():
            if name is not None and name not in props:
                problems.append(
                    (("quality", i, key), f"'{name}' is not in the record schema's properties {sorted(props)}")
                )
        if isinstance(check, JudgeCheck):
            unknown = sorted(rubric_variables(check.rubric) - set(props))
            if unknown:
                problems.append(
                    (("quality", i, "rubric"), f"names {unknown}, not in the record schema's properties {sorted(props)}")
                )
            if check.model is not None:
                problems += [(("quality", i, *where), why) for where, why in _model_problems(check.model, base_dir)]
        if isinstance(check, PythonCheck):
            try:
                load_function(check.function, base_dir)
            except FunctionUnavailable as exc:
                problems.append((("quality", i, "function"), str(exc)))
    return problems


def locate_benchmark(path: str, base_dir: Path) -> Path | None:
    """A benchmark file or folder: beside the spec first, then in the working folder; None when neither exists."""
    candidate = Path(path).expanduser()
    options = [candidate] if candidate.is_absolute() else [base_dir / candidate, Path.cwd() / candidate]
    return next((p.resolve() for p in options if p.exists()), None)


def decontaminate_problems(settings: DecontaminateSpec, schema: dict[str, Any], base_dir: Path) -> list[Problem]:
    """Each benchmark readable (champ: its package installed; a file or folder: found, holding the text and id
    columns) and each checked field a record field; all problems at once, each naming its field."""
    problems: list[Problem] = []
    for i, benchmark in enumerate(settings.benchmarks):
        where: tuple[str | int, ...] = ("decontaminate", "benchmarks", i)
        if isinstance(benchmark, str):  # a built-in; champ is the only one
            if champ_file() is None:
                problems.append((where, f"the built-in benchmark '{CHAMP}' needs the {CHAMP_PACKAGE} package "
                                        f"(pip install {CHAMP_PACKAGE}); it is not installed"))  # fmt: skip
            continue
        found = locate_benchmark(benchmark.path, base_dir)
        if found is None:
            problems.append(((*where, "path"), f"'{benchmark.path}' not found (looked beside the spec and in the "
                                               "working folder)"))  # fmt: skip
            continue
        try:
            for file in source_files(found):
                columns = source_columns(file)
                for key in ("text_column", "id_column"):
                    column = getattr(benchmark, key)
                    if column is not None and column not in columns:
                        problems.append(((*where, key), f"'{file}' has no column '{column}' (columns: {columns})"))
        except SourceError as exc:
            problems.append(((*where, "path"), str(exc)))
    props = schema.get("properties", {})
    for name in settings.fields or []:
        if name not in props:
            problems.append((("decontaminate", "fields"), f"'{name}' is not in the record schema's properties "
                                                          f"{sorted(props)}"))  # fmt: skip
    return problems


def exemplars_problems(spec: BuildSpec, base_dir: Path) -> list[Problem]:
    """prompt.exemplars' source readable with its text column, and not the same file as a decontamination
    benchmark (the spec caught the same name; this catches two spellings of one path)."""
    exemplars = spec.prompt.exemplars
    assert exemplars is not None
    where: tuple[str | int, ...] = ("prompt", "exemplars", "source")
    if exemplars.source == CHAMP:
        if champ_file() is None:
            return [(where, f"the built-in '{CHAMP}' needs the {CHAMP_PACKAGE} package (pip install {CHAMP_PACKAGE})")]
        return []
    found = locate_benchmark(exemplars.source, base_dir)
    if found is None:
        return [(where, f"'{exemplars.source}' not found (looked beside the spec and in the working folder)")]
    try:
        for file in source_files(found):
            columns = source_columns(file)
            if exemplars.field not in columns:
                return [(("prompt", "exemplars", "field"), f"'{file}' has no column '{exemplars.field}' "
                                                           f"(columns: {columns})")]  # fmt: skip
    except SourceError as exc:
        return [(where, str(exc))]
    for benchmark in spec.decontaminate.benchmarks if spec.decontaminate else []:
        if not isinstance(benchmark, str) and locate_benchmark(benchmark.path, base_dir) == found:
            return [(where, f"'{exemplars.source}' is also the decontaminate benchmark '{benchmark.label}'; examples "
                            "shown to the model must not come from a benchmark the records are checked against")]  # fmt: skip
    return []


def _located_files(spec: BuildSpec, base_dir: Path) -> dict[str, str | list[str]]:
    """Where the files the spec names besides the record schema are, as absolute paths (the checks above found
    them); the report reference is only looked for beside the spec, and checked when the build reads it."""
    located: dict[str, str | list[str]] = {}
    if spec.model.adapter is not None:
        located["model.adapter"] = str(locate_adapter(spec.model.adapter, base_dir))
    if spec.dedup.reference:
        from polyculture.index.releases import locate_release_index  # faiss: only when needed

        located["dedup.reference"] = [str(locate_release_index(f, base_dir)) for f in spec.dedup.reference]
    if spec.report.reference is not None:
        located["report.reference.path"] = str((base_dir / Path(spec.report.reference.path).expanduser()).resolve())
    exemplars = spec.prompt.exemplars
    if exemplars is not None and exemplars.source != CHAMP:
        located["prompt.exemplars.source"] = str(locate_benchmark(exemplars.source, base_dir))
    for i, benchmark in enumerate(spec.decontaminate.benchmarks if spec.decontaminate else []):
        found = None if isinstance(benchmark, str) else locate_benchmark(benchmark.path, base_dir)
        if found is not None:
            located[f"decontaminate.benchmarks.{i}.path"] = str(found)
    return located


def adapter_problem(model: ModelSpec, base_dir: Path) -> str | None:
    """Why model.adapter names no usable peft adapter folder; None when it does or when no adapter is set."""
    if model.adapter is None:
        return None
    try:
        locate_adapter(model.adapter, base_dir)
    except ModelUnavailable as exc:
        return str(exc)
    return None


def check_models(spec: BuildSpec) -> None:
    """Resolve both models and pick the dedup index before any long work; raises ModelUnavailable or
    IndexUnavailable."""
    for model in [spec.model] + [c.model for c in spec.quality if isinstance(c, JudgeCheck) and c.model is not None]:
        if model.engine != "openai":  # a server's model id is checked by the engine against the server
            resolve_chat_model(model.name, spec.base_dir)
    resolve_embedding_model(spec.dedup.embedding_model, spec.base_dir)
    from polyculture.index.similarity import choose_index  # faiss: imported only by commands about to build

    try:  # a GPU index asked for where FAISS has no GPU build fails now, not after generation
        choose_index(1, kind=spec.dedup.index, device=spec.dedup.device)
    except ValueError as exc:
        raise IndexUnavailable(f"dedup.device: {exc}") from None


def resolve_path(path: str, base_dir: Path) -> Path | None:
    """A relative path is looked up beside the spec first, then in the working folder."""
    candidate = Path(path).expanduser()
    options = [candidate] if candidate.is_absolute() else [base_dir / candidate, Path.cwd() / candidate]
    return next((p.resolve() for p in options if p.is_file()), None)


def _model_problems(model: ModelSpec, base_dir: Path, *, name: bool = True) -> list[Problem]:
    """model.adapter must be a peft adapter folder, then (name) model.name a model this machine can load."""
    adapter = adapter_problem(model, base_dir)
    if adapter is not None:
        return [(("model", "adapter"), adapter)]
    if name and model.engine != "openai":  # a server's model id is the server's business
        try:
            check_model_name(model.name, EMBEDDED_CHAT_MODELS, base_dir)
        except ValueError as exc:
            return [(("model",), str(exc))]
    return []


def _dedup_problems(dedup: DedupSpec, base_dir: Path, *, name: bool = True) -> list[Problem]:
    """dedup.reference must name reference indexes, then (name) dedup.embedding_model a loadable embedder."""
    if dedup.reference:
        from polyculture.index.releases import ReleaseIndexError, locate_release_index  # faiss: only when needed

        for folder in dedup.reference:
            try:
                locate_release_index(folder, base_dir)
            except ReleaseIndexError as exc:
                return [(("dedup", "reference"), str(exc))]
    if name:
        try:
            check_model_name(dedup.embedding_model, EMBEDDED_EMBEDDING_MODELS, base_dir)
        except ValueError as exc:
            return [(("dedup", "embedding_model"), str(exc))]
    return []


# The sections preflight checks: each one's model, its check, and the one field that check looks at on its own (a
# folder to find); the rest of the check (the model name) needs every field of the section valid.
_SECTIONS = {"model": (ModelSpec, _model_problems, "adapter"), "dedup": (DedupSpec, _dedup_problems, "reference")}


def _with_preflight(lines: list[Problem], data: dict[str, Any], base_dir: Path) -> list[Problem]:
    """The problems of a spec that failed validation, its preflight included, listed as one validation pass of the
    whole would list them: every invalid field in field order (unknown keys last); a field's own check before the
    checks across its section's fields; the checks across sections only once every field is valid, and of those the
    attribute names first, then the record schema, then the prompt and the rebalance table."""
    problems: list[Problem] = []
    for section, (model, check, field) in _SECTIONS.items():
        raw = data.get(section)
        if not isinstance(raw, dict):  # absent: the default, never checked; not a mapping: already refused
            continue
        failed = [loc for loc, _ in lines if loc[:1] == (section,)]
        if not failed:
            problems += check(model.model_validate(raw), base_dir)
        elif field in raw and not any(loc[:2] == (section, field) for loc in failed):
            own = check(model.model_construct(**{field: raw[field]}), base_dir, name=False)
            if own:  # its failure kept the checks across the section's fields from running
                lines = [line for line in lines if line[0] != (section,)]
                problems += own
    if problems:  # a field failed: the checks across sections never ran
        return sorted([*(line for line in lines if line[0]), *problems], key=_field_order)
    if not any(loc for loc, _ in lines):  # every field is valid: a check across sections failed
        attributes = [Attribute.model_validate(a) for a in data.get("attributes") or []]
        if attribute_names_problem(attributes) is None:  # not the names: the record schema's checks come first
            try:
                _record_schema(RecordSpec.model_validate(data["record"]), attributes, base_dir)
            except ValueError as exc:
                return [((), str(exc))]
    return lines


def _field_order(problem: Problem) -> tuple[int, int]:
    """Where validation reports a problem: by BuildSpec field, then (model, dedup) by the section's field."""
    loc = problem[0]
    fields = list(BuildSpec.model_fields)
    top = fields.index(loc[0]) if loc and loc[0] in fields else len(fields)
    if len(loc) < 2 or loc[0] not in _SECTIONS:
        return top, 0
    inner = list(_SECTIONS[str(loc[0])][0].model_fields)
    return top, inner.index(loc[1]) if loc[1] in inner else len(inner)


def _record_schema(record: RecordSpec, attributes: list[Attribute], base_dir: Path) -> dict[str, Any]:
    """The record schema file read and checked, and the attributes and text field checked against it."""
    schema_file = resolve_path(record.schema_path, base_dir)
    if schema_file is None:
        raise ValueError(
            f"record.schema: file '{record.schema_path}' not found (looked beside the spec and in the working folder)"
        )
    try:
        schema = json.loads(schema_file.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except (json.JSONDecodeError, jsonschema.SchemaError) as exc:
        raise ValueError(
            f"record.schema: '{schema_file}' is not a valid JSON Schema: {str(exc).splitlines()[0]}"
        ) from exc
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise ValueError("record.schema: the record schema must be an object schema with 'properties'")
    props = schema["properties"]
    for attr in attributes:
        if attr.source == "extract":
            read = attr.extractor.from_field if attr.extractor else None
            if read is not None and read not in props:
                raise ValueError(
                    f"attributes.{attr.name}.extractor.from_field: '{read}' is not in the record schema's "
                    f"properties {sorted(props)}"
                )
            if attr.name in props:
                raise ValueError(
                    f"attributes.{attr.name}: source 'extract' is for attributes that are not record fields, "
                    f"but the record schema has a field '{attr.name}' (use source: field)"
                )
            continue
        if attr.record_field not in props:
            raise ValueError(
                f"attributes.{attr.name}: record field '{attr.record_field}' is not in the record schema's "
                f"properties {sorted(props)}"
            )
    if record.text_field is not None and record.text_field not in props:
        raise ValueError(
            f"record.text_field: '{record.text_field}' is not in the record schema's properties {sorted(props)}"
        )
    return schema
