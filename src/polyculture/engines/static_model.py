"""`minilm-l6-static`: a model2vec static embedding model distilled locally from the embedded MiniLM.

A static model looks token vectors up and averages them: no transformer pass, so it encodes ~100x faster than
MiniLM on CPU, at some cost in how well it tells paraphrases from different texts (bench/static_embedding.py measures
both). Nothing is downloaded: model2vec's `distill` runs MiniLM over its own vocabulary once (~1 minute on 2 cores);
the result is cached under `cache_root()/models/`, keyed on the source folder's contents, the model2vec version and
the PCA width, so a changed source or distiller never serves stale vectors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

STATIC_PCA_DIMS = 256  # model2vec's default; the distilled vectors are this wide


class StaticModelUnavailable(RuntimeError):
    """model2vec (or its distillation dependencies) is missing."""


def is_static_model_folder(folder: Path) -> bool:
    """A folder saved by model2vec (its config says so): loaded with model2vec, not sentence-transformers."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "model2vec"
    except (OSError, ValueError, AttributeError):
        return False


@functools.lru_cache(maxsize=4)
def folder_digest(folder: Path) -> str:
    """sha256 over every file's relative path and contents (once per process: the MiniLM folder is ~90 MB)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _model2vec_version() -> str:
    try:
        return importlib.metadata.version("model2vec")
    except importlib.metadata.PackageNotFoundError:
        raise StaticModelUnavailable(
            "embedding model 'minilm-l6-static' needs the package 'model2vec' (and 'skeletoken' to distill): "
            "pip install model2vec skeletoken"
        ) from None


def static_model_key(source: Path, pca_dims: int = STATIC_PCA_DIMS) -> str:
    return hashlib.sha256(f"{folder_digest(source)}|{_model2vec_version()}|{pca_dims}".encode()).hexdigest()[:16]


def distilled_static_model(source: Path, cache: Path, pca_dims: int = STATIC_PCA_DIMS) -> Path:
    """The model2vec folder distilled from the sentence-transformers folder `source`, made once under `cache`."""
    target = cache / f"minilm-l6-static-{static_model_key(source, pca_dims)}"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two processes starting together distill once
        if (target / "config.json").is_file():
            return target
        try:
            from model2vec.distill import distill
        except ImportError as exc:
            raise StaticModelUnavailable(
                f"distilling 'minilm-l6-static' needs model2vec's distill dependencies ({exc}): pip install skeletoken"
            ) from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the source is a local folder; never try the Hub
        model = distill(model_name=str(source), pca_dims=pca_dims)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            model.save_pretrained(str(staging))
            staging.rename(target)  # atomic: a half-written model is never visible
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
