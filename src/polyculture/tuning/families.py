"""Task families: an enumerable set of valid answers, a target distribution over them, and several prompt phrasings.

A family is data (configs/tuning/families/*.yaml). It is what the probe measures a model against and what diffuse
fine-tuning trains towards.
"""

from __future__ import annotations

import math
import re
import unicodedata
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polyculture.tuning.yaml_file import load_validated

FAMILY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Where family names are looked up: the working directory's configs, then the checkout this package came from.
FAMILY_DIRS = (Path("configs/tuning/families"), Path(__file__).resolve().parents[3] / "configs/tuning/families")


class FamilyError(ValueError):
    """A task family that cannot be used; the message names the file and field."""


class IntRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    start: int
    stop: int = Field(description="Inclusive upper end.")
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.stop < self.start:
            raise ValueError(f"range stop {self.stop} is below start {self.start}")
        if (self.stop - self.start) // self.step + 1 > 10_000:
            raise ValueError("a range may hold at most 10,000 options")
        return self


class OptionRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    range: IntRange


class TaskFamily(BaseModel):
    """One family. `options` are whole answers as the model should write them (matching is case-insensitive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Identifier, used on the command line and in adapter metadata.")
    description: str = ""
    exhaustive: bool = Field(
        description="true when the options are every valid answer (numbers 1-10); false when they are a sample of a "
        "larger set (fruits), so tuning stops early instead of forcing exactly this list."
    )
    options: list[str] | OptionRange = Field(description="The valid answers, or {range: {start, stop, step}}.")
    weights: list[float] | None = Field(default=None, description="Target weights per option; uniform when omitted.")
    prompts: list[str] = Field(min_length=1, description="Phrasings of the same request; each is probed and trained.")
    system: str | None = Field(default=None, description="Optional system prompt; the chat template's default if not.")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not FAMILY_NAME.match(name):
            raise ValueError(f"'{name}' is not a family name (letters, digits, - _ .)")
        return name

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, prompts: list[str]) -> list[str]:
        if any(not p.strip() for p in prompts):
            raise ValueError("prompts must not be empty strings")
        return prompts

    @model_validator(mode="after")
    def _consistent(self) -> TaskFamily:
        answers = self.answers
        if len(answers) < 2:
            raise ValueError("options must hold at least 2 answers")
        keys = [normalize_answer(a) for a in answers]
        dupes = sorted({a for a, k in zip(answers, keys, strict=True) if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"options must be distinct (ignoring case and spacing); repeated: {dupes}")
        if self.weights is not None:
            if len(self.weights) != len(answers):
                raise ValueError(f"weights has {len(self.weights)} entries but there are {len(answers)} options")
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be finite, >= 0 and not all 0")
        return self

    @cached_property
    def answers(self) -> list[str]:
        if isinstance(self.options, OptionRange):
            r = self.options.range
            return [str(i) for i in range(r.start, r.stop + 1, r.step)]
        return list(self.options)

    @cached_property
    def target(self) -> list[float]:
        """Target probability of each answer, in the order of `answers`."""
        weights = self.weights or [1.0] * len(self.answers)
        total = sum(weights)
        return [w / total for w in weights]

    @cached_property
    def target_entropy(self) -> float:
        """H(w) in nats: the lowest value the diffuse loss can reach."""
        return -sum(p * math.log(p) for p in self.target if p > 0)

    def conversations(self) -> list[list[dict[str, str]]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [[*system, {"role": "user", "content": prompt}] for prompt in self.prompts]

    def match(self, text: str) -> str | None:
        """The option a model's answer names, or None when it names none (an invalid output)."""
        return self._lookup.get(normalize_answer(text))

    @cached_property
    def _lookup(self) -> dict[str, str]:
        return {normalize_answer(a): a for a in self.answers}


def normalize_answer(text: str) -> str:
    """Case-, width- and spacing-insensitive form; surrounding quotes and a final full stop are ignored,
    so '  "Banana". ' names Banana but 'I pick Banana' does not (an answer must be the answer only)."""
    text = unicodedata.normalize("NFKC", text).strip().strip("\"'`*").strip()
    text = text.rstrip(".!").strip().strip("\"'`*").strip()
    return " ".join(text.casefold().split())


def load_family(path: Path) -> TaskFamily:
    return load_validated(
        path, TaskFamily, FamilyError, "a task family: a mapping with name, exhaustive, options, prompts"
    )


def family_dirs(extra: Path | None = None) -> list[Path]:
    dirs = ([extra] if extra is not None else []) + [d for d in FAMILY_DIRS]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def available_families(directory: Path | None = None, *, only: bool = False) -> dict[str, Path]:
    """Family name -> file, from `directory` (if given) then configs/tuning/families; `only`: that directory alone."""
    found: dict[str, Path] = {}
    for d in [directory] if only and directory is not None else family_dirs(directory):
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def resolve_family(name_or_path: str, directory: Path | None = None) -> TaskFamily:
    """A family by name (configs/tuning/families/<name>.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.is_file():
        if not path.is_file():
            raise FamilyError(f"task family file {path} does not exist")
        return load_family(path)
    known = available_families(directory)
    if name_or_path not in known:
        raise FamilyError(
            f"unknown task family '{name_or_path}'; known: {', '.join(sorted(known)) or '(none found)'}, "
            "or give the path of a family YAML file"
        )
    family = load_family(known[name_or_path])
    if family.name != name_or_path:
        raise FamilyError(f"{known[name_or_path]}: name '{family.name}' differs from the file name '{name_or_path}'")
    return family
