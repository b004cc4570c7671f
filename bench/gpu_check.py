"""GPU check: polyculture's transformers engine, one diffuse-tuning step and MiniLM embeddings on CUDA, in one call on
a bare GPU machine (torch, transformers, peft, sentence-transformers; no vLLM, FAISS, polars or registry access).

    bash bench/gpu_check.sh            # on the GPU machine, from the repository root; figures to $OUT/gpu_check.json
    .venv/bin/python bench/gpu_check.py --device cpu --quick   # a dry run here

No model weights travel (the working tree is capped at 64 MiB): the models are built with the embedded models'
exact architectures (bench/gpu_check_assets: SmolLM2-135M's config and tokenizer, all-MiniLM-L6-v2's) and random
weights, so the figures are throughput, not quality. Each section runs on its own: a failure is reported and the
others still run.
1. The transformers engine (polyculture.engines.transformers_engine, the class builds use, wrapped around the model
   with `from_loaded`): generated tokens/s at 1, 32 and 256 concurrent sequences (T=1.0, max_tokens 128, bf16), and
   plain `model.generate` on the same batches as a control.
2. One diffuse fine-tuning step (the project's diffuse loss over answer log-probs, peft LoRA with the project's
   default rank and target modules): seconds per step and peak GPU memory.
3. MiniLM embeddings through sentence-transformers: texts/s over 20,000 short texts, batch 256, fp32 and fp16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "gpu_check_assets"
sys.path.insert(0, str(ROOT / "src"))  # the engine's modules import torch and the standard library only
# Wheels that travel with the working tree (the GPU machine reaches no registry): pydantic for the tuning step's
# settings. Fetch them here with `make gpu-wheels`; they are unpacked, not installed, on the machine.
WHEELS = ROOT / ".gpu_wheels"


def unpack_wheels() -> list[str]:
    import zipfile

    if not WHEELS.is_dir():
        return []
    target = Path(tempfile.mkdtemp(prefix="wheels-"))
    names = []
    for wheel in sorted(WHEELS.glob("*.whl")):
        zipfile.ZipFile(wheel).extractall(target)
        names.append(wheel.name)
    sys.path.insert(0, str(target))
    return names
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # tuning.config's


def section(name: str, results: dict[str, Any], run) -> None:
    started = time.perf_counter()
    try:
        results[name] = run()
    except Exception as exc:  # noqa: BLE001 - one section's failure must leave the others' figures
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    results[name]["section_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({name: results[name]}, default=str), flush=True)


def chat_model(device: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig.from_pretrained(ASSETS / "smollm2")
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "smollm2")
    return model, tokenizer


def engine_throughput(device: str, sizes: list[int], max_tokens: int) -> dict[str, Any]:
    """Per size, in this order: the engine, plain generate with the library's defaults (top-k 50), plain generate
    with the engine's sampling arguments (full vocabulary) under no_grad and under inference_mode, and the engine
    again (an order effect shows as a gap between its two runs)."""
    import torch

    from polyculture.engines.base import SamplingParams
    from polyculture.engines.transformers_engine import TransformersEngine

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = chat_model(device, dtype)
    engine = TransformersEngine.from_loaded(model, tokenizer, name="smollm2-135m-architecture", seed=0)
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, n=1)
    engine.generate([[{"role": "user", "content": "Warm up."}]], SamplingParams(max_tokens=8))
    figures: dict[str, Any] = {"dtype": str(dtype), "max_tokens": max_tokens}
    engine_kwargs = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    for size in sizes:
        conversations = [[{"role": "user", "content": f"Write biography number {i}."}] for i in range(size)]
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        def run_engine() -> int:
            done = engine.generate(conversations, params)
            return sum(c.completion_tokens for row in done for c in row)

        def run_plain(context, **kwargs) -> int:
            with context():
                out = model.generate(**batch, do_sample=True, max_new_tokens=max_tokens, pad_token_id=pad, **kwargs)
            return int(out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1]))

        variants = [
            ("engine", run_engine),
            ("plain_generate", lambda: run_plain(torch.no_grad, temperature=1.0)),
            ("plain_engine_args", lambda: run_plain(torch.no_grad, **engine_kwargs)),
            ("plain_engine_args_inference_mode", lambda: run_plain(torch.inference_mode, **engine_kwargs)),
            ("engine_again", run_engine),
        ]
        for name, run in variants:
            _sync(device)
            started = time.perf_counter()
            tokens = run()
            _sync(device)
            seconds = time.perf_counter() - started
            figures.setdefault(name, {})[str(size)] = {"tokens": tokens, "seconds": round(seconds, 2),
                                                       "tokens_per_s": round(tokens / seconds, 1),
                                                       "ms_per_step": round(1000 * seconds / max_tokens, 1)}  # fmt: skip
    if device == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    engine.close()
    return figures


def saved_chat_model(folder: Path) -> Path:
    """The random-weights SmolLM2 architecture written as a model folder, for the code paths that load from disk."""
    import torch

    model, tokenizer = chat_model("cpu", torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_engine(size: int, max_tokens: int) -> dict[str, Any]:
    """The engine as a build makes it (factory path: a model folder, dtype auto): where it puts itself, and tok/s."""
    from polyculture.engines.base import SamplingParams
    from polyculture.engines.model_files import ResolvedModel
    from polyculture.engines.transformers_engine import TransformersEngine

    folder = saved_chat_model(Path(tempfile.mkdtemp(prefix="smollm2-")))
    engine = TransformersEngine(ResolvedModel("smollm2-135m-architecture", folder), seed=0)
    figures: dict[str, Any] = {"device": str(engine._device), "dtype": str(next(engine.model.parameters()).dtype)}
    engine.generate([[{"role": "user", "content": "Warm up."}]], SamplingParams(max_tokens=8))
    conversations = [[{"role": "user", "content": f"Write biography number {i}."}] for i in range(size)]
    _sync(figures["device"].split(":")[0])
    started = time.perf_counter()
    done = engine.generate(conversations, SamplingParams(temperature=1.0, max_tokens=max_tokens, n=1, seed=7))
    _sync(figures["device"].split(":")[0])
    seconds = time.perf_counter() - started
    tokens = sum(c.completion_tokens for row in done for c in row)
    figures[str(size)] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    engine.close()
    return figures


def sft_steps(examples: int, steps: int) -> dict[str, Any]:
    """The generations loop's tuning step (tuning.sft.train_sft, LoRA r=8) on a model folder: device and s/step."""
    from types import SimpleNamespace

    from polyculture.tuning.sft import train_sft

    folder = saved_chat_model(Path(tempfile.mkdtemp(prefix="smollm2-sft-")))
    records = [[{"role": "user", "content": "Write a boolean expression and its value."},
                {"role": "assistant", "content": f'{{"expression": "True and not False", "value": {i % 2 == 0}}}'}]
               for i in range(examples)]  # fmt: skip
    settings = SimpleNamespace(seed=0, rank=8, alpha=16, target_modules=LORA_MODULES, max_tokens=256, steps=steps,
                               batch_size=8, learning_rate=5e-4)  # fmt: skip
    started = time.perf_counter()
    result = train_sft(folder, records, settings, Path(tempfile.mkdtemp(prefix="adapter-")) / "adapter", {})
    import torch

    figures = {"examples": result.examples, "steps": result.steps, "train_seconds": result.seconds,
               "seconds_per_step": round(result.seconds / steps, 3), "wall_seconds": round(time.perf_counter() - started, 1),
               "cuda_used": torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0}  # fmt: skip
    if torch.cuda.is_available():
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return figures


