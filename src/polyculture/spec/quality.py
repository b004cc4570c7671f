"""The quality section: checks every record must pass (gate: true) or is only scored by (gate: false).

One list entry per check, told apart by `kind` (a discriminated union): fluency (mean per-token log-probability under
the build's model), prose (Gopher's rules for text that reads as prose, and a repetition bound), judge (a chat model
grades each record by a rubric, its answer constrained to JSON), math_answer (a problem solved again several times
must have the author's answer as its majority answer), expression (a
formula in the record evaluated safely against the value the record claims) and python (a user function, run in worker
processes with a per-record timeout). Each check publishes its score as the
column `_quality_<name>`. What needs the disk (is the field in the record schema, does the module import) is
`polyculture.preflight`'s business.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import jinja2
import jinja2.meta
from pydantic import Field, field_validator, model_validator

from polyculture.spec.base import _Strict
from polyculture.spec.model import ModelSpec

CHECK_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
# "package.module:function": a plain name after the colon keeps the worker's lookup to one getattr.
FUNCTION_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
SCORE_PREFIX = "_quality_"
SOLVE_RATE_COLUMN = "_solve_rate"


class _Check(_Strict):
    name: str = Field(pattern=CHECK_NAME, description="Identifier; the score is published as `_quality_<name>`.")
    gate: bool = Field(
        default=True,
        description="true: a record that fails is a reject (stage quality); false: the score is only informational "
        "(published, used by rebalancing, never a reject).",
    )

    @property
    def score_column(self) -> str:
        return f"{SCORE_PREFIX}{self.name}"

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """Columns the check publishes besides its score (math_answer: `_solve_rate`); floats, null where unscored."""
        return ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the check adds to the records and the published dataset: its score, then its extras."""
        return (self.score_column, *self.extra_columns)


class FluencyCheck(_Check):
    """Mean per-token log-probability of a text field under the build's own model (a gibberish filter)."""

    kind: Literal["fluency"]
    field: str | None = Field(default=None, description="Record field scored (default: record.text_field's text).")
    threshold: float | None = Field(
        default=None, le=0, description="Absolute: a record whose mean token log-prob is below this fails (e.g. -4.0)."
    )
    quantile: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Relative: the records below this quantile of the run's scores fail (0.2: the lowest 20%).",
    )

    @model_validator(mode="after")
    def _one_threshold(self) -> FluencyCheck:
        if (self.threshold is None) == (self.quantile is None):
            raise ValueError("fluency takes exactly one of threshold (a log-prob, e.g. -4.0) or quantile (in (0, 1))")
        return self


class ProseCheck(_Check):
    """Does a text field read as prose? Gopher's quality rules (Rae et al. 2021) sized for short records, and a
    repetition bound: a cheap filter for what a fluency score rewards (a loop of one token is very probable)."""

    kind: Literal["prose"]
    field: str | None = Field(default=None, description="Record field checked (default: record.text_field's text).")
    min_words: int = Field(default=5, ge=1, le=10_000, description="Fewer whitespace-separated words fail.")
    min_mean_word_length: float = Field(default=3.0, ge=0, description="Mean word length (characters) below fails.")
    max_mean_word_length: float = Field(
        default=10.0, gt=0, description="Mean word length above fails (run-together text, code, a script's soup)."
    )
    min_alpha_words: float = Field(
        default=0.8, ge=0, le=1, description="Share of words holding a letter below this fails (numbers, symbols)."
    )
    stop_words: list[str] = Field(
        default=["the", "be", "to", "of", "and", "that", "have", "with", "a", "an", "in", "on", "at", "by", "for",
                 "from", "or", "as", "is", "was", "are", "it", "his", "her", "their"],  # fmt: skip
        description="Function words of the records' language (default English: Gopher's eight and other common ones).",
    )
    min_stop_words: int = Field(default=1, ge=0, description="Fewer distinct stop words than this fails.")
    max_compression_ratio: float = Field(
        default=2.5, gt=1, description="gzip ratio (bytes / compressed bytes) above this fails: loops and repeats."
    )

    @model_validator(mode="after")
    def _word_lengths(self) -> ProseCheck:
        if self.min_mean_word_length >= self.max_mean_word_length:
            raise ValueError("min_mean_word_length must be below max_mean_word_length")
        return self


