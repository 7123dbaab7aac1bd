"""Encode jobs: every fsw-worker also encodes photos for `fsw-index build --fleet`, after the selfies.

`EncodeJobs` is the processor of the worker's second BullMQ Worker, on the queue `fsw-encode`
(`FSW_ENCODE_QUEUE`), with a concurrency of its own (`FSW_ENCODE_CONCURRENCY`, default 1) and threads
of its own, so the portal's search jobs keep theirs. The contract is `schemas.encode`. For each job:

    data -> EncodeJob -> its settings checked against this worker's (the same descriptor model file, no
    field it does not know) -> for each photo: wait while a search job is in hand here or waits on the
    search queue -> in an encode thread: read it from the photo source (`worker.photo_source`), hash it,
    check it is the indexer's copy, decode, detect, encode -> EncodeResult (arrays packed, skip reasons)

Search first: a job is fetched whenever an encode slot is free, but no photo of it starts while this
process holds a search job or any search job waits on the queue; so a selfie never waits behind a batch,
at most beside the one photo in progress, whose threads run at a lower scheduling priority
(`ENCODE_NICE`). A photo that cannot be read or decoded is a skip reason in the result, never a failed
job. A job this worker cannot do as asked (other settings, no photo tree here) fails with the reason,
and BullMQ retries it (on any worker) until its attempts are spent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bullmq import UnrecoverableError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from matcher.encoder import EncoderSettings
from matcher.errors import ImageError
from matcher.images import load_scaled
from matcher.writer import PendingPhoto
from schemas.encode import (
    REFUSED,
    EncodedPhoto,
    EncodeJob,
    EncodeJobError,
    EncodePhoto,
    EncodeResult,
    parse_encode_job,
)
from worker.defaults import ENCODE_NICE, SEARCH_CLEAR_POLL_S
from worker.jobs import EncoderPool, JobLike
from worker.photo_source import PhotoSource, PhotoUnavailable, photo_source
from worker.stats import WorkerStats

log = logging.getLogger("fsw.worker")



class EncodeRefused(Exception):
    """A job this worker cannot encode as asked; the job fails with this reason and is tried again."""


class SearchFirst:
    """Photos are encoded only while no search job is in hand in this process and none waits on its queue."""

    def __init__(self, stats: WorkerStats, redis: Redis, search_queue: str, prefix: str = "bull",
                 poll_s: float = SEARCH_CLEAR_POLL_S):
        self.stats = stats
        self.redis = redis
        self.poll_s = poll_s
        # BullMQ's keys of the jobs waiting for a worker (plain and prioritised); part of its Redis layout,
        # which Node and Python share
        self._wait, self._prioritized = f"{prefix}:{search_queue}:wait", f"{prefix}:{search_queue}:prioritized"

    async def clear(self) -> None:
        """Return once no search job is in hand here and none is waiting."""
        while self.stats.busy or await self._searches_waiting():
            await asyncio.sleep(self.poll_s)

    async def _searches_waiting(self) -> bool:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                waiting, prioritized = await pipe.llen(self._wait).zcard(self._prioritized).execute()
        except (RedisError, OSError):
            return False  # Redis away: no search can be fetched either; the photo in hand goes on
        return bool(waiting or prioritized)


class EncodeJobs:
    """The processor given to the encode Worker: `await handler(job, token)` returns the EncodeResult's JSON."""

    def __init__(
        self,
        encoders: EncoderPool,
        concurrency: int,
        search_first: SearchFirst,
        worker_id: Callable[[], str],
        photos: str | None = None,
    ):
        self.encoders = encoders
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fsw-encode",
                                           initializer=_lower_priority)
        self.search_first = search_first
        self.worker_id = worker_id
        self.photos = photos  # FSW_PHOTOS: a folder or an http(s) base URL; None: the job's photo root
        self._refused: set[str] = set()  # reasons already logged, so a stream of refused jobs logs each once

    async def __call__(self, job: JobLike, token: str | None = None) -> dict[str, Any]:
        try:
            request = parse_encode_job(job.data)
        except EncodeJobError as e:
            raise UnrecoverableError(f"not an encode job fsw can read: {e}") from None
        source = photo_source(self.photos, request.root)
        problem = await self._run(_settings_problem, request.settings) or source.available()
        if problem:
            if problem not in self._refused:
                self._refused.add(problem)
                log.warning("encode jobs refused: %s", problem)
            raise EncodeRefused(f"{REFUSED}{self.worker_id()}: {problem}")
        photos: list[EncodedPhoto] = []
        spent = 0.0
        for photo in request.photos:
            await self.search_first.clear()
            started = time.perf_counter()
            photos.append(await self._run(self._encode_photo, request, source, photo))
            spent += time.perf_counter() - started
        faces = sum(p.faces for p in photos)
        log.info("encode job %s: %d photos, %d faces in %.1f s", job.id, len(photos), faces, spent)
        return EncodeResult(worker=self.worker_id(), photos=photos, seconds=round(spent, 4)).model_dump(mode="json")

    def _encode_photo(self, request: EncodeJob, source: PhotoSource, photo: EncodePhoto) -> EncodedPhoto:
        """In an encode thread: one photo's faces, or why it has none."""
        try:
            data = source.read(photo.id)
        except PhotoUnavailable as e:
            return EncodedPhoto(id=photo.id, skipped=str(e))
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 != photo.sha256:
            return EncodedPhoto(id=photo.id, sha256=sha256, size=len(data), skipped=(
                f"the copy at {source.describe()} differs from the indexer's (sha256 {sha256[:12]}, indexer "
                f"{photo.sha256[:12]}): does FSW_PHOTOS name the same photo tree?"))
        try:
            encoder = self.encoders.get(request.settings)
            image, scale = load_scaled(data, max_side=encoder.settings.max_side)  # as `fsw-index build` decodes
            faces, too_small = encoder.photo_faces(image, scale)
        except ImageError as e:
            return EncodedPhoto(id=photo.id, sha256=sha256, size=len(data), skipped=str(e))
        except Exception as e:  # an encoder failure on one photo must not fail the batch
            return EncodedPhoto(id=photo.id, sha256=sha256, size=len(data),
                                skipped=f"encoder error: {type(e).__name__}: {e}")
        found = PendingPhoto.from_faces(photo.id, sha256, len(data), 0.0, faces)
        return EncodedPhoto.of(photo.id, sha256, len(data), found.boxes, found.descriptors, too_small)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self) -> None:
        """The worker is stopping: drop photos not started (a stuck fetch ends at its own timeout)."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """In each new encode thread: a nicer scheduling priority than the search threads' (Linux sets it per
    thread, and the ONNX Runtime threads this thread starts inherit it)."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + ENCODE_NICE))
    except (AttributeError, OSError) as e:  # not Linux, or not allowed: search first still holds between photos
        log.info("encode threads keep their priority (%s)", e)


def _settings_problem(settings: dict[str, Any]) -> str | None:
    """Why this worker cannot encode with a job's recorded settings, or None when it encodes exactly so."""
    try:
        own = EncoderSettings.from_recorded(settings).recorded()
    except (ValueError, TypeError, OSError) as e:
        return f"the job's encoder settings are not usable here: {e}"
    differ = sorted(k for k in own.keys() | settings.keys() if own.get(k) != settings.get(k))
    if not differ:
        return None
    said = ", ".join(f"{k}: job {settings.get(k)!r}, this worker {own.get(k)!r}" for k in differ)
    return (f"the job's encoder settings differ from what this worker would encode with ({said}): give every "
            "worker the same fsw version and model files as the indexer")