def tuning_step(device: str, steps: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from polyculture.engines.chat_tokens import answer_logprobs, answer_tokens
    from polyculture.tuning.loss import diffuse_loss

    model, tokenizer = chat_model(device, torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_MODULES,
                                             task_type="CAUSAL_LM"))  # fmt: skip
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    answers = [str(n) for n in range(1, 101)]  # the probe's "a random number from 1 to 100" family: 100 answers
    tokens = answer_tokens(tokenizer, [{"role": "user", "content": "Pick a random number from 1 to 100."}], answers)
    target = torch.full((len(answers),), 1.0 / len(answers), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        loss = diffuse_loss(answer_logprobs(model, tokens, tokenizer.pad_token_id or 0), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        times.append(time.perf_counter() - started)
    figures = {"answers": len(answers), "lora_r": 4, "steps": steps, "first_step_s": round(times[0], 3),
               "median_step_s": round(sorted(times)[len(times) // 2], 3), "final_loss": round(float(loss.detach()), 4)}  # fmt: skip
    if device == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return figures


def minilm_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="minilm-"))
    for path in (ASSETS / "minilm").rglob("*"):
        if path.is_file():
            (folder / path.relative_to(ASSETS / "minilm")).parent.mkdir(parents=True, exist_ok=True)
            (folder / path.relative_to(ASSETS / "minilm")).write_bytes(path.read_bytes())
    return folder


def embedding_throughput(device: str, texts: int) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    folder = minilm_folder()
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(ASSETS / "minilm")).save_pretrained(folder)
    corpus = [f"Record {i}: a fictional {('farmer', 'nurse', 'chef')[i % 3]} born in {1900 + i % 100}, who worked "
              f"for {i % 40} years in a small town." for i in range(texts)]  # fmt: skip
    figures: dict[str, Any] = {"texts": texts, "batch_size": 256}
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
        model = SentenceTransformer(str(folder), device=device)
        if precision == "fp16":
            model = model.half()
        model.encode(corpus[:512], batch_size=256)
        _sync(device)
        started = time.perf_counter()
        vectors = model.encode(corpus, batch_size=256, normalize_embeddings=True)
        _sync(device)
        seconds = time.perf_counter() - started
        figures[precision] = {"seconds": round(seconds, 2), "texts_per_s": round(texts / seconds, 1),
                              "dimensions": int(vectors.shape[1])}  # fmt: skip
    return figures


def build_embedder(texts: int) -> dict[str, Any]:
    """stages.embed.Embedder (the class builds use) on a MiniLM-architecture folder: its device and texts/s at its
    default batch (64) and at 256, cache writes included."""
    import torch
    from transformers import BertConfig, BertModel

    os.environ["POLYCULTURE_CACHE"] = tempfile.mkdtemp(prefix="polyculture-cache-")
    from polyculture.stages.embed import Embedder

    folder = minilm_folder()
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(ASSETS / "minilm")).save_pretrained(folder)
    figures: dict[str, Any] = {"texts": texts}
    for batch_size in (64, 256):
        embedder = Embedder(str(folder), batch_size=batch_size)
        figures["device"] = str(embedder.model.device)
        embedder.encode([f"warm up {i}" for i in range(256)])
        corpus = [f"Record {batch_size}-{i}: a fictional {('farmer', 'nurse', 'chef')[i % 3]} born in {1900 + i % 100}, "
                  f"who worked for {i % 40} years in a small town." for i in range(texts)]  # fmt: skip
        _sync("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        embedder.encode(corpus)
        seconds = time.perf_counter() - started
        figures[f"batch_{batch_size}"] = {"seconds": round(seconds, 2), "texts_per_s": round(texts / seconds, 1)}
    return figures


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of every section)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default: $OUT)")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {"python": platform.python_version(), "device": args.device,
                               "unpacked_wheels": unpack_wheels()}  # fmt: skip
    try:
        import torch
        import transformers

        results["torch"], results["transformers"] = torch.__version__, transformers.__version__
        results["cuda_available"] = torch.cuda.is_available()
        if args.device == "cuda":
            results["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        results["import_error"] = repr(exc)
    for name in ("peft", "sentence_transformers", "pydantic", "polars", "vllm", "faiss"):
        try:
            results.setdefault("libraries", {})[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent is a figure too
            results.setdefault("libraries", {})[name] = None
    if args.device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)  # fmt: skip
        results["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    print(json.dumps(results), flush=True)
    sizes, max_tokens, steps, texts = ([1, 4], 16, 2, 512) if args.quick else ([1, 32, 256], 128, 5, 20_000)
    section("engine", results, lambda: engine_throughput(args.device, sizes, max_tokens))
    section("tuning_step", results, lambda: tuning_step(args.device, steps))
    section("embeddings", results, lambda: embedding_throughput(args.device, texts))
    section("build_engine", results, lambda: build_engine(sizes[-1], max_tokens))
    section("sft_steps", results, lambda: sft_steps(64 if not args.quick else 8, 20 if not args.quick else 2))
    section("build_embedder", results, lambda: build_embedder(texts))
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
