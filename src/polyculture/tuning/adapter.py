"""Saving a tuned LoRA adapter with the metadata that makes it usable and accountable.

The folder is a plain peft adapter (adapter_config.json + adapter_model.safetensors) plus `polyculture-adapter.json`:
the base model by its polyculture name (so `model: {name: <adapter folder>}` in a build spec finds its base), the
families it was trained on and held out from, the final losses and the probe figures before and after.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from polyculture.runs.files import jsonable

ADAPTER_METADATA = "polyculture-adapter.json"


def save_adapter(model: torch.nn.Module, folder: Path, metadata: dict[str, Any]) -> Path:
    """Write the adapter and its metadata into `folder` atomically: a half-written adapter is never visible."""
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; adapters are never overwritten")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        (staging / ADAPTER_METADATA).write_text(json.dumps(jsonable(metadata), indent=2) + "\n", encoding="utf-8")
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_adapter_metadata(folder: Path) -> dict[str, Any] | None:
    path = folder / ADAPTER_METADATA
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
