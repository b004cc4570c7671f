"""Pieces every flow shares: loading the engine with progress (once per process), and the embed task."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from polyculture import progress
from polyculture.engines.base import Engine
from polyculture.engines.factory import create_engine
from polyculture.spec import BuildSpec, FluencyCheck, JudgeCheck, MathAnswerCheck, ModelSpec
from polyculture.stages.embed import load_embedder


@dataclass
class SharedEngine:
    """One process's engine for a model: loaded once, then used by every shard task this process runs (one
    generate call at a time: engines are not thread-safe, and the per-call seeds need the stream to themselves)."""

    engine: Engine
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


_ENGINES: dict[str, SharedEngine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(spec: BuildSpec, model: ModelSpec | None = None) -> tuple[SharedEngine, bool]:
    """This process's engine for the spec's model, or for `model` (a judge's own; loaded on first use); and whether
    this call loaded it.

    Keyed on everything that decides the engine (model section, seed, the folder relative paths start from), so
    a Dask or Ray worker serving several builds keeps one engine per model.
    """
    model = spec.model if model is None else model
    key = json.dumps([model.model_dump(mode="json"), spec.seed, str(spec.base_dir)], sort_keys=True)
    with _ENGINES_LOCK:  # two threads asking at once must not load the model twice
        if key in _ENGINES:
            return _ENGINES[key], False
        engine, seconds = load_engine(spec, model)
        _ENGINES[key] = SharedEngine(engine, seconds)
        return _ENGINES[key], True


def judge_engines(spec: BuildSpec) -> dict[str, Engine]:
    """The engines of the judge checks that name a model of their own, by check name (the others use the build's)."""
    return {
        check.name: shared_engine(spec, check.model)[0].engine
        for check in spec.quality
        if isinstance(check, JudgeCheck) and check.model is not None
    }


def needs_build_engine_for_quality(spec: BuildSpec) -> bool:
    """Whether a quality check reads records with the build's own model (fluency, math_answer; a judge without a
    model of its own)."""
    return any(
        isinstance(check, FluencyCheck | MathAnswerCheck) or (isinstance(check, JudgeCheck) and check.model is None)
        for check in spec.quality
    )


def close_shared_engines() -> None:
    """Close this process's engines (the build's own process, at the end of a build; workers keep theirs)."""
    with _ENGINES_LOCK:
        while _ENGINES:
            _, shared = _ENGINES.popitem()
            shared.engine.close()


def load_engine(spec: BuildSpec, model: ModelSpec | None = None) -> tuple[Engine, float]:
    """The spec's engine (or `model`'s), and the seconds it took to start (reported to the progress display)."""
    model = spec.model if model is None else model
    progress.report("load model", 0, 1, f"{model.engine}: {model.label}")
    started = time.perf_counter()
    engine = create_engine(model, seed=spec.seed, base_dir=spec.base_dir)
    seconds = time.perf_counter() - started
    progress.report("load model", 1, 1, f"{seconds:.0f} s")
    return engine, seconds


@task(name="embed", cache_policy=NONE)
def embed_task(spec: BuildSpec, texts: list[str]) -> np.ndarray:
    progress.report("embed", 0, len(texts), "records")
    vectors = load_embedder(spec.dedup.embedding_model, spec.base_dir).encode(texts)
    progress.report("embed", len(texts), len(texts), "records")
    return vectors
