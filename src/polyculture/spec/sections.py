"""The sections of a build spec that say what is generated and how it is kept: prompt, record, attributes, method,
sampling, generation, dedup and rebalance. Each refuses unknown keys and checks only what it holds."""

from __future__ import annotations

import math
from typing import Literal

import jinja2
from pydantic import ConfigDict, Field, field_validator, model_validator

from polyculture.spec.base import _Strict


class ExtractorSpec(_Strict):
    """How an attribute that is not a record field is read from the record (source: extract)."""

    method: Literal["embedding", "engine"] = Field(
        default="embedding",
        description="embedding: the label whose embedding is nearest the text's (fast, no model call); engine: ask the "
        "build's chat model, its output constrained to the allowed labels (slower, reads meaning better on big models).",
    )
    from_field: str | None = Field(
        default=None, description="Record field read (default: record.text_field, else the whole record)."
    )
    label_template: str = Field(
        default="{label}",
        description="embedding: how each label is phrased before it is embedded, e.g. 'a biography of a {label}'.",
    )
    instruction: str | None = Field(
        default=None, description="engine: the system message; {attribute} and {labels} are filled in (default: generic)."
    )
    min_score: float | None = Field(
        default=None, ge=-1, le=1, description="embedding: a text whose nearest label is below this cosine is a reject."
    )

    @field_validator("label_template")
    @classmethod
    def _has_label(cls, template: str) -> str:
        if "{label}" not in template:
            raise ValueError("label_template must contain '{label}'")
        return template


class Attribute(_Strict):
    """A categorical attribute with a target distribution over its values."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Identifier; also the prompt variable name.")
    values: list[str] = Field(min_length=1, description="The allowed values.")
    weights: list[float] | None = Field(
        default=None, description="Target weights, one per value (normalised; uniform when omitted). Must be >= 0."
    )
    source: Literal["prompt", "field", "extract"] = Field(
        default="prompt",
        description="prompt: the pipeline picks the value per cell, renders it into the prompt and sets the record "
        "field itself; field: the value is read from the record field and counted; extract: the value is read from "
        "the record's text by an extractor (see extractor) and published as a column of its own.",
    )
    field: str | None = Field(default=None, description="Record field holding the attribute (default: the name).")
    extractor: ExtractorSpec | None = Field(
        default=None, description="source extract: how the value is read (default: nearest label embedding)."
    )

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise ValueError(f"values must be distinct; repeated: {dupes}")
        return values

    @model_validator(mode="after")
    def _weights_match(self) -> Attribute:
        if self.weights is None:
            return self
        if len(self.weights) != len(self.values):
            raise ValueError(
                f"weights has {len(self.weights)} entries but values has {len(self.values)}; give one weight per value"
            )
        bad = [w for w in self.weights if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"weights must be finite and >= 0; got {bad}")
        if sum(self.weights) <= 0:
            raise ValueError("weights must not all be 0")
        return self

    @model_validator(mode="after")
    def _extractor_only_for_extract(self) -> Attribute:
        if self.source == "extract":
            if self.field is not None:
                raise ValueError("field does not apply to source 'extract' (use extractor.from_field for the text read)")
            if self.extractor is None:
                object.__setattr__(self, "extractor", ExtractorSpec())
        elif self.extractor is not None:
            raise ValueError(f"extractor applies to source 'extract' only, not '{self.source}'")
        return self

    @property
    def record_field(self) -> str:
        return self.field or self.name

    def target_distribution(self) -> dict[str, float]:
        weights = self.weights or [1.0] * len(self.values)
        total = float(sum(weights))
        return {v: w / total for v, w in zip(self.values, weights, strict=True)}


class ExemplarsSpec(_Strict):
    """Seed examples sampled into each prompt ("write a new problem inspired by these"), seeded by the run's seed."""

    source: str = Field(
        min_length=1,
        description="'champ' (the built-in CHAMP problems) or a parquet / JSON Lines / CSV file or parquet folder, "
        "relative to the spec file. Must not be a decontamination benchmark of the same build.",
    )
    field: str = Field(default="text", min_length=1, description="Column of the source holding each example's text.")
    per_prompt: int = Field(default=2, ge=1, le=10, description="Examples sampled into each prompt.")


class PromptSpec(_Strict):
    template: str = Field(
        min_length=1,
        description="Jinja2 template of the user message; attributes are variables (and `exemplars`, a list of "
        "texts, with prompt.exemplars).",
    )
    system: str | None = Field(default=None, description="Optional system message (Jinja2 too).")
    exemplars: ExemplarsSpec | None = Field(
        default=None,
        description="Examples from a source sampled into each prompt: the template's `exemplars` variable, or a "
        "block appended to the user message when the template does not use it.",
    )

    @field_validator("template", "system")
    @classmethod
    def _parses(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                jinja2.Environment().parse(text)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"not a valid Jinja2 template: {exc.message} (line {exc.lineno})") from exc
        return text


class RecordSpec(_Strict):
    schema_path: str = Field(alias="schema", description="Path of the record's JSON Schema (relative to the spec file).")
    text_field: str | None = Field(
        default=None, description="Field embedded for dedup and semantic diversity (default: the whole record)."
    )
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


MethodName = Literal["direct", "cot", "sequence", "multi_turn", "vs_standard", "vs_cot", "vs_multi"]
ProbabilityDefinition = Literal["explicit", "implicit", "relative", "percentage", "confidence"]


