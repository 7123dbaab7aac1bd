"""Putting one selfie on the queue as the portal would, and waiting for the worker's answer.

`submit_selfie` is what `fsw-worker submit` runs: it builds the job data with `schemas.FaceSearchJob`
(the portal's format: a data URL, uid, stage, timestamp), adds it with Python bullmq's Queue as job
`process-face` with `attempts: 1`, and with `wait` polls the job until it completes or fails.
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
from worker.settings import WorkerSettings

_MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


@dataclass
class Submitted:
    job_id: str
    state: str  # completed, failed, or the state it was left in (waiting, active...) when not waited for
    result: list[dict[str, Any]] | None = None
    failed_reason: str | None = None
    progress: list[Any] | None = None


def job_data(selfie: Path, stage: str = "", threshold: float | None = None, limit: int | None = None,
             uid: str = "fsw-worker-submit") -> dict[str, Any]:
    """The portal-shaped data of a job for the selfie file (validated by the job schema)."""
    media_type = _MEDIA_TYPES.get(selfie.suffix.lower(), "image/jpeg")
    fields: dict[str, Any] = {"uid": uid, "stage": stage, "timestamp": int(time.time() * 1000)}
    if threshold is not None:
        fields["threshold"] = threshold
    if limit is not None:
        fields["limit"] = limit
    request = FaceSearchJob.for_image(selfie.read_bytes(), media_type, **fields)
    return request.model_dump(exclude_unset=True)


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
        job = await queue.add(JOB_NAME, data, {"attempts": 1})
        job_id = str(job.id)
        if not wait:
            return Submitted(job_id, "waiting")
        seen: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while True:
            state = await queue.getJobState(job_id)
            raw = await queue.client.hget(queue.toKey(job_id), "progress")
            progress = json.loads(raw) if raw else None
            if progress is not None and (not seen or seen[-1] != progress):
                seen.append(progress)
                if on_progress:
                    on_progress(progress)
            if state in ("completed", "failed"):
                finished = await Job.fromId(queue, job_id)
                if state == "completed":
                    return Submitted(job_id, state, result=finished.returnvalue, progress=seen)
                return Submitted(job_id, state, failed_reason=finished.failedReason, progress=seen)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} is still {state} after {timeout_s:.0f} s: is an fsw-worker running on queue "
                    f"{settings.queue!r} at {settings.redis_display}?"
                )
            await asyncio.sleep(0.1)
    finally:
        await queue.close()
