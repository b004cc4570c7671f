"""Pieces every flow shares: loading the engine with progress, and the embed task."""

from __future__ import annotations

import time

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from polyculture import progress
from polyculture.engines.base import Engine, create_engine
from polyculture.spec import BuildSpec
from polyculture.stages.embed import load_embedder


def load_engine(spec: BuildSpec) -> tuple[Engine, float]:
    """The spec's engine, and the seconds it took to start (reported to the progress display)."""
    progress.report("load model", 0, 1, f"{spec.model.engine}: {spec.model.label}")
    started = time.perf_counter()
    engine = create_engine(spec.model, seed=spec.seed, base_dir=spec.base_dir)
    seconds = time.perf_counter() - started
    progress.report("load model", 1, 1, f"{seconds:.0f} s")
    return engine, seconds


@task(name="embed", cache_policy=NONE)
def embed_task(spec: BuildSpec, texts: list[str]) -> np.ndarray:
    progress.report("embed", 0, len(texts), "records")
    vectors = load_embedder(spec.dedup.embedding_model, spec.base_dir).encode(texts)
    progress.report("embed", len(texts), len(texts), "records")
    return vectors
