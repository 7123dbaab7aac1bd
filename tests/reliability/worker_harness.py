"""Pieces the worker scenarios share: jobs followed through their Redis hashes, a worker's memory
sampled over a run, percentiles. (The Redis, the worker process and adding the jobs come from `testkit`.)

Jobs are followed by reading their hashes (`bull:<queue>:<id>`) in one pipeline per poll rather than one
`getJobState` call each, so thousands of jobs can be watched without the poll loading the machine.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis


@dataclass
class Ended:
    """A job as its hash left it: state is completed, failed, or (not ended) active/waiting/missing."""

    id: str
    state: str
    returnvalue: Any = None
    failed_reason: str | None = None
    timestamp_ms: float | None = None  # added
    processed_ms: float | None = None  # last taken by a worker
    finished_ms: float | None = None
    progress: Any = None
    stalled: int = 0  # times BullMQ moved it back to wait after its worker lost the lock

    @property
    def latency_s(self) -> float:
        assert self.finished_ms is not None and self.timestamp_ms is not None
        return (self.finished_ms - self.timestamp_ms) / 1000

    @property
    def service_s(self) -> float:
        assert self.finished_ms is not None and self.processed_ms is not None
        return (self.finished_ms - self.processed_ms) / 1000


def read_jobs(url: str, queue: str, ids: list[str]) -> dict[str, Ended]:
    """Every job's state and outcome, from its hash."""
    out: dict[str, Ended] = {}
    with redis.Redis.from_url(url, decode_responses=True, socket_timeout=30) as r:
        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(f"bull:{queue}:{job_id}")
        for job_id, h in zip(ids, pipe.execute(), strict=True):
            if "finishedOn" in h:
                state = "failed" if "failedReason" in h and "returnvalue" not in h else "completed"
            else:
                state = "active" if "processedOn" in h else ("waiting" if h else "missing")
            out[job_id] = Ended(
                job_id, state,
                json.loads(h["returnvalue"]) if "returnvalue" in h else None,
                h.get("failedReason"),
                float(h["timestamp"]) if "timestamp" in h else None,
                float(h["processedOn"]) if "processedOn" in h else None,
                float(h["finishedOn"]) if "finishedOn" in h else None,
                json.loads(h["progress"]) if h.get("progress") else None,
                int(h.get("stc", 0) or 0),
            )
    return out


def wait_jobs(url: str, queue: str, ids: list[str], timeout: float, poll: float = 0.25) -> dict[str, Ended]:
    """Poll until every job has ended or `timeout` passes; the last reading either way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            jobs = read_jobs(url, queue, ids)
        except redis.RedisError:
            jobs = None  # Redis restarting: read again
        if jobs is not None and (all(j.finished_ms is not None for j in jobs.values()) or time.monotonic() > deadline):
            return jobs
        if jobs is None and time.monotonic() > deadline:
            return read_jobs(url, queue, ids)
        time.sleep(poll)


def active_ids(url: str, queue: str) -> list[str]:
    with redis.Redis.from_url(url, decode_responses=True, socket_timeout=5) as r:
        return list(r.lrange(f"bull:{queue}:active", 0, -1))


def completions_per_job(url: str, queue: str) -> dict[str, int]:
    """How many `completed` events the queue's event stream holds for each job id."""
    counts: dict[str, int] = {}
    with redis.Redis.from_url(url, decode_responses=True, socket_timeout=10) as r:
        for _, fields in r.xrange(f"bull:{queue}:events", "-", "+"):
            if fields.get("event") == "completed":
                counts[fields["jobId"]] = counts.get(fields["jobId"], 0) + 1
    return counts


class RssSampler:
    """A process's resident memory, sampled every `interval` seconds in a thread while in a `with` block."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def quarters_mb(self) -> tuple[float, float]:
        """Median RSS (MiB) of the first and of the last quarter of the samples."""
        n = max(1, len(self.samples) // 4)
        return _median(self.samples[:n]) / 2**20, _median(self.samples[-n:]) / 2**20


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _median(values: list[int]) -> float:
    ordered = sorted(values)
    return float(ordered[len(ordered) // 2]) if ordered else math.nan


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def answer_key(result: Any) -> list[tuple[str, float]]:
    """A job's answer as (photo id, similarity to 4 places), the part that decides who sees what."""
    return [(e["id"], round(float(e["similarity"]), 4)) for e in result]


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
