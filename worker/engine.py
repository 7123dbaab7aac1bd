"""The descriptor engine a worker thread encodes selfies with: GPU first, the CPU when CUDA runs out of memory.

`WorkerEngine` wraps the engine `matcher.engines.make_engine` gives (ONNX Runtime, on CUDA where it can)
and is handed to `matcher.encoder.Encoder`. A call that fails with CUDA out of memory is run again on a
CPU engine (made on first need) and counted in `fallbacks`, so the job completes and the heartbeat
shows it. `on_face` is called as a face's chip reaches the engine: the moment detection has
found the selfie's face, which the job reports as progress. Both engines are injectable, so a test can
simulate the out-of-memory error on a machine without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from matcher.engines import DescriptorEngine, make_engine

log = logging.getLogger("fsw.worker")

_OOM_MARKERS = (
    "out of memory",  # CUDA's own "CUDA out of memory" / cudaErrorMemoryAllocation text
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "failed to allocate memory",  # ONNX Runtime's BFC arena
)


def is_cuda_oom(error: BaseException) -> bool:
    """Whether an error is the GPU running out of memory (and worth retrying on the CPU)."""
    if isinstance(error, MemoryError):
        return False  # host memory: the CPU would fare no better
    text = f"{type(error).__name__}: {error}".lower()
    return any(m in text for m in _OOM_MARKERS) and ("cuda" in text or "gpu" in text or "cublas" in text)


def engine_device(engine: object) -> str:
    """'cuda' or 'cpu': where an engine runs (engines without a `device` run on the CPU)."""
    return str(getattr(engine, "device", "cpu"))


class WorkerEngine:
    """A descriptor engine with a per-call CPU fallback on CUDA out-of-memory, and a face hook."""

    def __init__(self, primary: DescriptorEngine, make_fallback: Callable[[], DescriptorEngine] | None = None):
        self.primary = primary
        self.name = primary.name
        self._make_fallback = make_fallback
        self._fallback: DescriptorEngine | None = None
        self.fallbacks = 0  # calls run on the CPU after CUDA ran out of memory
        self.on_face: Callable[[], None] | None = None

    @property
    def device(self) -> str:
        return engine_device(self.primary)

    def describe(self, chips: Sequence[np.ndarray], jitters: int = 1) -> np.ndarray:
        if self.on_face is not None:
            self.on_face()
        try:
            return self.primary.describe(list(chips), jitters)
        except Exception as e:
            if self._make_fallback is None or not is_cuda_oom(e):
                raise
            log.warning("CUDA out of memory while encoding (%s): encoding this selfie on the CPU", e)
            self.fallbacks += 1
            if self._fallback is None:
                self._fallback = self._make_fallback()
            return self._fallback.describe(list(chips), jitters)


def make_worker_engine(name: str, threads: int | None) -> WorkerEngine:
    """The engine `name` ('onnx' or 'dlib'); on CUDA, with a CPU engine of the same kind as fallback."""
    primary = make_engine(name, threads)
    fallback = None
    if engine_device(primary) == "cuda":

        def fallback() -> DescriptorEngine:
            from matcher.onnx_engine import OnnxEngine

            return OnnxEngine(threads=threads, device="cpu")

    return WorkerEngine(primary, fallback)
