"""embed: sentence-transformers (or model2vec static) embeddings, cached on disk by the sha256 of the text.

The cache lives under `cache_root()/embeddings/<model key>/` as `.npz` shards, each holding `keys` (32-byte sha256
digests, dtype S32) and `vectors` (float32, L2-normalised). A shard is written to a temp file and renamed into place,
so a crash never leaves a half-written shard visible; readers skip anything they cannot load, so the cache can only
ever cost a re-encode, never a wrong vector or a crash. Shards are append-only (one per encode call that computed
something); once there are many, one process merges what it has read into a single shard and deletes the shards it read.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from polyculture.accelerator import torch_device
from polyculture.embedded import EMBEDDED_EMBEDDING_MODELS
from polyculture.engines.model_files import cache_root, resolve_embedding_model
from polyculture.engines.static_model import is_static_model_folder
from polyculture.index.vectors import normalise_rows

log = logging.getLogger(__name__)

# Merge shards once a cache folder holds more than this many: keeps loading fast without rewriting on every call.
_COMPACT_AFTER = 64
_SHARD_SUFFIX = ".npz"


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def model_cache_key(name: str, path: Path) -> str:
    """Folder name of one model's cache.

    An embedded model is keyed by its name (same weights in every venv); any other model also by a hash of its
    resolved folder, so two different local folders that share a name never share vectors.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    if name in EMBEDDED_EMBEDDING_MODELS:
        # A distilled model's folder name carries its key (source, distiller version, width): vectors follow it.
        return path.name if name == "minilm-l6-static" else slug
    return f"{slug[:80]}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"


