"""The job handler: one `process-face` job in, the matching photos out.

    job data -> FaceSearchJob (size-checked before decoding) -> `matcher.query.search_selfie` on the
    gallery in use (stage, the selfie's bytes, its face, descriptor, search) -> Redis `excluded_images`
    left out -> limit -> `schemas.dump_result`

The selfie's whole path is the matcher's, the one `fsw-index search` takes; this module adds what a job
has and the CLI has not: the job's data, the excluded set in Redis, progress and the worker's counts.
The portal's forgotten faces (Redis `forgotten_faces`) are hidden from every search as well as the
gallery's own, and a `forget-face` job adds one (`worker.forget`).
The search runs in the worker's thread pool, each thread with its own Encoder (dlib's detectors are not
documented as thread-safe), so the event loop stays free for lock renewal, heartbeats and the other jobs.
The query's progress stages reach `job.updateProgress` from the event loop, in order: decoded, face
found, encoded, searched. Every mistake in a job becomes a BullMQ `UnrecoverableError` whose message a
person can act on; the worker goes on serving.

Redis going away does not fail a job: a progress update that cannot be sent is logged once and skipped,
and the handler's own Redis commands (the excluded set, removing the selfie) are tried again until Redis
answers or the job's lock must have expired; BullMQ's stalled-job check then runs the job again. When a
job ends here (answered, or failed for good), its selfie leaves its record in Redis (`worker.selfies`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from bullmq import UnrecoverableError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import FswError
from matcher.gallery import Gallery
from matcher.query import Stage, search_selfie
from matcher.search import Match
from schemas import EXCLUDED_SET, PROGRESS, FaceSearchJob, JobDataError, dump_result, parse_job
from schemas.forget import FORGET_JOB, dump_forget_result
from worker.defaults import REDIS_AWAY_IN_JOB_S, REDIS_WAIT_S
from worker.engine import WorkerEngine, make_worker_engine
from worker.forget import PortalForgets
from worker.reload import GalleryReloader
from worker.selfies import SelfieRemoval, was_removed
from worker.stats import WorkerStats

log = logging.getLogger("fsw.worker")
T = TypeVar("T")


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
    """The processor given to the bullmq Worker: `await handler(job, token)` returns the result list.

    With `selfies`, a job's selfie is removed from its record in Redis when the job ends (the worker
    always gives one, unless `FSW_KEEP_SELFIES` is set).
    """

    def __init__(
        self,
        galleries: GalleryReloader,
        encoders: EncoderPool,
        executor: Executor,
        redis: Redis,
        stats: WorkerStats,
        selfies: SelfieRemoval | None = None,
        forgets: PortalForgets | None = None,
    ):
        self.galleries = galleries
        self.encoders = encoders
        self.executor = executor
        self.redis = redis
        self.stats = stats
        self.selfies = selfies
        self.forgets = forgets or PortalForgets(redis, executor)

    async def __call__(self, job: JobLike, token: str | None = None) -> list[dict[str, Any]] | dict[str, Any]:
        job_id = str(job.id)
        self.stats.job_started(job_id)
        timing: dict[str, float] = {}
        ends = False  # whether the job ends with this attempt: its selfie leaves Redis then, and only then
        try:
            result = await self.search(job, timing)
            ends = True
        except (FswError, JobDataError) as e:
            self.stats.job_finished(job_id, ok=False)
            log.info("job %s failed: %s", job_id, e)
            ends = True
            raise UnrecoverableError(str(e)) from None
        except Exception as e:
            self.stats.job_finished(job_id, ok=False)
            if _is_redis_error(e):
                ends = _last_attempt(job)
                raise  # Redis itself, not the job: BullMQ's own handling applies
            log.exception("job %s: unexpected error", job_id)
            ends = True
            raise UnrecoverableError(
                f"fsw-worker could not process this job ({type(e).__name__}: {str(e)[:200]}): see the worker's log"
            ) from None
        finally:
            if ends:  # not when cancelled (a worker abandoning its jobs): the job is run again, with its selfie
                await self._remove_selfie(job, token)
        ms = self.stats.job_finished(job_id, ok=True, search_ms=timing.get("search_ms"))
        said = "forgotten" if isinstance(result, dict) else f"{len(result)} photo{'' if len(result) == 1 else 's'}"
        log.info("job %s answered in %.0f ms: %s", job_id, ms, said)
        return result

    async def search(self, job: JobLike, timing: dict[str, float]) -> list[dict[str, Any]] | dict[str, Any]:
        """The job's result; raises FswError or JobDataError for a job that cannot be answered."""
        if was_removed(job.data):
            raise JobDataError(
                "image was removed from this job when an earlier attempt of it ended (fsw-worker keeps no "
                "selfie in Redis): send the selfie again as a new job"
            )
        base = self.galleries.require()  # taken once: a reload during the job does not affect it
        if getattr(job, "name", None) == FORGET_JOB:
            return await self._forget(job, base)
        gallery = await self._while_redis_away(str(job.id), "reading forgotten_faces", lambda: self.forgets.apply(base))
        request = await self._run(parse_job, job.data)
        progress = _Progress(job)
        try:
            matches = await self._run(self._search_selfie, gallery, request, progress.passed)
        finally:
            await progress.sent()
        timing["search_ms"] = progress.search_ms()
        matches = await self._while_redis_away(str(job.id), "reading excluded_images",
                                               lambda: self._without_excluded(matches))
        if request.limit is not None:
            matches = matches[: request.limit]
        return dump_result(matches)

    async def _forget(self, job: JobLike, gallery: Gallery) -> dict[str, Any]:
        """A `forget-face` job: its selfie's descriptor joins the portal's forgotten faces in Redis."""
        entry = await self._run(lambda: self.forgets.entry(job.data, self.encoders.get(gallery.settings)))
        await self._while_redis_away(str(job.id), "recording a forgotten face", lambda: self.forgets.record(entry))
        return dump_forget_result(entry.id, await self._run(gallery.faces_hidden_by, entry))

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

    async def _remove_selfie(self, job: JobLike, token: str | None) -> None:
        if self.selfies is None:
            return
        selfies = self.selfies
        try:
            await self._while_redis_away(str(job.id), "removing its selfie", lambda: selfies.remove(job, token))
        except Exception as e:  # Redis stayed away: the job cannot end now either; the sweep removes it later
            log.warning("job %s: selfie not removed from Redis yet (%s); the worker's sweep will", job.id, _brief(e))

    async def _while_redis_away(self, job_id: str, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, again while it fails for want of Redis, until `REDIS_AWAY_IN_JOB_S` has passed.

        Past that the job's lock has expired: BullMQ can neither complete nor fail this attempt, and its
        stalled-job check runs the job again. Logged once per call, not at every try.
        """
        deadline = time.monotonic() + REDIS_AWAY_IN_JOB_S
        delay, longest = REDIS_WAIT_S
        warned = False
        while True:
            try:
                result = await call()
            except Exception as e:
                if not _is_connection_error(e) or time.monotonic() + delay > deadline:
                    raise
                if not warned:
                    log.warning("job %s: Redis away while %s (%s): trying again", job_id, doing, _brief(e))
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
                continue
            if warned:
                log.info("job %s: Redis answers again (%s)", job_id, doing)
            return result


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
        self._lost = False  # a progress update failed for want of Redis (logged once a job)

    def passed(self, stage: Stage) -> None:
        """Called from the pool thread as the query passes `stage`."""
        self._at[stage] = time.perf_counter()
        self._loop.call_soon_threadsafe(self._send, stage)

    def _send(self, stage: Stage) -> None:
        self._last = asyncio.ensure_future(self._after(self._last, PROGRESS[stage]))

    async def _after(self, previous: asyncio.Future[None] | None, value: int) -> None:
        if previous is not None:
            await previous
        try:
            await self._job.updateProgress(value)
        except Exception as e:
            if not _is_connection_error(e):
                raise
            if not self._lost:  # progress is for the portal's display: the job goes on without it
                log.warning("job %s: progress not sent (Redis: %s); the job goes on", self._job.id, _brief(e))
                self._lost = True

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


def _is_connection_error(error: BaseException) -> bool:
    """Redis unreachable or the connection lost (not a command Redis refused): worth trying again."""
    return isinstance(error, RedisConnectionError | RedisTimeoutError | OSError)


def _last_attempt(job: JobLike) -> bool:
    """Whether BullMQ fails the job for good when this attempt raises (the portal sends `attempts: 1`)."""
    opts = getattr(job, "opts", None) or {}
    return int(getattr(job, "attemptsMade", 0) or 0) + 1 >= int(opts.get("attempts") or 1)


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:200]}"
