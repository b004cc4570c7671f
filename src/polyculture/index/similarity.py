"""A cosine-similarity index over L2-normalised float32 rows that returns every neighbour at or above a threshold.

Exact flat search up to `FLAT_MAX_ROWS` rows, an inverted-file index (IVF) beyond; HNSW on request; a GPU when FAISS
has one. On the CPU, flat and IVF answer with `range_search` (every hit in the scanned rows, no cap). HNSW and every
GPU index answer with k-nearest search instead (HNSW's range search aborts on large calls, GPU indexes have none): a
query whose k-th neighbour still clears the threshold is searched again with twice the k, up to `MAX_K`, so a big
cluster is not silently cut short; queries still full at `MAX_K` are listed in `Neighbors.truncated`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

KINDS = ("flat", "ivf", "hnsw")
DEVICES = ("cpu", "gpu")
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"

# Above this many rows `auto` leaves exact search. Measured with bench/dedup_scale.py (2 shared cores, 384-d,
# threshold 0.9): a full flat self-search took 59 s at 50k rows and 230 s at 100k, growing with n^2 (hours at 1M);
# IVF took 22 s at 50k and 54 s at 100k (train + add + search) and found 99.5-100% of the pairs. Up to 50k exact
# search costs about a minute, so small runs stay exact; beyond it the approximate index wins quickly.
FLAT_MAX_ROWS = 50_000
# float32 rounding: identical unit vectors can score 0.99999994, which must still count at threshold 1.0.
SIMILARITY_TOLERANCE = 1e-6
# FAISS range_search keeps scores strictly above the radius: search this much lower, then apply ">=" ourselves.
RANGE_MARGIN = 1e-4
# GPU k-NN accepts k <= 2048; the same cap on the CPU bounds one chunk's result arrays (1024 x 2048 x 12 bytes).
MAX_K = 2048
# FAISS k-means warns below 39 training rows per centroid; 64 gives more even lists (faster search) at modest cost.
TRAIN_ROWS_PER_LIST = 64
MIN_TRAIN_ROWS_PER_LIST = 39
# k-means iterations (FAISS default 25): at 200k rows 10 trained ~2.5x faster with the same recall and list balance.
KMEANS_ITERATIONS = 10
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # flat | ivf | hnsw
    device: str  # cpu | gpu
    nlist: int = 0  # ivf: inverted lists (k-means centroids)
    nprobe: int = 0  # ivf: lists scanned per query
    hnsw_m: int = 0  # hnsw: links per node
    ef_search: int = 0  # hnsw: candidate-list size per query (raised to k when k is larger)
    k: int = 32  # neighbours per query for k-NN search (hnsw, gpu), before doubling


@dataclass(frozen=True)
class Neighbors:
    """CSR-like: query q's neighbours are ids[lims[q]:lims[q+1]], most similar first (ties by id)."""

    lims: np.ndarray  # int64, [q + 1]
    ids: np.ndarray  # int64, row numbers in the index (in order of addition)
    sims: np.ndarray  # float32 cosines, >= threshold (up to SIMILARITY_TOLERANCE)
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # queries cut at MAX_K

    def __len__(self) -> int:
        return len(self.lims) - 1

    def of(self, q: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[self.lims[q] : self.lims[q + 1]], self.sims[self.lims[q] : self.lims[q + 1]]

    @staticmethod
    def concat(parts: list[Neighbors]) -> Neighbors:
        if not parts:
            return Neighbors(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        lims, offset_q, offset_n = [np.zeros(1, np.int64)], 0, 0
        for part in parts:
            lims.append(part.lims[1:] + offset_n)
            offset_n += int(part.lims[-1])
        truncated = []
        for part in parts:
            truncated.append(part.truncated + offset_q)
            offset_q += len(part)
        return Neighbors(
            np.concatenate(lims),
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.sims for p in parts]),
            np.concatenate(truncated),
        )