class Embedder:
    """A sentence-transformers model (on the GPU when torch sees one) or a model2vec static model (CPU), with a
    persistent per-model cache of text -> vector."""

    def __init__(self, name: str, base_dir: Path = Path("."), *, batch_size: int | None = None) -> None:
        resolved = resolve_embedding_model(name, base_dir)
        self.name = name
        self.path = resolved.path
        self.batch_size = batch_size or 64
        self.static = is_static_model_folder(resolved.path)
        if self.static:  # model2vec's own loader: numpy lookups, no torch pass (sentence-transformers' is slower)
            from model2vec import StaticModel

            self.model = StaticModel.from_pretrained(str(resolved.path))
            dimension = self.model.dim
        else:
            from sentence_transformers import SentenceTransformer

            device = torch_device()
            # 256 on a GPU: 6,541 vs 4,485 texts/s at 64 (H200, MiniLM); on 2 CPU cores the size hardly matters.
            self.batch_size = batch_size or (256 if device == "cuda" else 64)
            self.model = SentenceTransformer(str(resolved.path), device=device)
            get_dim = getattr(self.model, "get_embedding_dimension", None)
            dimension = (get_dim or self.model.get_sentence_embedding_dimension)()
        if not dimension:
            raise ValueError(f"embedding model '{name}' does not report a fixed embedding dimension")
        self.dimension = int(dimension)
        self.cache_key = model_cache_key(name, resolved.path)
        self._lock = threading.Lock()  # flows may call one shared embedder from several threads
        self._memory: dict[bytes, np.ndarray] = {}
        self._loaded_shards: set[str] = set()
        self._memory_dir: Path | None = None

    @property
    def cache_dir(self) -> Path:
        # Computed on each use so a changed POLYCULTURE_CACHE (tests, CLI option) is honoured by a long-lived embedder.
        return cache_root() / "embeddings" / self.cache_key

    def encode(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """float32 rows, L2-normalised, aligned with `texts`; only texts missing from the cache are encoded."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        keys = [text_key(t) for t in texts]
        with self._lock:
            cache_dir = self.cache_dir
            if self._memory_dir != cache_dir:
                self._memory, self._loaded_shards, self._memory_dir = {}, set(), cache_dir
            if any(k not in self._memory for k in keys):
                self._load_new_shards(cache_dir)  # another process may have encoded them meanwhile
            missing: dict[bytes, str] = {}
            for key, text in zip(keys, texts, strict=True):
                if key not in self._memory and key not in missing:
                    missing[key] = text
            if missing:
                fresh = self._encode_uncached(list(missing.values()), show_progress)
                new_keys = list(missing)
                self._memory.update(zip(new_keys, fresh, strict=True))
                self._write_shard(cache_dir, new_keys, fresh)
            for i, key in enumerate(keys):
                out[i] = self._memory[key]
        return out

    def remember(self, keys: Sequence[bytes], vectors: np.ndarray) -> int:
        """Take vectors computed elsewhere (a worker that embedded its shard's texts) into the cache, by text key
        (`text_key`); returns how many were new here (those are also written to the disk cache)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dimension):
            raise ValueError(f"remember: {len(keys)} keys but vectors of shape {vectors.shape} ({self.dimension}-d)")
        with self._lock:
            cache_dir = self.cache_dir
            if self._memory_dir != cache_dir:
                self._memory, self._loaded_shards, self._memory_dir = {}, set(), cache_dir
            fresh = [i for i, key in enumerate(keys) if key not in self._memory]
            if fresh:
                new_keys = [keys[i] for i in fresh]
                self._memory.update(zip(new_keys, vectors[fresh], strict=True))
                self._write_shard(cache_dir, new_keys, vectors[fresh])
        return len(fresh)

    def _encode_uncached(self, texts: list[str], show_progress: bool) -> np.ndarray:
        if self.static:
            # float16 weights: widen before normalising so every cached vector is float32 like MiniLM's.
            vectors = self.model.encode(texts, batch_size=1024, show_progress_bar=show_progress).astype(np.float32)
        else:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                show_progress_bar=show_progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        vectors = normalise_rows(np.asarray(vectors).reshape(len(texts), -1))
        if vectors.shape[1] != self.dimension:
            raise RuntimeError(f"model '{self.name}' returned {vectors.shape[1]}-d vectors, expected {self.dimension}")
        return vectors

    # -- on-disk cache -------------------------------------------------------------------------------------------

    def _shard_files(self, cache_dir: Path) -> list[Path]:
        if not cache_dir.is_dir():
            return []
        # Temp files start with "." and are never listed, so a crashed write is invisible.
        return sorted(p for p in cache_dir.iterdir() if p.suffix == _SHARD_SUFFIX and not p.name.startswith("."))

    def _load_new_shards(self, cache_dir: Path) -> None:
        for shard in self._shard_files(cache_dir):
            if shard.name in self._loaded_shards:
                continue
            try:
                with np.load(shard, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
                if keys.dtype != np.dtype("S32") or vectors.shape != (len(keys), self.dimension):
                    raise ValueError(f"unexpected arrays keys{keys.shape}/{keys.dtype} vectors{vectors.shape}")
            except FileNotFoundError:
                continue  # merged away by another process; its vectors are in the merged shard
            except Exception as exc:  # a foreign or damaged file must cost a re-encode, not the run
                log.warning("ignoring unreadable embedding cache shard %s: %s", shard, exc)
                continue
            vectors = vectors.astype(np.float32, copy=False)
            self._memory.update(zip(keys.tolist(), vectors, strict=True))
            self._loaded_shards.add(shard.name)

    def _write_shard(self, cache_dir: Path, keys: list[bytes], vectors: np.ndarray) -> None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            name = self._atomic_save(cache_dir, np.array(keys, dtype="S32"), vectors)
            self._loaded_shards.add(name)
            if len(self._loaded_shards) > _COMPACT_AFTER:
                self._compact(cache_dir)
        except OSError as exc:
            # A read-only or full disk loses the cache, not the embeddings just computed.
            log.warning("could not write the embedding cache in %s: %s", cache_dir, exc)

    def _atomic_save(self, cache_dir: Path, keys: np.ndarray, vectors: np.ndarray) -> str:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}{_SHARD_SUFFIX}"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=cache_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, keys=keys, vectors=np.ascontiguousarray(vectors, dtype=np.float32))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, cache_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return name

    def _compact(self, cache_dir: Path) -> None:
        """Merge everything this process has read into one shard, then delete only the shards it read."""
        read = set(self._loaded_shards)
        keys = list(self._memory)
        merged = self._atomic_save(cache_dir, np.array(keys, dtype="S32"), np.stack([self._memory[k] for k in keys]))
        for shard in read:
            (cache_dir / shard).unlink(missing_ok=True)
        self._loaded_shards = {merged}


@functools.lru_cache(maxsize=8)
def _cached_embedder(name: str, base_dir: Path) -> Embedder:
    return Embedder(name, base_dir)


def load_embedder(name: str, base_dir: Path = Path(".")) -> Embedder:
    """One Embedder per (name, base folder) per process: loading the model costs seconds, encoding with it does not."""
    return _cached_embedder(name, Path(base_dir).resolve())
