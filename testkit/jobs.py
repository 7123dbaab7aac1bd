"""Portal jobs for the tests: a selfie file's job data, jobs put on a queue and waited for, and a job
that records its progress for driving the handler in-process (`RecordingJob`).

Both go through the worker's own producer, `worker.submit` (`job_data`, `add_jobs`, `wait_job`), so the
tests send exactly what `fsw-worker submit` and the bench send. `NODE_CLIENT` is the portal's own
client (Node.js bullmq), for the tests that send jobs the way the portal itself does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bullmq import Queue

from testkit.photos import ROOT
from worker.submit import add_jobs as submit_jobs
from worker.submit import job_data, wait_job

NODE_CLIENT = ROOT / "tests" / "node"
UID = "graduate@example.edu"
T = TypeVar("T")


@dataclass
class RecordingJob:
    """The parts of a bullmq Job that `worker.jobs.SearchJobs` uses, for driving it in-process: progress is
    recorded instead of sent."""

    data: Any
    id: str = "1"
    progress: list[Any] = field(default_factory=list)

    async def updateProgress(self, value: Any) -> None:
        self.progress.append(value)


@dataclass
class JobOutcome:
    id: str
    state: str  # completed, failed, or where it was when the wait ran out
    returnvalue: Any = None
    failed_reason: str | None = None

    @property
    def photo_ids(self) -> list[str]:
        assert self.state == "completed", f"job {self.id} {self.state}: {self.failed_reason}"
        return [entry["id"] for entry in self.returnvalue]


def selfie_job(path: Path, stage: str = "", **extra: Any) -> dict[str, Any]:
    """The portal's job data for a selfie file (a data URL, uid, stage, timestamp), with `extra` fields as given."""
    return {**job_data(path, stage, uid=UID), **extra}


def run_jobs(redis_url: str, queue: str, datas: list[Any], timeout: float = 60, wait: bool = True,
             ) -> list[JobOutcome]:
    """Add `process-face` jobs (the portal's options) and, with `wait`, wait up to `timeout` s for them all."""

    async def go(q: Queue) -> list[JobOutcome]:
        ids = await submit_jobs(q, datas)
        return await _outcomes(q, ids, timeout if wait else 0)

    return _with_queue(redis_url, queue, go)


def add_jobs(redis_url: str, queue: str, datas: list[Any]) -> list[str]:
    """Add `process-face` jobs (the portal's options) without waiting; their ids, in order."""
    return _with_queue(redis_url, queue, lambda q: submit_jobs(q, datas))


def wait_jobs(redis_url: str, queue: str, ids: list[str], timeout: float = 60) -> list[JobOutcome]:
    """Wait up to `timeout` s for jobs already on the queue to end (timeout 0: look once)."""
    return _with_queue(redis_url, queue, lambda q: _outcomes(q, ids, timeout))


def wait_state(redis_url: str, queue: str, job_id: str, states: set[str], timeout: float = 30) -> str:
    """Poll a job until its state is one of `states` or `timeout` passes; the last state seen."""

    async def go(q: Queue) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = str(await q.getJobState(job_id))
            if state in states or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.02)

    return _with_queue(redis_url, queue, go)


async def _outcomes(q: Queue, ids: list[str], timeout: float) -> list[JobOutcome]:
    ended = await asyncio.gather(*(wait_job(q, job_id, timeout, poll_s=0.05) for job_id in ids))
    return [JobOutcome(e.job_id, e.state, e.result, e.failed_reason) for e in ended]


def _with_queue(redis_url: str, queue: str, body: Callable[[Queue], Awaitable[T]]) -> T:
    async def go() -> T:
        q = Queue(queue, {"connection": redis_url})
        try:
            return await body(q)
        finally:
            await q.close()

    return asyncio.run(go())
