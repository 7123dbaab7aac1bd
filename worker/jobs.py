"""The job handler: one `process-face` job in, the matching photos out.

    job data -> FaceSearchJob (size-checked before decoding) -> stage checked -> bytes -> RGB image
    -> the selfie's face and descriptor -> gallery search -> Redis `excluded_images` left out -> limit

Decoding, detection, encoding and search run in the worker's thread pool, each thread with its own
Encoder (dlib's detectors are not documented as thread-safe), so the event loop stays free for lock
renewal, heartbeats and the other jobs. Progress goes to `job.updateProgress` from the event loop, in
order: decoded, face found, encoded, searched. Every mistake in a job becomes a BullMQ
`UnrecoverableError` whose message a person can act on; the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np
from bullmq import UnrecoverableError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from matcher.encoder import Encoder, EncoderSettings
from matcher.errors import FswError, ImageError
from matcher.gallery import Gallery
from matcher.images import load_image
from matcher.query import SELFIE_MAX_PIXELS, search_descriptor, selfie_descriptor
from matcher.search import Match
from schemas import EXCLUDED_SET, PROGRESS, FaceSearchJob, JobDataError, MatchEntry, SearchResult, parse_job
from worker.engine import WorkerEngine, make_worker_engine
from worker.reload import GalleryReloader
from worker.stats import WorkerStats

log = logging.getLogger("fsw.worker")

_EXPAND = EncoderSettings().selfie_expansion

# HOG finds faces down to about 40 px with the selfie's upsampling; a smaller picture cannot hold one.
MIN_SELFIE_SIDE = 40


class JobLike(Protocol):
    """What the handler uses of a bullmq Job."""

    id: Any
    data: Any

    def updateProgress(self, progress: Any) -> Any: ...


class EncoderPool:
    """One Encoder per thread, made on first use, remade when a new gallery records other settings.

    `make_engine(name, threads)` builds each thread's descriptor engine: a test passes one that fails
    like CUDA out of memory.
    """

    def __init__(
        self,
        engine: str = "onnx",
        threads: int | None = None,
        make_engine: Callable[..., WorkerEngine] = make_worker_engine,
    ):
        self.engine = engine
        self.threads = threads
        self._make_engine = make_engine
        self._local = threading.local()
        self.device = "cpu"  # where the last engine made runs; for the heartbeat

    def get(self, recorded: dict[str, Any]) -> tuple[Encoder, WorkerEngine]:
        key = repr(sorted(recorded.items()))
        held = getattr(self._local, "held", None)
        if held is None or held[0] != key:
            engine = self._make_engine(self.engine, self.threads)
            settings = EncoderSettings.from_recorded(recorded, engine=self.engine, threads=self.threads)
            held = (key, Encoder(settings, engine=engine), engine)
            self._local.held = held
            self.device = engine.device
        return held[1], held[2]


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
        stage = gallery.check_stage(request.stage)  # before the costly steps
        image = await self._run(_decode, request)
        await job.updateProgress(PROGRESS["decoded"])

        face_found = asyncio.Event()
        loop = asyncio.get_running_loop()
        encoding = asyncio.ensure_future(
            self._run(self._describe, image, gallery, lambda: loop.call_soon_threadsafe(face_found.set))
        )
        found = asyncio.ensure_future(face_found.wait())
        try:
            await asyncio.wait({encoding, found}, return_when=asyncio.FIRST_COMPLETED)
            if face_found.is_set():
                await job.updateProgress(PROGRESS["face_found"])
            descriptor = await encoding
        finally:
            found.cancel()
            if not encoding.done():
                await asyncio.wait({encoding})  # never leave a thread's result unobserved
        await job.updateProgress(PROGRESS["encoded"])

        matches, timing["search_ms"] = await self._run(_search, gallery, descriptor, stage, request.threshold)
        matches = await self._without_excluded(matches)
        if request.limit is not None:
            matches = matches[: request.limit]
        await job.updateProgress(PROGRESS["searched"])
        return SearchResult([MatchEntry(id=m.id, similarity=m.similarity, box=m.box) for m in matches]).model_dump(
            mode="json"
        )

    def _describe(self, image: np.ndarray, gallery: Gallery, on_face: Callable[[], None]) -> np.ndarray:
        encoder, engine = self.encoders.get(gallery.settings)
        engine.on_face = on_face
        fallbacks = engine.fallbacks
        try:
            return selfie_descriptor(encoder, image)
        finally:
            engine.on_face = None
            if engine.fallbacks > fallbacks:  # once per job, however many engine calls fell back
                self.stats.cuda_oom()

    async def _without_excluded(self, matches: list[Match]) -> list[Match]:
        if not matches:
            return matches
        flags = await self.redis.smismember(EXCLUDED_SET, [m.id for m in matches])
        return [m for m, excluded in zip(matches, flags, strict=True) if not excluded]

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def _decode(request: FaceSearchJob) -> np.ndarray:
    """The selfie as an RGB array: base64 -> bytes -> image (size-checked from its header)."""
    image = load_image(request.image_bytes(), max_pixels=SELFIE_MAX_PIXELS)
    height, width = image.shape[:2]
    if min(height, width) < MIN_SELFIE_SIDE:
        raise ImageError(
            f"image too small: {width}x{height} pixels: send a selfie at least {MIN_SELFIE_SIDE} pixels "
            "on each side, with the face filling a good part of it"
        )
    return image


def _search(gallery: Gallery, descriptor: np.ndarray, stage: str, threshold: float) -> tuple[list[Match], float]:
    started = time.perf_counter()
    # the same search as `fsw-index search`, query expansion included; excluded ids are filtered after
    matches = search_descriptor(gallery, descriptor, stage, threshold, expand=_EXPAND)
    return matches, (time.perf_counter() - started) * 1000


def _is_redis_error(error: BaseException) -> bool:
    return isinstance(error, RedisError | ConnectionError)
