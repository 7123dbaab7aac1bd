"""The descriptor engine a worker thread encodes selfies with: GPU first, the CPU when CUDA runs out of memory.

`WorkerEngine` wraps the engine `matcher.engines.make_engine` gives (ONNX Runtime, on CUDA where it can)
and is handed to `matcher.encoder.Encoder`. A call that fails with CUDA out of memory is run again on a
CPU engine (made on first need), so the job completes; each such call is counted in `fallbacks` and
reported to `on_fallback` (given at construction: the worker counts it for the heartbeat). A selfie is
encoded in one engine call (`matcher.query`), so a job falls back at most once. Both engines are
injectable, so a test can simulate the out-of-memory error on a machine without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from matcher.engines import DescriptorEngine, make_engine
from matcher.onnx_session import is_cuda_oom  # one test of "GPU out of memory", shared with the detector

log = logging.getLogger("fsw.worker")


def engine_device(engine: object) -> str:
    """'cuda' or 'cpu': where an engine runs (engines without a `device` run on the CPU)."""
    return str(getattr(engine, "device", "cpu"))


class WorkerEngine:
    """A descriptor engine with a per-call CPU fallback on CUDA out-of-memory, reported to `on_fallback`."""

    def __init__(
        self,
        primary: DescriptorEngine,
        make_fallback: Callable[[], DescriptorEngine] | None = None,
        on_fallback: Callable[[], None] | None = None,
    ):
        self.primary = primary
        self.name = primary.name
        self._make_fallback = make_fallback
        self._fallback: DescriptorEngine | None = None
        self._on_fallback = on_fallback
        self.fallbacks = 0  # calls run on the CPU after CUDA ran out of memory

    @property
    def device(self) -> str:
        return engine_device(self.primary)

    def describe(self, chips: Sequence[np.ndarray], jitters: int = 1) -> np.ndarray:
        try:
            return self.primary.describe(list(chips), jitters)
        except Exception as e:
            if self._make_fallback is None or not is_cuda_oom(e):
                raise
            log.warning("CUDA out of memory while encoding (%s): encoding this selfie on the CPU", e)
            self.fallbacks += 1
            if self._on_fallback is not None:
                self._on_fallback()
            if self._fallback is None:
                self._fallback = self._make_fallback()
            return self._fallback.describe(list(chips), jitters)


def make_worker_engine(
    name: str,
    threads: int | None,
    *,
    cache_dir: str | None = None,
    on_fallback: Callable[[], None] | None = None,
) -> WorkerEngine:
    """The engine `name` ('onnx' or 'dlib'); on CUDA, with a CPU engine of the same kind as fallback.

    cache_dir: where converted ONNX models are cached (None: `matcher.defaults.CACHE_DIR`).
    """
    primary = make_engine(name, threads, cache_dir=cache_dir)
    fallback = None
    if engine_device(primary) == "cuda":

        def fallback() -> DescriptorEngine:
            from matcher.onnx_engine import OnnxEngine

            return OnnxEngine(threads=threads, device="cpu", cache_dir=cache_dir)

    return WorkerEngine(primary, fallback, on_fallback)