class MethodSpec(_Strict):
    name: MethodName = Field(
        default="vs_standard",
        description="Prompting method: direct, cot, sequence (k as a list), multi_turn (one alternative per turn), "
        "vs_standard, vs_cot (reasoning first), vs_multi (k split over turns).",
    )
    k: int = Field(default=5, ge=1, le=50, description="Responses per call (sequence, VS) or turns (multi_turn).")
    turns: int = Field(default=2, ge=1, le=20, description="vs_multi: the k responses are asked for over this many turns.")
    probability_definition: ProbabilityDefinition = Field(
        default="explicit", description="How VS asks for each response's probability."
    )
    probability_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="VS tail sampling: ask that each response's probability be below this value.",
    )
    selection: Literal["all", "sample", "threshold"] = Field(
        default="all",
        description="How a VS answer becomes records: keep all (with their verbalized weights), sample one by the "
        "verbalized weights, or drop those under selection_threshold keeping at least min_keep.",
    )
    selection_threshold: float | None = Field(default=None, ge=0, le=1, description="With selection: threshold.")
    min_keep: int = Field(default=1, ge=1, description="With selection: threshold, keep at least this many.")

    @model_validator(mode="after")
    def _selection(self) -> MethodSpec:
        if self.selection == "threshold" and self.selection_threshold is None:
            raise ValueError("selection 'threshold' needs selection_threshold (a probability in [0, 1])")
        if not self.name.startswith("vs_"):
            vs_only = {
                "probability_definition": self.probability_definition != "explicit",
                "probability_threshold": self.probability_threshold is not None,
                "selection": self.selection != "all",
            }
            used = [key for key, set_ in vs_only.items() if set_]
            if used:
                raise ValueError(f"{used} apply to Verbalized Sampling methods (vs_*), not to '{self.name}'")
        if self.name == "vs_multi" and self.turns > self.k:
            raise ValueError(f"vs_multi splits k={self.k} responses over turns={self.turns}: turns must be <= k")
        return self


class SamplingSpec(_Strict):
    temperature: float = Field(default=1.0, ge=0, le=5)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=1, le=32768)
    n: int = Field(default=1, ge=1, le=64, description="Samples per prompt.")


class GenerationSpec(_Strict):
    oversample: float = Field(
        default=1.5, ge=1, le=20, description="Candidates requested per target record, to absorb rejects and dups."
    )


class DedupSpec(_Strict):
    threshold: float = Field(default=0.92, gt=0, le=1, description="Cosine similarity at or above which two are dups.")
    embedding_model: str = Field(default="minilm-l6", description="Embedded name or local sentence-transformers folder.")
    keep: Literal["first", "probability", "central"] = Field(
        default="first",
        description="Which member of a duplicate cluster is kept: the first generated, the one with the highest "
        "verbalized probability, or the most central (highest summed similarity to its near duplicates).",
    )
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        default="auto",
        description="FAISS index: flat (exact) for small sets, ivf (approximate, chunked) for large ones; auto picks "
        "by size. hnsw is approximate too.",
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="Where FAISS searches: auto uses a GPU when a faiss GPU build is installed."
    )
    reference: list[str] = Field(
        default_factory=list,
        description="Reference indexes to dedup against (earlier releases, a reference dataset): run folders of "
        "earlier builds (their reference/ folder) or folders written by `polyculture index`; relative to the spec.",
    )

    @model_validator(mode="after")
    def _gpu_hnsw(self) -> DedupSpec:
        if self.index == "hnsw" and self.device == "gpu":
            raise ValueError("FAISS has no GPU HNSW index: use index flat or ivf on device gpu, or device cpu")
        return self


class CellWeight(_Strict):
    cell: dict[str, str] = Field(description="One value per attribute, e.g. {occupation: doctor, continent: Asia}.")
    weight: float = Field(ge=0, description="Relative weight of this joint cell (normalised over the table).")


class RebalanceSpec(_Strict):
    targets: Literal["joint", "marginals", "table"] = Field(
        default="joint",
        description="joint: every joint cell gets its exact quota (product of the attributes' weights, rounded so "
        "every marginal is exact too); marginals: only each attribute's own counts must be exact, cells may trade; "
        "table: exact quotas from an explicit joint table (`table`).",
    )
    table: list[CellWeight] | None = Field(default=None, description="targets table: the joint cells and weights.")
    surplus: Literal["farthest_point", "mmr"] = Field(
        default="farthest_point",
        description="How a surplus cell is cut down: greedy farthest-point on embeddings, or MMR (typical but "
        "diverse: relevance is the cosine to the cell's centroid).",
    )
    mmr_lambda: float = Field(default=0.5, ge=0, le=1, description="mmr: weight of relevance against redundancy.")
    top_up_rounds: int = Field(
        default=3, ge=0, le=20, description="Extra generation rounds for cells short of their quota (0: none)."
    )
    top_up_max_tokens: int | None = Field(
        default=None, ge=1, description="Generated-token budget over all top-up rounds (none: bounded by rounds only)."
    )
    top_up_oversample: float = Field(
        default=1.5, ge=1, le=20, description="Top-up candidates asked for per missing record, over the observed yield."
    )
    hint: str = Field(
        default="Its {{ name }} must be: {{ value }}.",
        description="Top-up rounds for a cell of field or extract attributes append this line per attribute to the "
        "prompt (Jinja2 with name and value); the value is still read from the record, never trusted.",
    )

    @model_validator(mode="after")
    def _table(self) -> RebalanceSpec:
        if self.targets == "table" and not self.table:
            raise ValueError("targets 'table' needs table: a list of {cell: {attribute: value, ...}, weight: w}")
        if self.targets != "table" and self.table is not None:
            raise ValueError(f"table applies to targets 'table', not '{self.targets}'")
        return self