def gpu_available() -> bool:
    # faiss-cpu has get_num_gpus() too (always 0); older builds may lack it.
    return getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _resolve_device(device: str, kind: str) -> str:
    if device not in ("auto", *DEVICES):
        raise ValueError(f"device must be one of auto, cpu, gpu; got {device!r}")
    if device == "gpu":
        if not gpu_available():
            raise ValueError(
                "device 'gpu' needs a FAISS GPU build (faiss-gpu) and a visible GPU; this FAISS has none. "
                "Use device 'cpu' or 'auto'."
            )
        if kind == "hnsw":
            raise ValueError("FAISS has no GPU HNSW index: use kind 'flat' or 'ivf' on device 'gpu', or device 'cpu'")
    if device == "auto":
        return "gpu" if gpu_available() and kind != "hnsw" else "cpu"
    return device


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists, but never fewer than MIN_TRAIN_ROWS_PER_LIST training rows per list."""
    return int(max(1, min(4 * math.sqrt(max(n, 1)), n // MIN_TRAIN_ROWS_PER_LIST, 65_536)))


def default_nprobe(nlist: int) -> int:
    # Measured (bench/dedup_scale.py, threshold 0.9): at 100k rows nprobe 8 and 16 found 99.5% of the pairs, 32 all;
    # at 1M rows / 4000 lists all of them from 8 up, and a full self-search at 16 took ~7 min on 2 cores. 16 keeps a
    # margin for real embeddings, which are harder than the synthetic ones.
    return int(min(nlist, max(16, nlist // 250)))


def choose_index(n: int, kind: str = "auto", device: str = "auto") -> IndexPlan:
    """The index for about `n` rows: exact flat up to FLAT_MAX_ROWS, IVF beyond; HNSW only when asked for."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if kind not in ("auto", *KINDS):
        raise ValueError(f"kind must be one of auto, flat, ivf, hnsw; got {kind!r}")
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_ROWS else "ivf"
    resolved = _resolve_device(device, kind)
    if kind == "flat":
        return IndexPlan("flat", resolved)
    if kind == "ivf":
        nlist = default_nlist(n)
        return IndexPlan("ivf", resolved, nlist=nlist, nprobe=default_nprobe(nlist))
    return IndexPlan("hnsw", resolved, hnsw_m=32, ef_search=64)


_GPU_RESOURCES: Any = None


def _gpu_resources() -> Any:
    # One set per process: creating it reserves scratch GPU memory.
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def _check_plan(plan: IndexPlan) -> None:
    if plan.kind not in KINDS:
        raise ValueError(f"plan.kind must be one of {', '.join(KINDS)}; got {plan.kind!r}")
    _resolve_device(plan.device, plan.kind)
    if plan.device not in DEVICES:
        raise ValueError(f"plan.device must be cpu or gpu (resolve 'auto' with choose_index); got {plan.device!r}")
    if not 1 <= plan.k <= MAX_K:
        raise ValueError(f"plan.k must be in [1, {MAX_K}]; got {plan.k}")
    if plan.kind == "ivf" and not (plan.nlist >= 1 and plan.nprobe >= 1):
        raise ValueError(f"an ivf plan needs nlist >= 1 and nprobe >= 1; got {plan.nlist}, {plan.nprobe}")
    if plan.kind == "hnsw" and not (plan.hnsw_m >= 2 and plan.ef_search >= 1):
        raise ValueError(f"an hnsw plan needs hnsw_m >= 2 and ef_search >= 1; got {plan.hnsw_m}, {plan.ef_search}")


