"""The flat scan: which rows of a gallery's descriptors lie within a radius of one query, at memory speed.

A gallery's descriptors are float32 rows held as blocks (`Descriptors`): the FAISS index file's rows,
memory-mapped read-only so that every process on a machine shares one copy through the page cache, then
the rows committed after that file, read from the row files into the process. A search scans a scope,
sorted row ranges `[lo, hi)` (the whole gallery, or one stage's rows), with FAISS's `range_search_L2sqr`
on slices of the blocks: its cost is the rows in scope, not the rows in the gallery. A large scope is
split over the cores, one slice a thread (FAISS releases the GIL, and scans one query on one core).

`CpuScan.candidates` returns the rows FAISS finds within a squared radius; `matcher.search.range_search`
widens the radius and rechecks them in float64, so the answer does not depend on how the rows were split.
`knn_range_search` finds the rows within a radius with k-NN searches instead, for FAISS indexes that have
no range search, or a slow one: a GPU's (`matcher.gpu`), the 8-bit codes' (`matcher.coarse`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import faiss
import numpy as np

from matcher.defaults import GPU_FIRST_K, SCAN_GATHER_ROWS, SCAN_MIN_ROWS_PER_THREAD

DIM = 128
T = TypeVar("T")
R = TypeVar("R")
Ranges = np.ndarray  # int64 (k, 2): sorted, disjoint row ranges [lo, hi)


class Scanner(Protocol):
    """What finds a search's candidate rows: `CpuScan`, or `matcher.gpu.GpuScan`."""

    def candidates(self, query: np.ndarray, radius: float, scope: Ranges | None = None) -> np.ndarray:
        """Rows within squared L2 distance `radius` of `query` (float32 (1, 128)), in `scope` (None: all rows)."""
        ...


class Descriptors:
    """A gallery's descriptors as consecutive blocks of float32 rows, read like one (n, 128) array.

    `descriptors[rows]` copies the rows asked for; `np.asarray(descriptors)` copies them all (for tools:
    a search never does).
    """

    def __init__(self, blocks: list[np.ndarray], keep: object = None):
        self.keep = keep  # what owns a block's memory (the mapped FAISS index): alive while the rows are
        self.blocks = [b for b in blocks if len(b)]
        for b in self.blocks:
            if b.dtype != np.float32 or b.ndim != 2 or b.shape[1] != DIM:
                raise ValueError(f"a descriptor block must be float32 (n, {DIM}), not {b.dtype} {b.shape}")
        self.starts = np.cumsum([0, *(len(b) for b in self.blocks)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), DIM)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return len(self) * DIM * 4

    def __getitem__(self, rows: Any) -> np.ndarray:
        if len(self.blocks) == 1:
            return np.array(self.blocks[0][rows], dtype=np.float32)
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows)
        scalar = rows.ndim == 0
        rows = rows.reshape(-1).astype(np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for {len(self)} descriptors")
        out = np.empty((len(rows), DIM), np.float32)
        block = np.searchsorted(self.starts, rows, side="right") - 1
        for b in np.unique(block):
            at = block == b
            out[at] = self.blocks[b][rows[at] - self.starts[b]]
        return out[0] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.zeros((0, DIM), np.float32), *self.blocks])
        return out if dtype is None else out.astype(dtype)

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        """Views of rows [lo, hi) with the row each starts at, cut where the blocks meet (no copy)."""
        for b, block in enumerate(self.blocks):
            start = int(self.starts[b])
            a, z = max(lo, start), min(hi, start + len(block))
            if a < z:
                yield a, block[a - start : z - start]


def whole(n: int) -> Ranges:
    """The scope of every row."""
    return np.asarray([[0, n]] if n else [], dtype=np.int64).reshape(-1, 2)


def runs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal values in `codes`: (starts, ends, value of each run)."""
    if len(codes) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, codes.dtype)
    change = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    ends = np.concatenate([change, [len(codes)]]).astype(np.int64)
    return starts, ends, codes[starts]


def merge(ranges: list[np.ndarray]) -> Ranges:
    """One scope from several: sorted, overlapping or touching ranges joined."""
    r = np.concatenate([np.zeros((0, 2), np.int64), *ranges]).astype(np.int64)
    out: list[list[int]] = []
    for lo, hi in r[np.argsort(r[:, 0], kind="stable")].tolist():
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        elif hi > lo:
            out.append([lo, hi])
    return np.asarray(out, np.int64).reshape(-1, 2)


def scan_threads() -> int:
    """Threads a large scan is split over: the cores this process may use (as `matcher.encoder.cores`, which
    this module does not import: that loads dlib)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class CpuScan:
    """The candidates of a search, by FAISS's flat L2 range search over slices of `Descriptors`.

    A scope of at least `2 * SCAN_MIN_ROWS_PER_THREAD` rows is cut into `threads` parts of equal rows;
    the calling thread scans one part and a shared pool the others.
    """

    def __init__(self, vectors: Descriptors, threads: int | None = None):
        self.vectors = vectors
        self.threads = max(1, threads or scan_threads())

    def candidates(self, query: np.ndarray, radius: float, scope: Ranges | None = None) -> np.ndarray:
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, DIM)
        scope = whole(len(self.vectors)) if scope is None else scope
        parts = split_scope(scope, self.threads, SCAN_MIN_ROWS_PER_THREAD)
        if len(parts) <= 1:
            return self._scan(q, radius, parts[0] if parts else scope[:0])
        return np.concatenate(on_threads(lambda part: self._scan(q, radius, part), parts, self.threads))

    def _scan(self, q: np.ndarray, radius: float, part: Ranges) -> np.ndarray:
        """One thread's share: long pieces scanned in place, short ones gathered and scanned at once."""
        found, short = [], []
        for lo, hi in part.tolist():
            for start, view in self.vectors.pieces(lo, hi):
                if len(view) >= SCAN_GATHER_ROWS:
                    found.append(range_search_block(q, view, radius) + start)
                else:
                    short.append((start, view))
        if short:
            rows = np.concatenate([np.arange(s, s + len(v)) for s, v in short])
            block = np.concatenate([v for _, v in short])
            found.append(rows[range_search_block(q, block, radius)])
        return np.concatenate([np.zeros(0, np.int64), *found])


