"""FAISS on a GPU: a whole-gallery scan on a CUDA device, the CPU scan as its fallback.

FAISS's GPU indexes have no range search, so `matcher.scan.knn_range_search` finds the rows within a
radius with k-NN searches, k doubled until the k-th distance passes the radius (or k reaches the rows
searched). It takes any FAISS index, so the CPU tests check it against the exact answer.

`GpuScan` holds the descriptors on the device (`faiss.index_cpu_to_gpu`). A stage's rows, a few
thousand, are scanned on the CPU (`matcher.scan`), where they cost less than a trip to the device. The
GPU's candidates are found within a slightly larger radius and rechecked in float64 from the CPU's rows
by `matcher.search.range_search`, so the answers equal the CPU path's. Any error from the GPU (CUDA out of
memory, a lost device) falls back to the CPU scan for that search, reported to `on_fallback` (the worker
counts it in its heartbeat, as it counts the encoder's). Used only where the installed `faiss` has GPU
support (`make install-gpu`) and the worker runs on a GPU; `make gpu-check` tests it there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import faiss
import numpy as np

from matcher.defaults import GPU_MAX_K, GPU_MIN_ROWS, GPU_RADIUS_SLACK
from matcher.scan import DIM, CpuScan, Descriptors, Ranges, Scanner, knn_range_search

log = logging.getLogger("fsw.matcher")
_ADD_ROWS = 1 << 20  # rows copied to the device per call: 512 MiB


def has_gpu(device: int) -> bool:
    """True when the installed FAISS has GPU support and CUDA device `device` exists."""
    return hasattr(faiss, "StandardGpuResources") and 0 <= device < faiss.get_num_gpus()


class GpuScan:
    """A `matcher.scan.Scanner`: whole-gallery scans on the GPU, stage scans and fallbacks on the CPU."""

    def __init__(
        self,
        vectors: Descriptors,
        device: int,
        on_fallback: Callable[[], None] | None = None,
        index: faiss.Index | None = None,
    ):
        """`index`: the device's index of `vectors`, made here unless given (a test gives a CPU index)."""
        self.vectors = vectors
        self.device = device
        self.cpu = CpuScan(vectors)
        self.fallbacks = 0  # searches the CPU did after a GPU error
        self._on_fallback = on_fallback
        self._lock = threading.Lock()  # a FAISS GPU index serves one search at a time
        self.index = index if index is not None else self._to_device(vectors, device)

    def _to_device(self, vectors: Descriptors, device: int) -> faiss.Index:
        self._resources = faiss.StandardGpuResources()  # kept: the device index uses it
        index = faiss.index_cpu_to_gpu(self._resources, device, faiss.IndexFlatL2(DIM))
        for block in vectors.blocks:
            for lo in range(0, len(block), _ADD_ROWS):
                index.add(np.ascontiguousarray(block[lo : lo + _ADD_ROWS]))
        return index

    def candidates(self, query: np.ndarray, radius: float, scope: Ranges | None = None) -> np.ndarray:
        if scope is not None or len(self.vectors) < GPU_MIN_ROWS:
            return self.cpu.candidates(query, radius, scope)
        try:
            with self._lock:
                rows = knn_range_search(self.index, query, radius + GPU_RADIUS_SLACK, max_k=GPU_MAX_K)
        except RuntimeError as e:  # FAISS raises CUDA errors as RuntimeError
            self._fell_back(e)
            rows = None
        return self.cpu.candidates(query, radius) if rows is None else rows

    def _fell_back(self, error: BaseException) -> None:
        self.fallbacks += 1
        log.warning("GPU %s search failed, searched on the CPU instead: %s", self.device, str(error).splitlines()[0])
        if self._on_fallback is not None:
            self._on_fallback()


def gpu_scanner(vectors: Descriptors, device: int, on_fallback: Callable[[], None] | None = None) -> Scanner:
    """A GpuScan on `device` where FAISS can run there; otherwise (no GPU FAISS, no such device, or the
    descriptors do not fit: reported to `on_fallback`) the CPU scan."""
    if not has_gpu(device):
        log.info("FAISS has no GPU %s here (installed: %s): searching on the CPU", device,
                 "faiss with GPU support" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu")
        return CpuScan(vectors)
    try:
        return GpuScan(vectors, device, on_fallback)
    except RuntimeError as e:
        log.warning("could not put the gallery on GPU %s, searching on the CPU: %s", device, str(e).splitlines()[0])
        if on_fallback is not None:
            on_fallback()
        return CpuScan(vectors)
