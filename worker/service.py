"""One worker process: a BullMQ Worker on the queue, its heartbeat, pause switch, gallery reload and signals.

`WorkerService(settings).run()` is the whole life of a worker:

1. connect to Redis (retrying with backoff until it answers), load the gallery, claim the worker id;
2. start the BullMQ Worker with `SearchJobs` as its processor, its Redis connections named
   `bull:<base64 of queue>:w:<id>` so that Node's `queue.getWorkers()` lists it; and, unless encoding is
   off, a second one on `fsw-encode` with `EncodeJobs`, for `fsw-index --fleet` (`worker.encode_jobs`);
3. beside it: the heartbeat every 5 s, the pause switch (`worker:<id>:paused` = "1") polled every
   second, the gallery reload polled every 2 s, the sweep for selfies left in finished jobs every 15 s
   (`worker.selfies`; these and every other interval: `worker.defaults`);
4. on SIGTERM/SIGINT: take no new job, finish the ones in hand, write status offline, return 0.
   A second signal abandons the jobs in hand (BullMQ hands them to another worker once their lock
   expires).

Losing Redis stops nothing: BullMQ's connections retry with backoff and consuming resumes when Redis is
back; the heartbeat logs the outage once and writes again as soon as it can.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

from bullmq import Worker
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from matcher.encoder import cores
from schemas import Heartbeat, WorkerStatus, paused_key
from worker.defaults import (
    CLOSE_WAIT_S,
    GRACEFUL_STOP_S,
    HEARTBEAT_INTERVAL_S,
    LOCK_DURATION_MS,
    OFFLINE_BEAT_ATTEMPTS,
    PAUSE_POLL_S,
    QUEUE_ERROR_LOG_EVERY_S,
    REDIS_RETRIES,
    REDIS_RETRY_BACKOFF_S,
    REDIS_WAIT_S,
    RUN_RETRY_DELAY_MS,
    STALLED_INTERVAL_MS,
    WARM_UP_TIMEOUT_S,
)
from worker.encode_jobs import EncodeJobs, SearchFirst
from worker.engine import WorkerEngine, make_worker_engine
from worker.heartbeat import HostMetrics, base_worker_id, claim_worker_id, write_heartbeat
from worker.jobs import EncoderPool, SearchJobs
from worker.reload import GalleryReloader
from worker.selfies import SelfieRemoval
from worker.settings import WorkerSettings
from worker.stats import WorkerStats

log = logging.getLogger("fsw.worker")


def node_client_name(prefix: str, queue: str, worker_name: str) -> str:
    """The Redis client name Node BullMQ's `queue.getWorkers()` matches: `<prefix>:<base64(queue)>:w:<name>`."""
    encoded = base64.b64encode(queue.encode()).decode("ascii")
    return f"{prefix}:{encoded}:w:{worker_name}"


def fsw_version() -> str:
    try:
        return metadata.version("fsw")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


