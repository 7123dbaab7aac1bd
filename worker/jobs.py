"""The job handler: one `process-face` job in, the matching photos out.

    job data -> FaceSearchJob (size-checked before decoding) -> `matcher.query.search_selfie` on the
    gallery in use (stage, the selfie's bytes, its face, descriptor, search) -> Redis `excluded_images`
    left out -> limit -> `schemas.dump_result`

The selfie's whole path is the matcher's, the one `fsw-index search` takes; this module adds what a job
has and the CLI has not: the job's data, the excluded set in Redis, progress and the worker's counts.
The search runs in the worker's thread pool, each thread with its own Encoder (dlib's detectors are not
documented as thread-safe), so the event loop stays free for lock renewal, heartbeats and the other jobs.
The query's progress stages reach `job.updateProgress` from the event loop, in order: decoded, face
found, encoded, searched. Every mistake in a job becomes a BullMQ `UnrecoverableError` whose message a
person can act on; the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol

from bullmq import UnrecoverableError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import FswError
from matcher.gallery import Gallery
from matcher.query import Stage, search_selfie
from matcher.search import Match
from schemas import EXCLUDED_SET, PROGRESS, FaceSearchJob, JobDataError, dump_result, parse_job
from worker.engine import WorkerEngine, make_worker_engine
from worker.reload import GalleryReloader
from worker.stats import WorkerStats

log = logging.getLogger("fsw.worker")


class JobLike(Protocol):
    """What the handler uses of a bullmq Job."""

    id: Any
    data: Any

    def updateProgress(self, progress: Any) -> Any: ...


class EncoderPool:
    """One Encoder per thread, made on first use, remade when a new gallery records other settings.

    `make_engine(name, threads, cache_dir=..., on_fallback=...)` builds each thread's descriptor engine
    (a test passes one that fails like CUDA out of memory); `on_fallback` is called when an engine call
    ran out of GPU memory and was done on the CPU.
    """

    def __init__(
        self,
        engine: str = "onnx",
        threads: int | None = None,
        make_engine: Callable[..., WorkerEngine] = make_worker_engine,
        on_fallback: Callable[[], None] | None = None,
        cache_dir: str | None = None,
    ):
        self.engine = engine
        self.threads = threads
        self.cache_dir = cache_dir
        self._make_engine = make_engine
        self._on_fallback = on_fallback
        self._local = threading.local()
        self.device = "cpu"  # where the last engine made runs; for the heartbeat

    def get(self, recorded: dict[str, Any]) -> Encoder:
        """This thread's Encoder for a gallery with the `recorded` settings."""
        key = repr(sorted(recorded.items()))
        held = getattr(self._local, "held", None)
        if held is None or held[0] != key:
            engine = self._make_engine(
                self.engine, self.threads, cache_dir=self.cache_dir, on_fallback=self._on_fallback
            )
            settings = EncoderSettings.from_recorded(
                recorded, engine=self.engine, threads=self.threads, cache_dir=self.cache_dir
            )
            held = (key, Encoder(settings, engine=engine))
            self._local.held = held
            self.device = engine.device
        return held[1]


class SearchJobs:
    """The processor given to the bullmq Worker: `await handler(job, token)` returns the result list."""

    def __init__(
        self,
        galleries: GalleryReloader,
        encoders: EncoderPool,
        executor: Executor,
        redis: Redis,
        stats: WorkerStats,
    ):
        self.galleries = galleries
        self.encoders = encoders
        self.executor = executor
        self.redis = redis
        self.stats = stats

    async def __call__(self, job: JobLike, token: str | None = None) -> list[dict[str, Any]]:
        job_id = str(job.id)
        self.stats.job_started(job_id)
        timing: dict[str, float] = {}
        try:
            result = await self.search(job, timing)
        except (FswError, JobDataError) as e:
            self.stats.job_finished(job_id, ok=False)
            log.info("job %s failed: %s", job_id, e)
            raise UnrecoverableError(str(e)) from None
        except Exception as e:
            self.stats.job_finished(job_id, ok=False)
            if _is_redis_error(e):
                raise  # the connection, not the job: BullMQ's own handling applies
            log.exception("job %s: unexpected error", job_id)
            raise UnrecoverableError(
                f"fsw-worker could not process this job ({type(e).__name__}: {str(e)[:200]}): see the worker's log"
            ) from None
        ms = self.stats.job_finished(job_id, ok=True, search_ms=timing.get("search_ms"))
        log.info("job %s answered in %.0f ms: %d photo%s", job_id, ms, len(result), "" if len(result) == 1 else "s")
        return result

    async def search(self, job: JobLike, timing: dict[str, float]) -> list[dict[str, Any]]:
        """The job's result; raises FswError or JobDataError for a job that cannot be answered."""
        gallery = self.galleries.require()  # taken once: a reload during the job does not affect it
        request = await self._run(parse_job, job.data)
        progress = _Progress(job)
        try:
            matches = await self._run(self._search_selfie, gallery, request, progress.passed)
        finally:
            await progress.sent()
        timing["search_ms"] = progress.search_ms()
        matches = await self._without_excluded(matches)
        if request.limit is not None:
            matches = matches[: request.limit]
        return dump_result(matches)

    def _search_selfie(
        self, gallery: Gallery, request: FaceSearchJob, on_progress: Callable[[Stage], None]
    ) -> list[Match]:
        """In a pool thread: the selfie's search, as `fsw-index search` runs it. No limit here: it applies
        after the excluded photos are left out. The base64 is decoded only once the stage is known."""
        encoder = self.encoders.get(gallery.settings)
        return search_selfie(
            gallery, encoder, request.image_bytes, request.stage, request.threshold, on_progress=on_progress
        )

    async def _without_excluded(self, matches: list[Match]) -> list[Match]:
        if not matches:
            return matches
        flags = await self.redis.smismember(EXCLUDED_SET, [m.id for m in matches])
        return [m for m, excluded in zip(matches, flags, strict=True) if not excluded]

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class _Progress:
    """The query's stages, heard in a pool thread, sent to `job.updateProgress` from the event loop in order.

    Each stage's time is noted too: the search's share of a job (expansion and gallery search) is the
    time from "encoded" to "searched", which the heartbeat reports as `search_p50_ms`.
    """

    def __init__(self, job: JobLike):
        self._job = job
        self._loop = asyncio.get_running_loop()
        self._at: dict[str, float] = {}
        self._last: asyncio.Future[None] | None = None

    def passed(self, stage: Stage) -> None:
        """Called from the pool thread as the query passes `stage`."""
        self._at[stage] = time.perf_counter()
        self._loop.call_soon_threadsafe(self._send, stage)

    def _send(self, stage: Stage) -> None:
        self._last = asyncio.ensure_future(self._after(self._last, PROGRESS[stage]))

    async def _after(self, previous: asyncio.Future[None] | None, value: int) -> None:
        if previous is not None:
            await previous
        await self._job.updateProgress(value)

    async def sent(self) -> None:
        """Wait until every stage heard so far has been sent (the thread's callbacks run before its result)."""
        if self._last is not None:
            await self._last

    def search_ms(self) -> float | None:
        if "encoded" in self._at and "searched" in self._at:
            return (self._at["searched"] - self._at["encoded"]) * 1000
        return None


def _is_redis_error(error: BaseException) -> bool:
    return isinstance(error, RedisError | ConnectionError)
