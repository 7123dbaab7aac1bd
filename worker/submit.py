"""Putting selfies on the queue as the portal would, and following the jobs to the worker's answer.

`submit_selfie` is what `fsw-worker submit` runs: it builds the job data with `schemas.FaceSearchJob`
(the portal's format: a data URL, uid, stage, timestamp), adds it with Python bullmq's Queue as job
`process-face` with the portal's options (`attempts: 1`, a completed job kept 24 hours (at most 1,000), a
failed one 7 days), and with `wait` polls the job until it completes or fails. Its two
steps, `add_jobs` and `wait_job`, are what the tests (`testkit.jobs`) and the bench put jobs on a queue
and wait for them with, so every producer in the project sends the portal's jobs the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bullmq import Job, Queue
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from schemas import JOB_NAME, FaceSearchJob
from worker.defaults import REMOVE_ON_COMPLETE, REMOVE_ON_FAIL
from worker.settings import WorkerSettings

_MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
ENDED = ("completed", "failed")
_BULK = 200  # jobs per addBulk call: one round trip each, small enough for any Redis
# The portal's job options: no retry (a job that cannot be answered will not be by retrying), and finished
# jobs kept only as long as the portal reads them back by id (BullMQ's default keeps them forever).
JOB_OPTIONS = {"attempts": 1, "removeOnComplete": REMOVE_ON_COMPLETE, "removeOnFail": REMOVE_ON_FAIL}


@dataclass
class Submitted:
    job_id: str
    state: str  # completed, failed, or the state it was left in (waiting, active...) when not waited for
    result: list[dict[str, Any]] | None = None
    failed_reason: str | None = None
    progress: list[Any] | None = None  # the progress values seen, when followed with `on_progress`
    added_ms: float | None = None  # the job's own record: when it was added (ms since epoch)
    finished_ms: float | None = None  # and when the worker finished it


def media_type(selfie: Path) -> str:
    """The data URL media type for an image file, from its name ('image/jpeg' when unknown)."""
    return _MEDIA_TYPES.get(selfie.suffix.lower(), "image/jpeg")


def job_data(selfie: Path, stage: str = "", threshold: float | None = None, limit: int | None = None,
             uid: str = "fsw-worker-submit") -> dict[str, Any]:
    """The portal-shaped data of a job for the selfie file (validated by the job schema)."""
    fields: dict[str, Any] = {"uid": uid, "stage": stage, "timestamp": int(time.time() * 1000)}
    if threshold is not None:
        fields["threshold"] = threshold
    if limit is not None:
        fields["limit"] = limit
    request = FaceSearchJob.for_image(selfie.read_bytes(), media_type(selfie), **fields)
    return request.model_dump(exclude_unset=True)


async def add_jobs(queue: Queue, datas: list[Any]) -> list[str]:
    """Add one `process-face` job per data, with the portal's options (`JOB_OPTIONS`); their ids, in order.

    The data goes as given, so a test can send what a broken portal would.
    """
    ids: list[str] = []
    for start in range(0, len(datas), _BULK):
        jobs = await queue.addBulk([{"name": JOB_NAME, "data": data, "opts": dict(JOB_OPTIONS)}
                                    for data in datas[start:start + _BULK]])
        ids += [str(job.id) for job in jobs]
    return ids


async def wait_job(
    queue: Queue,
    job_id: str,
    timeout_s: float = 60.0,
    poll_s: float = 0.1,
    on_progress: Callable[[Any], None] | None = None,
) -> Submitted:
    """Follow a job until it completes or fails, or `timeout_s` passes (then its state at that moment).

    With `on_progress`, each new progress value is passed to it as it is seen (and listed in the result).
    """
    seen: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while True:
        state = await queue.getJobState(job_id)
        if on_progress is not None:
            raw = await queue.client.hget(queue.toKey(job_id), "progress")
            progress = json.loads(raw) if raw else None
            if progress is not None and (not seen or seen[-1] != progress):
                seen.append(progress)
                on_progress(progress)
        if state in ENDED or time.monotonic() > deadline:
            break
        await asyncio.sleep(poll_s)
    tracked = seen if on_progress is not None else None
    if state not in ENDED:
        return Submitted(job_id, state, progress=tracked)
    job = await Job.fromId(queue, job_id)
    return Submitted(
        job_id, state,
        result=job.returnvalue if state == "completed" else None,
        failed_reason=(job.failedReason or None) if state == "failed" else None,
        progress=tracked, added_ms=job.timestamp, finished_ms=job.finishedOn,
    )


async def submit_selfie(
    settings: WorkerSettings,
    data: dict[str, Any],
    wait: bool = True,
    timeout_s: float = 60.0,
    on_progress: Callable[[Any], None] | None = None,
) -> Submitted:
    """Add the job; with `wait`, follow it to the end (TimeoutError after `timeout_s`).

    Raises redis' ConnectionError at once when Redis does not answer (BullMQ's own connection would
    keep retrying for minutes).
    """
    probe = Redis(**settings.redis_kwargs(), retry=Retry(NoBackoff(), 1))
    try:
        await probe.ping()  # type: ignore[misc]
    finally:
        await probe.aclose()
    queue = Queue(settings.queue, {"connection": settings.redis_kwargs(), "prefix": settings.prefix})
    try:
        (job_id,) = await add_jobs(queue, [data])
        if not wait:
            return Submitted(job_id, "waiting")
        outcome = await wait_job(queue, job_id, timeout_s, on_progress=on_progress or (lambda _: None))
        if outcome.state not in ENDED:
            raise TimeoutError(
                f"job {job_id} is still {outcome.state} after {timeout_s:.0f} s: is an fsw-worker running on queue "
                f"{settings.queue!r} at {settings.redis_display}?"
            )
        return outcome
    finally:
        await queue.close()
