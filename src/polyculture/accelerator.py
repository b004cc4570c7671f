"""Where torch work runs: the first CUDA device when torch sees one, else the CPU.

One rule for the transformers engine, tuning and the embedder, so a build on a GPU machine uses the GPU for all of
them with no setting; `CUDA_VISIBLE_DEVICES=""` keeps everything on the CPU.
"""

from __future__ import annotations


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """bfloat16 on a GPU; float32 on the CPU, where it is faster than bf16 matmuls (149 vs 86 tokens/s, SmolLM2)."""
    return "bfloat16" if device == "cuda" else "float32"