class JudgeCheck(_Check):
    """A chat model grades each record by a rubric; its answer is constrained to JSON {reason, score} with the score an
    integer in [min_score, max_score]; the record passes when its (mean) score is at or above `threshold`."""

    kind: Literal["judge"]
    rubric: str = Field(
        min_length=1,
        description="Jinja2 template over the record's fields (e.g. '{{ bio }}'): what to grade and how each score "
        "reads. The instruction to answer as JSON with the score range is added after it.",
    )
    min_score: int = Field(default=1, ge=0, le=100, description="Lowest score the judge may give.")
    max_score: int = Field(default=5, ge=1, le=100, description="Highest score the judge may give.")
    threshold: float = Field(description="A record passes when its (mean) score is at or above this.")
    samples: int = Field(
        default=1, ge=1, le=16, description="1: one greedy verdict; more: the mean score of that many samples."
    )
    temperature: float = Field(default=0.7, gt=0, le=2, description="Sampling temperature when samples > 1.")
    max_tokens: int = Field(default=256, ge=16, le=4096, description="Tokens for one verdict (reason and score).")
    model: ModelSpec | None = Field(
        default=None, description="The judge's own model (any engine); default: the build's model and engine."
    )

    @field_validator("rubric")
    @classmethod
    def _rubric_parses(cls, rubric: str) -> str:
        try:
            variables = rubric_variables(rubric)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"is not a valid Jinja2 template: {exc.message} (line {exc.lineno})") from None
        if not variables:
            raise ValueError("names no record field (e.g. '{{ bio }}'): the judge would grade nothing")
        return rubric

    @model_validator(mode="after")
    def _range(self) -> JudgeCheck:
        if self.min_score >= self.max_score:
            raise ValueError(f"min_score ({self.min_score}) must be below max_score ({self.max_score})")
        if not self.min_score <= self.threshold <= self.max_score:
            raise ValueError(f"threshold {self.threshold:g} is outside [min_score, max_score] = "
                             f"[{self.min_score}, {self.max_score}]")  # fmt: skip
        return self


def rubric_variables(rubric: str) -> set[str]:
    """The record fields a judge's rubric names."""
    return jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(rubric))