class WorkerService:
    """The worker: run() until a signal (or `request_stop()`), then stop gracefully; returns the exit code."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        engine: str = "onnx",
        make_engine: Callable[..., WorkerEngine] = make_worker_engine,
        install_signals: bool = True,
    ):
        self.settings = settings
        self.stats = WorkerStats()
        threads = max(1, cores() // settings.concurrency)
        cache_dir = str(settings.cache_dir) if settings.cache_dir else None
        self.encoders = EncoderPool(
            engine, threads, make_engine=make_engine, on_fallback=self.stats.cuda_oom, cache_dir=cache_dir
        )
        # encode jobs (fsw-index --fleet) have threads and encoders of their own: a batch never takes a selfie's
        self.encode_encoders = EncoderPool(
            engine, max(1, cores() // max(1, settings.encode_concurrency)), make_engine=make_engine,
            on_fallback=self.stats.cuda_oom, cache_dir=cache_dir,
        )
        self._encode_jobs: EncodeJobs | None = None
        self.galleries = GalleryReloader(
            settings.gallery, gpu=settings.gpu_index, on_gpu_fallback=self.stats.search_gpu_fallback
        )
        self.metrics = HostMetrics(settings.gpu_index)
        self.install_signals = install_signals
        self.worker_id: str | None = None
        self.paused = False
        self._stop: asyncio.Event | None = None
        self._stopping_count = 0
        self._worker: Worker | None = None
        self._encode_worker: Worker | None = None
        self._run_tasks: list[asyncio.Future[Any]] = []
        self._redis_down_since: float | None = None

    # -- the life of a worker ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        redis = Redis(
            **self.settings.redis_kwargs(client_name=f"fsw:{self.settings.hostname}:{os.getpid()}"),
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=REDIS_RETRY_BACKOFF_S[1], base=REDIS_RETRY_BACKOFF_S[0]), REDIS_RETRIES),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        executor = ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="fsw-job")
        background: list[asyncio.Task[Any]] = []
        done = asyncio.Event()  # set once the BullMQ worker has closed: the background loops end then
        try:
            if not await self._connect(redis):
                return 0  # stopped before Redis ever answered
            await self.galleries.refresh()
            await self._warm_up(loop, executor)
            base = base_worker_id(self.settings.hostname, self.settings.gpu_index)
            self.worker_id = await self._claim(redis, base)
            if self.worker_id is None:
                return 0  # stopped while Redis was away
            if self.worker_id != base:
                log.info("worker id %s is held by a live worker: using %s", base, self.worker_id)
            selfies = SelfieRemoval(redis, self.settings.prefix, self.settings.queue)
            if self.settings.keep_selfies:
                selfies = None
                log.warning("FSW_KEEP_SELFIES is set: selfies stay in Redis with their jobs (for debugging only)")
            handler = SearchJobs(self.galleries, self.encoders, executor, redis, self.stats, selfies)
            self._worker = self._start_worker(handler)
            self._encode_worker = self._start_encoding(redis)
            device = "CPU" if self.encoders.device != "cuda" else f"GPU {self.settings.gpu_index}"
            log.info(
                "worker %s serving queue %r on %s: gallery %s, concurrency %d, %s",
                self.worker_id, self.settings.queue, self.settings.redis_display, self.settings.gallery,
                self.settings.concurrency, device,
            )
            background = [
                asyncio.ensure_future(self._heartbeats(redis, done)),
                asyncio.ensure_future(self._pause_switch(redis, done)),
                asyncio.ensure_future(self.galleries.watch(done)),
                *([asyncio.ensure_future(selfies.keep_sweeping(done))] if selfies else []),
            ]
            await self._beat(redis)
            await self._stop.wait()
            log.info("stopping: finishing the jobs in hand (%s)", self.stats.current_job or "none")
            await self._close_worker()
            done.set()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, CLOSE_WAIT_S)
            await self._beat(redis, "offline", attempts=OFFLINE_BEAT_ATTEMPTS)
            log.info(
                "worker %s stopped: %d jobs completed, %d failed", self.worker_id,
                self.stats.jobs_processed, self.stats.jobs_failed,
            )
            return 0
        finally:
            done.set()
            for task in background:
                task.cancel()
            executor.shutdown(wait=False, cancel_futures=True)
            if self._encode_jobs is not None:
                self._encode_jobs.shutdown()
            with contextlib.suppress(Exception):
                await redis.aclose()
            self.metrics.close()

    def request_stop(self) -> None:
        """First call: stop taking jobs and finish the ones in hand. Second call: abandon them."""
        self._stopping_count += 1
        if self._stop is not None:
            self._stop.set()
        if self._stopping_count >= 2 and self._worker is not None:
            log.warning("second stop signal: abandoning the jobs in hand")
            for worker in self._bullmq_workers():
                worker.forceClosing = True
                worker.cancelProcessing()

    # -- pieces ---------------------------------------------------------------------------------

    async def _connect(self, redis: Redis) -> bool:
        """Wait for Redis with backoff; False if a stop came first."""
        assert self._stop is not None
        delay, longest = REDIS_WAIT_S
        while not self._stop.is_set():
            try:
                await redis.ping()  # type: ignore[misc]
                self._redis_available()
                return True
            except (RedisError, OSError) as e:
                self._redis_unavailable(e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, longest)
        return False

    async def _claim(self, redis: Redis, base: str) -> str | None:
        """The worker id (see `claim_worker_id`), waiting for Redis if it goes away meanwhile."""
        while True:
            try:
                return await claim_worker_id(redis, base, self.record("starting"))
            except (RedisError, OSError) as e:
                self._redis_unavailable(e)
                if not await self._connect(redis):
                    return None

    async def _warm_up(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        """Make every thread's encoder now (without a gallery yet, with the default settings).

        Loading the models holds the GIL for about a second, which would stall the event loop in the
        middle of a job; done here, model errors also show at start and the heartbeat knows the device.
        The barrier keeps each warm-up task on a thread of its own.
        """
        recorded = self.galleries.current.settings if self.galleries.current else {}
        together = threading.Barrier(self.settings.concurrency)

        def warm() -> None:
            self.encoders.get(recorded)
            together.wait(timeout=WARM_UP_TIMEOUT_S)

        await asyncio.gather(*(loop.run_in_executor(executor, warm) for _ in range(self.settings.concurrency)))

    def _start_encoding(self, redis: Redis) -> Worker | None:
        """The second BullMQ Worker: encode jobs of `fsw-index --fleet`, after the selfies (`worker.encode_jobs`)."""
        s = self.settings
        if not s.encode_concurrency:
            return None
        search_first = SearchFirst(self.stats, redis, s.queue, s.prefix)
        self._encode_jobs = EncodeJobs(self.encode_encoders, s.encode_concurrency, search_first,
                                       lambda: self.worker_id or "", s.photos)
        log.info("encoding photos from queue %r too, %d job%s at once, while no selfie waits; photos from %s",
                 s.encode_queue, s.encode_concurrency, "" if s.encode_concurrency == 1 else "s",
                 s.photos or "the photo root each job names")
        return self._start_worker(self._encode_jobs, s.encode_queue, s.encode_concurrency)

    def _bullmq_workers(self) -> list[Worker]:
        return [w for w in (self._worker, self._encode_worker) if w is not None]

    def _start_worker(self, handler: Callable[..., Any], queue: str | None = None,
                      concurrency: int | None = None) -> Worker:
        """A BullMQ Worker on `queue` (default: the search queue) with this worker's name and timings."""
        assert self.worker_id is not None
        queue = queue or self.settings.queue
        client_name = node_client_name(self.settings.prefix, queue, self.worker_id)
        worker = Worker(
            queue,
            handler,
            {
                # client_name in the connection options names every connection BullMQ opens, the
                # blocking one included, and again after each reconnection.
                "connection": self.settings.redis_kwargs(client_name=client_name),
                "prefix": self.settings.prefix,
                "concurrency": concurrency or self.settings.concurrency,
                "name": self.worker_id,
                "autorun": False,
                "lockDuration": LOCK_DURATION_MS,
                "stalledInterval": STALLED_INTERVAL_MS,
                "runRetryDelay": RUN_RETRY_DELAY_MS,
            },
        )
        # Python bullmq would CLIENT SETNAME `bull:<queue>:w:<name>` (the plain queue name) when it
        # starts, which Node's getWorkers() does not match: it must be set before run().
        worker.clientName = client_name
        errors: dict[str, float] = {}

        def on_error(error: BaseException, *_: Any) -> None:
            text = f"{type(error).__name__}: {error}"
            if time.monotonic() - errors.get(text, -1e9) > QUEUE_ERROR_LOG_EVERY_S:  # not at every retry
                log.warning("queue connection: %s", text)
                errors[text] = time.monotonic()

        worker.on("error", on_error)
        self._run_tasks.append(asyncio.ensure_future(worker.run()))
        return worker

    async def _close_worker(self) -> None:
        """Close the search and the encode Worker together, each once its jobs in hand are done."""
        await asyncio.gather(*(self._close(worker) for worker in self._bullmq_workers()))
        for run_task in self._run_tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(run_task, CLOSE_WAIT_S)

    async def _close(self, worker: Worker) -> None:
        closing = asyncio.ensure_future(self._finish_jobs_then_close(worker))
        finished, _ = await asyncio.wait({closing}, timeout=GRACEFUL_STOP_S)
        if not finished:
            log.warning("jobs still running after %.0f s: abandoning them", GRACEFUL_STOP_S)
            worker.forceClosing = True
            worker.cancelProcessing()
            finished, _ = await asyncio.wait({closing}, timeout=CLOSE_WAIT_S)
        if finished:
            with contextlib.suppress(Exception):
                closing.result()

    @staticmethod
    async def _finish_jobs_then_close(worker: Worker) -> None:
        """Stop fetching, wait for every job in hand, then close the connections.

        bullmq's close() waits only for the tasks it sees when called: a job whose fetch completes a
        moment later would be processed after its connections closed, and left active. So: pause (no
        new fetch), wait until nothing is in flight for a few loop turns, and only then close.
        """
        await worker.pause()
        quiet = 0
        while quiet < 3:
            pending = [task for task in worker.processing if not task.done()]
            if pending:
                quiet = 0
                await asyncio.wait(pending)
            else:
                quiet += 1
                await asyncio.sleep(0.02)  # lets the run loop turn a just-fetched job into a task
        await worker.close()

    async def _heartbeats(self, redis: Redis, done: asyncio.Event) -> None:
        """Every 5 s, and at once when the gallery changes, so the dashboard shows the new version."""
        changed = self.galleries.changed
        while not done.is_set():
            waits = {asyncio.ensure_future(done.wait()), asyncio.ensure_future(changed.wait())}
            try:
                await asyncio.wait(waits, timeout=HEARTBEAT_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
            changed.clear()
            if not done.is_set():
                await self._beat(redis)

    async def _pause_switch(self, redis: Redis, done: asyncio.Event) -> None:
        """Pause while worker:<id>:paused is "1"; resume when it is anything else or gone."""
        assert self.worker_id is not None and self._worker is not None
        key = paused_key(self.worker_id)
        pausing: asyncio.Task[Any] | None = None
        while not done.is_set():
            try:
                want = await redis.get(key) == "1"  # type: ignore[misc]
                self._redis_available()
            except (RedisError, OSError) as e:
                self._redis_unavailable(e)
                want = self.paused  # Redis away: keep doing what we do
            if want and not self.paused and not self._stop_requested:
                self.paused = True
                pausing = asyncio.ensure_future(  # lets the jobs in hand finish
                    asyncio.gather(*(worker.pause() for worker in self._bullmq_workers())))
                log.info("paused by %s: taking no new jobs", key)
                await self._beat(redis)
            elif not want and self.paused and not self._stop_requested:
                if pausing is not None:
                    await pausing
                for worker in self._bullmq_workers():
                    worker.resume()
                self.paused = False
                log.info("resumed: %s cleared", key)
                await self._beat(redis)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), PAUSE_POLL_S)

    @property
    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _beat(self, redis: Redis, status: WorkerStatus | None = None, attempts: int = 1) -> bool:
        record = self.record(status)
        for attempt in range(attempts):
            try:
                await write_heartbeat(redis, record)
                self._redis_available()
                return True
            except (RedisError, OSError) as e:
                self._redis_unavailable(e)
                if attempt + 1 < attempts:
                    await asyncio.sleep(1)
        return False

    def _redis_available(self) -> None:
        if self._redis_down_since is not None:
            log.info(
                "Redis at %s answers again after %.0f s", self.settings.redis_display,
                time.monotonic() - self._redis_down_since,
            )
            self._redis_down_since = None

    def _redis_unavailable(self, error: BaseException) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            log.warning("Redis at %s unavailable (%s): retrying", self.settings.redis_display, error)

    def status(self) -> WorkerStatus:
        if self.paused:
            return "paused"
        return "busy" if self.stats.busy else "online"

    def record(self, status: WorkerStatus | None = None) -> Heartbeat:
        """The heartbeat record as of now."""
        now = time.time()
        gallery = self.galleries.current
        metrics = self.metrics.sample()
        return Heartbeat(
            id=self.worker_id or "",
            hostname=self.settings.hostname,
            status=status or self.status(),
            gpu_index=self.settings.gpu_index,
            use_cpu=self.encoders.device != "cuda",
            concurrency=self.settings.concurrency,
            start_time=round(self.stats.start_time, 3),
            uptime=round(now - self.stats.start_time, 1),
            last_heartbeat=round(now, 3),
            jobs_processed=self.stats.jobs_processed,
            jobs_failed=self.stats.jobs_failed,
            current_job=self.stats.current_job,
            pid=os.getpid(),
            queue=self.settings.queue,
            fsw_version=fsw_version(),
            descriptor_engine=self.encoders.engine,
            gallery_version=gallery.version if gallery else None,
            gallery_photos=gallery.photo_count if gallery else None,
            gallery_faces=gallery.face_count if gallery else None,
            gallery_error=self.galleries.error,
            search_p50_ms=self.stats.search_p50_ms(),
            job_p50_ms=self.stats.job_p50_ms(),
            cuda_oom_fallbacks=self.stats.cuda_oom_fallbacks,
            last_cuda_oom=self.stats.last_cuda_oom,
            search_gpu_fallbacks=self.stats.search_gpu_fallbacks,
            **metrics,
        )
