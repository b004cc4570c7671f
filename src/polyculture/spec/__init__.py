"""BuildSpec: the declarative description of one dataset build, loaded from YAML.

Pure configuration: validating a mapping into a `BuildSpec` reads no file and asks no model registry
(`polyculture.preflight` checks what needs the disk: the record schema, models, adapters, reference folders).
Every model refuses unknown keys, so a typo is an error naming the field, never a silently ignored setting.
`schemas/build-spec.schema.json` is generated from `BuildSpec` (see `build_spec_json_schema`); a test keeps them in sync.

Modules: `base` (SpecError, error formatting), `sections` (prompt, record, attributes, method, sampling, generation,
dedup, rebalance), `decontaminate` (benchmarks to check records against), `quality` (the checks: fluency,
expression, python), `model` (model and engine), `outputs`
(publish, Hub, report), `scheduling` (runner, schedule), `build` (BuildSpec and the checks across sections).
"""

from polyculture.spec.base import SpecError, error_lines, format_validation_error, spec_error_message
from polyculture.spec.build import (
    DATASET_NAME,
    RESERVED_COLUMNS,
    TEMPLATE_BUILTINS,
    BuildSpec,
    attribute_names_problem,
    build_spec_json_schema,
    set_dotted,
)
from polyculture.spec.decontaminate import BUILT_IN_BENCHMARKS, BenchmarkFile, DecontaminateSpec
from polyculture.spec.model import ADAPTER_WITH_SERVER, VLLM_RESERVED_ARGS, ModelSpec
from polyculture.spec.outputs import HUB_REPO_ID, HubSpec, PublishSpec, ReportReference, ReportSpec
from polyculture.spec.quality import (
    SCORE_PREFIX,
    SOLVE_RATE_COLUMN,
    ExpressionCheck,
    FluencyCheck,
    JudgeCheck,
    MathAnswerCheck,
    ProseCheck,
    PythonCheck,
    QualityCheck,
    rubric_variables,
)
from polyculture.spec.scheduling import RunnerSpec, ScheduleSpec
from polyculture.spec.sections import (
    Attribute,
    CellWeight,
    DedupSpec,
    ExtractorSpec,
    GenerationSpec,
    MethodName,
    MethodSpec,
    ProbabilityDefinition,
    PromptSpec,
    RebalanceSpec,
    RecordSpec,
    SamplingSpec,
)

__all__ = [
    "ADAPTER_WITH_SERVER",
    "BUILT_IN_BENCHMARKS",
    "DATASET_NAME",
    "HUB_REPO_ID",
    "RESERVED_COLUMNS",
    "SCORE_PREFIX",
    "SOLVE_RATE_COLUMN",
    "TEMPLATE_BUILTINS",
    "VLLM_RESERVED_ARGS",
    "Attribute",
    "BenchmarkFile",
    "BuildSpec",
    "CellWeight",
    "DecontaminateSpec",
    "DedupSpec",
    "ExpressionCheck",
    "ExtractorSpec",
    "FluencyCheck",
    "JudgeCheck",
    "MathAnswerCheck",
    "ProseCheck",
    "rubric_variables",
    "GenerationSpec",
    "HubSpec",
    "MethodName",
    "MethodSpec",
    "ModelSpec",
    "ProbabilityDefinition",
    "PromptSpec",
    "PublishSpec",
    "PythonCheck",
    "QualityCheck",
    "RebalanceSpec",
    "RecordSpec",
    "ReportReference",
    "ReportSpec",
    "RunnerSpec",
    "SamplingSpec",
    "ScheduleSpec",
    "SpecError",
    "attribute_names_problem",
    "build_spec_json_schema",
    "error_lines",
    "format_validation_error",
    "set_dotted",
    "spec_error_message",
]