def range_search_block(q: np.ndarray, block: np.ndarray, radius: float) -> np.ndarray:
    """Rows of `block` (float32 (n, 128), any memory) with squared L2 distance to `q` below `radius`."""
    if len(block) == 0:
        return np.zeros(0, np.int64)
    if not block.flags.c_contiguous:
        block = np.ascontiguousarray(block)
    res = faiss.RangeSearchResult(1)
    faiss.range_search_L2sqr(faiss.swig_ptr(q), faiss.swig_ptr(block), DIM, 1, len(block), radius, res)
    n = int(faiss.rev_swig_ptr(res.lims, 2)[1])
    return faiss.rev_swig_ptr(res.labels, n).astype(np.int64) if n else np.zeros(0, np.int64)


def knn_range_search(
    index: faiss.Index,
    query: np.ndarray,
    radius: float,
    k: int = GPU_FIRST_K,
    max_k: int | None = None,
    rows: int | None = None,
    params: faiss.SearchParameters | None = None,
) -> np.ndarray | None:
    """Ids of `index` with squared L2 distance below `radius` from `query`, found by k-NN searches.

    k starts at `k` and doubles until the k-th distance is at least `radius` (every row not returned is
    then farther) or k reaches `rows`, the rows the search can see (default: all of the index's; fewer
    when `params` selects some). Returns None when more than `max_k` rows lie within the radius (a GPU
    index returns at most 2048 neighbours): the caller must search another way. Unordered, int64.
    """
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    seen = index.ntotal if rows is None else rows
    if seen == 0:
        return np.zeros(0, np.int64)
    k = max(1, min(k, seen))
    while True:
        distances, ids = index.search(q, k, params=params) if params is not None else index.search(q, k)
        distances, ids = distances[0], ids[0]
        if k >= seen or distances[-1] >= radius:
            break
        if max_k is not None and k >= max_k:
            return None
        k = min(2 * k, seen, max_k or seen)
    return ids[(ids >= 0) & (distances < radius)].astype(np.int64)


def split_scope(scope: Ranges, parts: int, min_rows: int) -> list[Ranges]:
    """`scope` cut into up to `parts` scopes of equal rows, each of at least `min_rows` rows."""
    total = int((scope[:, 1] - scope[:, 0]).sum())
    parts = max(1, min(parts, total // max(min_rows, 1)))
    if parts == 1:
        return [scope]
    target = -(-total // parts)
    out, current, room = [], [], target
    for lo, hi in scope.tolist():
        while hi > lo:
            take = min(hi - lo, room)
            current.append((lo, lo + take))
            lo, room = lo + take, room - take
            if room == 0:
                out.append(np.asarray(current, np.int64))
                current, room = [], target
    if current:
        out.append(np.asarray(current, np.int64))
    return out


def on_threads(work: Callable[[T], R], parts: Sequence[T], threads: int) -> list[R]:
    """`work` of each part (at most `threads` parts), in order: the first in the calling thread, the others in
    the shared pool of `threads - 1` (FAISS releases the GIL, so the parts are scanned at once)."""
    if len(parts) <= 1:
        return [work(part) for part in parts]
    futures = [scan_pool(threads - 1).submit(work, part) for part in parts[1:]]
    return [work(parts[0])] + [f.result() for f in futures]


def touch_pages(array: np.ndarray) -> np.ndarray:
    """Read one byte of every page of `array` (a mapped file's, C-contiguous), so that its pages are mapped
    (and read from disk if need be) now, while a worker loads, rather than during its first search."""
    if array.size:
        int(array.reshape(-1).view(np.uint8)[::4096].sum())
    return array


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def scan_pool(workers: int) -> ThreadPoolExecutor:
    """The scan threads, shared by every gallery of the process (a reload makes no new threads)."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fsw-scan")
        return _POOLS[workers]