class MathAnswerCheck(_Check):
    """Solve each problem again `solves` times and keep it only when the majority answer (grouped by math-verify
    equivalence) is the author's, with enough agreement; the score is that agreement, `_solve_rate` the share of
    solutions equal to the author's answer."""

    kind: Literal["math_answer"]
    problem_field: str = Field(default="problem", description="Record field holding the problem statement.")
    answer_field: str = Field(default="answer", description="Record field holding the author's final answer.")
    solves: int = Field(default=4, ge=3, le=32, description="Independent solutions per problem (3 or more: a majority).")
    min_agreement: float = Field(
        default=0.5, gt=0, le=1, description="Share of solutions that must give the majority answer."
    )
    solve_rate: tuple[float, float] | None = Field(
        default=None,
        description="[min, max] share of solutions equal to the author's answer that passes (e.g. [0.1, 0.9]: "
        "neither trivial nor hopeless); none: no bound.",
    )
    solve_template: str = Field(
        default="Solve this problem step by step. Put only the final answer inside \\boxed{}.\n\n{problem}",
        description="The one user turn that asks for a solution; `{problem}` is replaced by the problem.",
    )
    answer_in_problem: bool = Field(
        default=False,
        description="Allow a problem whose text holds its own answer as a number (e.g. '8.00 (whole fraction)' with "
        "answer 8.00: solving it only copies the answer). Off: such a problem fails unsolved; answers written as one "
        "digit (0-9) are not looked for, they occur in problems by chance.",
    )
    temperature: float = Field(default=0.7, gt=0, le=2, description="Sampling temperature of the solutions.")
    max_tokens: int = Field(default=512, ge=16, le=8192, description="Tokens per solution.")
    timeout_s: float = Field(default=10.0, gt=0, le=600, description="Time to parse and compare one problem's answers.")
    workers: int = Field(default=2, ge=1, le=64, description="Worker processes that parse and compare answers.")

    @property
    def extra_columns(self) -> tuple[str, ...]:
        return (SOLVE_RATE_COLUMN,)

    @field_validator("solve_template")
    @classmethod
    def _has_problem(cls, template: str) -> str:
        if "{problem}" not in template:
            raise ValueError("must contain {problem}, where the problem statement goes")
        return template

    @field_validator("solve_rate")
    @classmethod
    def _rate_range(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not 0 <= bounds[0] <= bounds[1] <= 1:
            raise ValueError(f"must be [min, max] with 0 <= min <= max <= 1; got {list(bounds)}")
        return bounds


class ExpressionCheck(_Check):
    """A formula held in one field, evaluated safely (simpleeval, bounded), must equal the value another field claims."""

    kind: Literal["expression"]
    expression_field: str = Field(description="Record field holding the expression, e.g. '3 * (4 + 5)'.")
    value_field: str = Field(description="Record field holding the claimed value (a number or a boolean).")
    tolerance: float = Field(default=1e-9, ge=0, description="Relative and absolute tolerance when a float is involved.")
    max_length: int = Field(default=500, ge=1, le=10_000, description="Longer expressions fail unevaluated.")
    max_bits: int = Field(
        default=4096, ge=64, le=1_000_000, description="An integer result (or step) wider than this fails: no 9**9**9."
    )
    timeout_s: float = Field(default=1.0, gt=0, le=60, description="Evaluation time per expression.")


class PythonCheck(_Check):
    """A user function over the record, in worker processes, each record under a timeout."""

    kind: Literal["python"]
    function: str = Field(
        description="'module:function' (importable, or a module beside the spec); called with the record as a dict, "
        "returns a bool, a number (see threshold) or (score, reason)."
    )
    threshold: float | None = Field(default=None, description="A number returned passes when >= this.")
    timeout_s: float = Field(default=10.0, gt=0, le=3600, description="Time per record before it fails as hung.")
    workers: int = Field(default=2, ge=1, le=64, description="Worker processes.")

    @field_validator("function")
    @classmethod
    def _function_path(cls, function: str) -> str:
        if not FUNCTION_PATH.match(function):
            raise ValueError(f"must read 'package.module:function'; got {function!r}")
        return function

    @property
    def module_name(self) -> str:
        return self.function.split(":", 1)[0]

    @property
    def function_name(self) -> str:
        return self.function.split(":", 1)[1]


QualityCheck = Annotated[
    FluencyCheck | ProseCheck | JudgeCheck | MathAnswerCheck | ExpressionCheck | PythonCheck, Field(discriminator="kind")
]


def quality_names_problem(checks: list[QualityCheck]) -> str | None:
    """Why the checks' names cannot all be score columns (repeated); None when they can."""
    names = [c.name for c in checks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"quality: check names must be distinct; repeated: {repeated}"
    if sum(c.kind == "math_answer" for c in checks) > 1:
        return f"quality: one math_answer check at most (its solve rate is the one column {SOLVE_RATE_COLUMN})"
    # The score cache keeps a math_answer check's solve rates under `<name>_solve_rate`, beside the check names.
    taken = sorted({f"{c.name}{SOLVE_RATE_COLUMN}" for c in checks if c.kind == "math_answer"} & set(names))
    if taken:
        return f"quality: check names {taken} are taken by the math_answer check's solve rates; rename the check"
    return None