def _rows(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """float32 C-contiguous unit (or all-zero) rows, or a ValueError saying what is wrong."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (one row per vector); got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have dimension {array.shape[1]}, but the index has dimension {dim}")
    if array.shape[1] == 0:
        raise ValueError(f"{what} have dimension 0")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must be floating point; got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    # In slices: whole-array temporaries would double the memory of a million-row matrix.
    for start in range(0, array.shape[0], 65_536):
        block = array[start : start + 65_536]
        if not np.isfinite(block).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        bad = np.flatnonzero((np.abs(norms - 1) > NORM_TOLERANCE) & (norms != 0))
        if bad.size:
            raise ValueError(
                f"{what} must be L2-normalised (inner product = cosine); row {start + bad[0]} has norm "
                f"{norms[bad[0]]:.4f}"
            )
    return array


def _check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, int | float | np.floating) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    return float(threshold)


def _new_cpu_index(dim: int, plan: IndexPlan) -> faiss.Index:
    if plan.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if plan.kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexHNSWFlat(dim, plan.hnsw_m, faiss.METRIC_INNER_PRODUCT)


class SimilarityIndex:
    def __init__(self, index: faiss.Index, plan: IndexPlan, dim: int) -> None:
        self._index = index
        self.plan = plan
        self._dim = dim
        self._apply_search_params()

    # ---- building ---------------------------------------------------------------------------------------------

    @classmethod
    def trained(cls, vectors: np.ndarray, plan: IndexPlan, seed: int = 0) -> SimilarityIndex:
        """An empty index, trained (ivf: k-means on a seeded sample of `vectors`) but holding no rows yet."""
        _check_plan(plan)
        rows = _rows(vectors, None, "vectors")
        cpu = _new_cpu_index(rows.shape[1], plan)
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, cpu) if plan.device == "gpu" else cpu
        if plan.kind == "ivf":
            if rows.shape[0] < plan.nlist:
                raise ValueError(f"an ivf index with {plan.nlist} lists needs >= {plan.nlist} training rows")
            take = min(rows.shape[0], plan.nlist * TRAIN_ROWS_PER_LIST)
            rng = np.random.default_rng(seed)
            sample = rows if take == rows.shape[0] else rows[np.sort(rng.choice(rows.shape[0], take, replace=False))]
            # GPU IVF indexes carry their own clustering parameters and are no IndexIVF subclass.
            params = (index if plan.device == "gpu" else faiss.extract_index_ivf(index)).cp
            params.seed = seed
            params.niter = KMEANS_ITERATIONS
            params.spherical = True  # unit-norm centroids: the right k-means for cosine
            index.train(sample)
        return cls(index, plan, rows.shape[1])

    @classmethod
    def build(cls, vectors: np.ndarray, plan: IndexPlan, seed: int = 0) -> SimilarityIndex:
        """Train on `vectors` (when the kind needs it) and add them all; row i of `vectors` gets id i."""
        built = cls.trained(vectors, plan, seed)
        built.add(vectors)
        return built

    def add(self, vectors: np.ndarray) -> None:
        """Append rows; they get ids ntotal, ntotal + 1, ..."""
        rows = _rows(vectors, self._dim, "vectors")
        # Add in slices: HNSW insertion and GPU copies stay bounded in memory.
        for start in range(0, rows.shape[0], 65_536):
            self._index.add(rows[start : start + 65_536])

    def tune_search(self, *, nprobe: int | None = None, ef_search: int | None = None, k: int | None = None) -> None:
        """Change search-time settings without rebuilding."""
        changes = {n: v for n, v in (("nprobe", nprobe), ("ef_search", ef_search), ("k", k)) if v is not None}
        plan = replace(self.plan, **changes)
        _check_plan(plan)
        self.plan = plan
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.plan.kind == "ivf":
            if self.plan.device == "gpu":
                faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", self.plan.nprobe)
            else:
                faiss.extract_index_ivf(self._index).nprobe = self.plan.nprobe
        elif self.plan.kind == "hnsw":
            self._index.hnsw.efSearch = self.plan.ef_search

    # ---- facts ------------------------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def exact(self) -> bool:
        """Whether results are exact (flat); ivf and hnsw may miss some neighbours."""
        return self.plan.kind == "flat"

    # ---- searching --------------------------------------------------------------------------------------------

    def neighbors(
        self,
        queries: np.ndarray,
        threshold: float,
        *,
        chunk: int = 1024,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Neighbors:
        """Every indexed row with cosine >= threshold to each query (itself included when it is indexed)."""
        return Neighbors.concat(
            [part for _, part in self.iter_neighbors(queries, threshold, chunk=chunk, on_chunk=on_chunk)]
        )

    def iter_neighbors(
        self,
        queries: np.ndarray,
        threshold: float,
        *,
        chunk: int = 1024,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Iterator[tuple[int, Neighbors]]:
        """Like `neighbors`, one chunk at a time: yields (first query number, that chunk's Neighbors)."""
        threshold = _check_threshold(threshold)
        if not 1 <= chunk <= 1024:
            # HNSW range search aborts the process past ~1000 queries per call; keep every path under that.
            raise ValueError(f"chunk must be in [1, 1024]; got {chunk}")
        rows = _rows(queries, self._dim, "queries")
        total = rows.shape[0]
        use_range = self.plan.device == "cpu" and self.plan.kind in ("flat", "ivf")
        for start in range(0, total, chunk):
            block = rows[start : start + chunk]
            part = self._range(block, threshold) if use_range else self._knn(block, threshold)
            yield start, part
            if on_chunk is not None:
                on_chunk(min(start + chunk, total), total)

    def _range(self, block: np.ndarray, threshold: float) -> Neighbors:
        lims, sims, ids = self._index.range_search(block, threshold - RANGE_MARGIN)
        owner = np.repeat(np.arange(block.shape[0]), np.diff(lims.astype(np.int64)))
        return _collect(owner, ids.astype(np.int64), sims, threshold, block.shape[0], np.zeros(0, np.int64))

    def _knn(self, block: np.ndarray, threshold: float) -> Neighbors:
        floor = threshold - SIMILARITY_TOLERANCE
        k = min(self.plan.k, self.ntotal, MAX_K)
        pending = np.arange(block.shape[0])
        owners, all_ids, all_sims, truncated = [], [], [], []
        while pending.size and k > 0:
            sims, ids = self._search(block[pending], k)
            full = (ids[:, -1] >= 0) & (sims[:, -1] >= floor)  # the k-th hit still clears: maybe more beyond it
            can_grow = k < min(self.ntotal, MAX_K)
            done = ~full if can_grow else np.ones(len(pending), dtype=bool)
            if not can_grow and k < self.ntotal:
                truncated.append(pending[full])
            rows = np.flatnonzero(done)
            owners.append(np.repeat(pending[rows], k))
            all_ids.append(ids[rows].ravel())
            all_sims.append(sims[rows].ravel())
            pending = pending[~done]
            k = min(2 * k, self.ntotal, MAX_K)
        cut = np.concatenate(truncated) if truncated else np.zeros(0, np.int64)
        if not owners:
            owners, all_ids, all_sims = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        return _collect(
            np.concatenate(owners), np.concatenate(all_ids), np.concatenate(all_sims), threshold, block.shape[0], cut
        )

    def _search(self, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.plan.kind == "hnsw" and k > self.plan.ef_search:
            # HNSW returns at most efSearch useful hits: widen the candidate list with k.
            return self._index.search(block, k, params=faiss.SearchParametersHNSW(efSearch=k))
        return self._index.search(block, k)

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write index.faiss (a CPU copy) and index.json into `folder`, each atomically (temp file + rename)."""
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        cpu = faiss.index_gpu_to_cpu(self._index) if self.plan.device == "gpu" else self._index
        _atomic_write(target / INDEX_FILE, lambda path: faiss.write_index(cpu, str(path)))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.plan.kind,
            "dim": self._dim,
            "ntotal": self.ntotal,
            "plan": asdict(self.plan),
        }
        # The metadata goes last: a folder with an index.json always has the matching index.faiss.
        _atomic_write(target / META_FILE, lambda path: path.write_text(json.dumps(meta, indent=2) + "\n"))
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: str = "auto") -> SimilarityIndex:
        """Read a saved index; device auto puts it on a GPU when FAISS has one (HNSW stays on the CPU)."""
        source = Path(folder)
        meta_path = source / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"no saved similarity index in {source} (missing {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION}"
            )
        plan = IndexPlan(**meta["plan"])
        plan = replace(plan, device=_resolve_device(device, plan.kind))
        _check_plan(plan)
        cpu = faiss.read_index(str(source / INDEX_FILE))
        if cpu.d != meta["dim"] or cpu.ntotal != meta["ntotal"]:
            raise ValueError(
                f"{source}: {INDEX_FILE} holds {cpu.ntotal} x {cpu.d}, but {META_FILE} says {meta['ntotal']} x {meta['dim']}"
            )
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, cpu) if plan.device == "gpu" else cpu
        return cls(index, plan, int(meta["dim"]))


def _collect(
    owner: np.ndarray, ids: np.ndarray, sims: np.ndarray, threshold: float, nq: int, truncated: np.ndarray
) -> Neighbors:
    """Keep hits >= threshold, order them by query, then similarity (descending), then id."""
    keep = (ids >= 0) & (sims >= threshold - SIMILARITY_TOLERANCE)
    owner, ids, sims = owner[keep], ids[keep], sims[keep].astype(np.float32)
    order = np.lexsort((ids, -sims, owner))
    lims = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=nq), out=lims[1:])
    return Neighbors(lims, ids[order].astype(np.int64), sims[order], np.sort(truncated).astype(np.int64))


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    # A unique name beside the target (same file system, so the rename is atomic), created by `write` itself so it
    # gets ordinary permissions.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
