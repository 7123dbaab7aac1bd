"""What a worker counts for its heartbeat: jobs done and failed, the jobs in hand, recent latencies.

Updated from the event loop (job start and end) and from job threads (CUDA fallbacks of the encoder and
of the search), so every change takes a lock.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque

from worker.defaults import LATENCY_WINDOW


class WorkerStats:
    def __init__(self) -> None:
        self.start_time = time.time()
        self.jobs_processed = 0
        self.jobs_failed = 0
        self.cuda_oom_fallbacks = 0
        self.last_cuda_oom: float | None = None
        self.search_gpu_fallbacks = 0
        self._current: dict[str, float] = {}  # job id -> start, in start order
        self._job_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._search_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._lock = threading.Lock()

    def job_started(self, job_id: str) -> None:
        with self._lock:
            self._current[job_id] = time.monotonic()

    def job_finished(self, job_id: str, ok: bool, search_ms: float | None = None) -> float:
        """Record a job's end; returns its duration in ms."""
        with self._lock:
            started = self._current.pop(job_id, time.monotonic())
            elapsed = (time.monotonic() - started) * 1000
            if ok:
                self.jobs_processed += 1
                self._job_ms.append(elapsed)
            else:
                self.jobs_failed += 1
            if search_ms is not None:
                self._search_ms.append(search_ms)
            return elapsed

    def cuda_oom(self) -> None:
        """A job whose encoding ran out of GPU memory and was done on the CPU."""
        with self._lock:
            self.cuda_oom_fallbacks += 1
            self.last_cuda_oom = time.time()

    def search_gpu_fallback(self) -> None:
        """A search done on the CPU because FAISS on the GPU failed (`matcher.gpu`); called from job threads."""
        with self._lock:
            self.search_gpu_fallbacks += 1

    @property
    def current_job(self) -> str | None:
        """The oldest job in hand, or None when idle."""
        with self._lock:
            return next(iter(self._current), None)

    @property
    def busy(self) -> bool:
        return bool(self._current)

    def search_p50_ms(self) -> float | None:
        return _median(self._search_ms, self._lock)

    def job_p50_ms(self) -> float | None:
        return _median(self._job_ms, self._lock)


def _median(values: deque[float], lock: threading.Lock) -> float | None:
    with lock:
        return round(statistics.median(values), 2) if values else None
