"""transformers engine: batched chat sampling, JSON-constrained decoding through xgrammar, exact sequence log-probs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from polyculture.accelerator import default_dtype, torch_device
from polyculture.engines.base import (
    Completion,
    Conversation,
    EngineError,
    SamplingParams,
)
from polyculture.engines.chat_tokens import AnswerTokens, TokenizationMismatch, answer_logprobs, answer_tokens
from polyculture.engines.model_files import ResolvedModel


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: ResolvedModel, *, seed: int = 0, dtype: str = "auto", logprob_batch: int = 128) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch_device()
        torch_dtype = getattr(torch, default_dtype(device) if dtype == "auto" else dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model.path))
            loaded = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise EngineError(f"transformers could not load model '{model.name}' from {model.path}: {exc}") from exc
        if model.adapter is not None:
            loaded = _merged_adapter(loaded, model)
        loaded = loaded.to(device)
        self._setup(loaded, tokenizer, name=model.name, seed=seed, logprob_batch=logprob_batch)

    @classmethod
    def from_loaded(
        cls, model: Any, tokenizer: Any, *, name: str, seed: int = 0, logprob_batch: int = 128
    ) -> TransformersEngine:
        """Wrap a model already in memory (a plain or peft-wrapped causal LM) without reloading it.

        The caller's model keeps its train/eval mode and the global torch RNG is left alone (the engine samples
        from its own seeded stream), so a tuner can probe its model between training steps.
        """
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, name=name, seed=seed, logprob_batch=logprob_batch)
        return engine

    def _setup(self, model: Any, tokenizer: Any, *, name: str, seed: int, logprob_batch: int) -> None:
        self.model_name = name
        self.model = model
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._logprob_batch = logprob_batch
        self._grammars: dict[str, Any] = {}
        self._xgrammar_tokenizer: Any = None
        # Engine-level seed on a private stream: the sequence of calls is reproducible, whatever else uses torch.
        self._rng_state = torch.Generator().manual_seed(seed).get_state()
        device = getattr(model, "device", None)
        self._device = device if isinstance(device, torch.device) else next(model.parameters()).device
        self._cuda_rng_state: torch.Tensor | None = None
        if self._device.type == "cuda":  # sampling on a GPU draws from that device's generator
            if self._device.index is None:
                self._device = torch.device("cuda", torch.cuda.current_device())
            with torch.random.fork_rng(devices=[self._device.index]):
                torch.cuda.manual_seed(seed)
                self._cuda_rng_state = torch.cuda.get_rng_state(self._device.index)

    @contextmanager
    def _inference(self, seed: int | None = None) -> Iterator[None]:
        """Eval mode, no autograd and the engine's own RNG stream; the model's mode is restored afterwards.

        With a seed, the call draws from a fresh stream of that seed and the engine's own stream is left where it was.
        """
        was_training = self.model.training
        cuda = [self._device.index] if self._cuda_rng_state is not None else []
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=cuda), torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)  # inside fork_rng: CPU and the forked CUDA device, restored on exit
                else:
                    torch.set_rng_state(self._rng_state)
                    if self._cuda_rng_state is not None:
                        torch.cuda.set_rng_state(self._cuda_rng_state, self._device.index)
                yield
                if seed is None:
                    self._rng_state = torch.get_rng_state()
                    if self._cuda_rng_state is not None:
                        self._cuda_rng_state = torch.cuda.get_rng_state(self._device.index)
        finally:
            self.model.train(was_training)

    def _render(self, conversation: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _compiled_grammar(self, json_schema: dict[str, Any]) -> Any:
        import xgrammar as xgr

        # Not sorted: property order is generation order (a "reasoning" field must come first).
        key = json.dumps(json_schema)
        if key not in self._grammars:
            if self._xgrammar_tokenizer is None:
                self._xgrammar_tokenizer = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.model.config.vocab_size
                )
            compiler = xgr.GrammarCompiler(self._xgrammar_tokenizer)
            self._grammars[key] = compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> list[list[Completion]]:
        if not conversations:
            return []
        with self._inference(params.seed):
            return self._generate(conversations, params, json_schema)

    def _generate(
        self, conversations: list[Conversation], params: SamplingParams, json_schema: dict[str, Any] | None
    ) -> list[list[Completion]]:
        prompts = [self._render(c) for c in conversations]
        # Left padding, per call: batched generation continues from the right edge, and a caller's tokenizer
        # (from_loaded) keeps its own padding side.
        batch = self.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(self._device)
        processors = []
        if json_schema is not None:
            from xgrammar.contrib.hf import LogitsProcessor

            # A new processor per call: it sizes its matchers to the batch on first use.
            processors.append(LogitsProcessor(self._compiled_grammar(json_schema)))
        do_sample = params.temperature > 0
        out = self.model.generate(
            **batch,
            do_sample=do_sample,
            temperature=params.temperature if do_sample else None,
            top_p=params.top_p if do_sample else None,
            top_k=0 if do_sample else None,
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n,
            logits_processor=processors or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        prompt_len = batch["input_ids"].shape[1]
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        stop_ids = _stop_token_ids(self.model, self.tokenizer)
        results: list[list[Completion]] = []
        for i in range(len(conversations)):
            row: list[Completion] = []
            for j in range(params.n):
                generated = out[i * params.n + j, prompt_len:].tolist()
                end = next((pos for pos, tok in enumerate(generated) if tok in stop_ids), None)
                tokens = generated if end is None else generated[:end]
                row.append(
                    Completion(
                        text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                        prompt_tokens=int(prompt_tokens[i]),
                        completion_tokens=len(tokens) + (0 if end is None else 1),
                        finish_reason="length" if end is None else "stop",
                    )
                )
            results.append(row)
        return results

    def sequence_logprobs(
        self, conversation: Conversation, continuations: list[str], *, mean_per_token: bool = False
    ) -> list[float]:
        try:
            tokens = answer_tokens(self.tokenizer, conversation, continuations)
        except TokenizationMismatch as exc:
            raise EngineError(str(exc)) from exc
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        with self._inference():
            # The prompt runs once per chunk and its cache is shared by the chunk's answers (answer_logprobs).
            for start in range(0, len(tokens.answer_ids), self._logprob_batch):
                chunk = AnswerTokens(tokens.prompt_ids, tokens.answer_ids[start : start + self._logprob_batch])
                sums = answer_logprobs(self.model, chunk, pad).tolist()
                if mean_per_token:
                    sums = [total / len(ids) for total, ids in zip(sums, chunk.answer_ids, strict=True)]
                scores.extend(sums)
        return scores

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._grammars.clear()


def _merged_adapter(base: Any, model: ResolvedModel) -> Any:
    """The base model with the LoRA adapter merged into its weights: plain matmuls at inference, no peft overhead."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(base, str(model.adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # missing files, bad config, shape mismatch
        raise EngineError(
            f"transformers could not apply adapter '{model.adapter}' to base model {model.path}: {exc}"
        ) from exc
    return peft_model.merge_and_unload()


def _stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    stop = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return stop
