"""transformers engine: batched chat sampling, JSON-constrained decoding through xgrammar, exact sequence log-probs."""

from __future__ import annotations

import json
from typing import Any

import torch

from polyculture.engines.base import (
    Completion,
    Conversation,
    EngineError,
    SamplingParams,
)
from polyculture.engines.models import ResolvedModel


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: ResolvedModel, *, seed: int = 0, dtype: str = "auto", logprob_batch: int = 32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model.name
        # On CPU, float32 is faster than bf16 matmuls (STACK.md: 149 vs 86 tok/s).
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model.path))
            self.model = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise EngineError(f"transformers could not load model '{model.name}' from {model.path}: {exc}") from exc
        self.model.eval()
        self.tokenizer.padding_side = "left"  # batched generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._logprob_batch = logprob_batch
        self._grammars: dict[str, Any] = {}
        self._xgr_info: Any = None
        torch.manual_seed(seed)  # engine-level seed: the sequence of calls is reproducible

    def _render(self, conversation: Conversation, continuation: str | None = None) -> str:
        if continuation is None:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(
            [*conversation, {"role": "assistant", "content": continuation}], tokenize=False
        )

    def _compiled_grammar(self, json_schema: dict[str, Any]) -> Any:
        import xgrammar as xgr

        # Not sorted: property order is generation order (a "reasoning" field must come first).
        key = json.dumps(json_schema)
        if key not in self._grammars:
            if self._xgr_info is None:
                self._xgr_info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.model.config.vocab_size
                )
            compiler = xgr.GrammarCompiler(self._xgr_info)
            self._grammars[key] = compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        json_schema: dict[str, Any] | None = None,
    ) -> list[list[Completion]]:
        if not conversations:
            return []
        prompts = [self._render(c) for c in conversations]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
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

    @torch.inference_mode()
    def sequence_logprobs(self, conversation: Conversation, continuations: list[str]) -> list[float]:
        prompt_ids = self.tokenizer(self._render(conversation), add_special_tokens=False)["input_ids"]
        eot = self.tokenizer.eos_token
        sequences: list[list[int]] = []
        for text in continuations:
            full = self._render(conversation, text)
            # Score up to and including the end-of-turn token; the template's trailing newline is not generated.
            cut = full.find(eot, len(self._render(conversation)) - 1)
            full = full[: cut + len(eot)] if cut >= 0 else full
            ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
            if ids[: len(prompt_ids)] != prompt_ids:
                raise EngineError("chat template tokenises the prompt differently inside the full sequence")
            sequences.append(ids)
        scores: list[float] = []
        for start in range(0, len(sequences), self._logprob_batch):
            chunk = sequences[start : start + self._logprob_batch]
            width = max(len(s) for s in chunk)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
            for row, seq in enumerate(chunk):
                scores.append(float(logp[row, len(prompt_ids) - 1 : len(seq) - 1].sum()))
        return scores

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._grammars.clear()


def _stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    stop = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return stop
