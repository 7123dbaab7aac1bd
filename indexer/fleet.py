"""Encoding a build on the fleet: the indexer's side of the encode jobs (`fsw-index build/add --fleet`).

`FleetEncoding` is an `indexer.encoding.Encoding`. It puts the photos, a few per job, on the queue
`fsw-encode` (the contract: `schemas.encode`); every fsw-worker attached to the same Redis encodes them
when it has no selfie to answer. It reads each job's result as the job completes and hands the photos to
the pipeline, which records them in the gallery's writer and commits at checkpoints exactly as for a
local build. A job leaves Redis only after the commit that holds its photos; hence:

- the indexer killed: the same command again adopts the jobs it left in Redis (their ids carry the
  build key: host and gallery folder). Results already returned are recorded without encoding them
  again, jobs still queued or running are waited for, and only photos no job covers are enqueued;
- a worker killed: BullMQ's stalled-job check gives its job to another worker;
- a job that fails on every attempt: a batch is split into one job per photo, and a photo that fails
  alone is reported as skipped with the reason, never retried forever. A job refused for its settings is
  reported at once (each of its photos would be refused alike);
- Redis restarted: each call is retried until Redis answers; a job Redis lost (no persistence) is
  enqueued again;
- committed jobs are removed and the queue's event stream (which repeats each result) is trimmed, so
  no descriptor stays behind in Redis.

Settings: `FleetSettings.from_env()` reads Redis as fsw-worker does (`schemas.connection`) and
`FSW_ENCODE_QUEUE`; tunables are in `indexer.defaults`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bullmq import Job, Queue
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from indexer.defaults import (
    FLEET_ATTEMPTS,
    FLEET_BATCH,
    FLEET_CONNECT_ATTEMPTS,
    FLEET_IDLE_WARN_S,
    FLEET_IN_FLIGHT,
    FLEET_LOST_CHECK_S,
    FLEET_POLL_S,
    FLEET_REDIS_WAIT_S,
    FLEET_RETRY_DELAY_MS,
)
from indexer.encoding import Encoded, Record, Task
from matcher.encoder import EncoderSettings
from matcher.errors import FswError
from matcher.writer import GalleryWriter, PendingPhoto
from schemas.connection import DEFAULT_REDIS_URL, SettingsError, redis_display, redis_kwargs, redis_url
from schemas.encode import (
    ENCODE_JOB_NAME,
    ENCODE_QUEUE,
    REFUSED,
    EncodedPhoto,
    EncodeJob,
    EncodeJobError,
    EncodePhoto,
    build_key,
    parse_encode_result,
)

log = logging.getLogger("fsw.index")
T = TypeVar("T")
_JOB_STATES = {"wait": "list", "active": "list", "paused": "list", "delayed": "zset", "prioritized": "zset",
               "completed": "zset", "failed": "zset"}  # BullMQ's keys of a queue's jobs, by state
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


@dataclass(frozen=True)
class FleetSettings:
    """Where the fleet is: the Redis and the encode queue every fsw-worker consumes."""

    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    queue: str = ENCODE_QUEUE
    prefix: str = "bull"  # BullMQ's key prefix, as the workers use it
    batch: int = FLEET_BATCH
    in_flight: int = FLEET_IN_FLIGHT
    hostname: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        if not self.queue:
            raise SettingsError("FSW_ENCODE_QUEUE is empty: name the encode queue (default fsw-encode)")
        if self.batch < 1 or self.in_flight < 1:
            raise SettingsError("the fleet's batch and in-flight counts must be 1 or more")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> FleetSettings:
        """REDIS_URL (or REDIS_HOST, REDIS_PORT, REDIS_PASSWORD) and FSW_ENCODE_QUEUE, then `overrides`."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {"redis_url": redis_url(env)}
        if env.get("FSW_ENCODE_QUEUE"):
            values["queue"] = env["FSW_ENCODE_QUEUE"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def redis_display(self) -> str:
        return redis_display(self.redis_url)


class FleetEncoding:
    """Photos encoded by the fleet's fsw-workers through the encode queue; see the module's docstring."""

    def __init__(self, fleet: FleetSettings, poll_s: float = FLEET_POLL_S):
        self.fleet = fleet
        self.poll_s = poll_s
        self._recorded: list[str] = []  # jobs whose photos are all recorded (or not needed): removed once committed
        self._committed: list[str] = []  # jobs whose photos the gallery holds: to remove from Redis
        self._build: _Build | None = None
        self.stats = FleetStats()

    def run(self, tasks: Iterator[Task], settings: EncoderSettings, writer: GalleryWriter, record: Record) -> None:
        build = _Build(self, build_key(self.fleet.hostname, str(writer.folder.resolve())), str(writer.photo_root),
                       settings.recorded(), record)
        self._build = build
        asyncio.run(build.run(tasks))

    def committed(self) -> None:
        self._committed += self._recorded
        self._recorded = []

    def close(self) -> None:
        """Remove the jobs of the last commit (their results are in the gallery now)."""
        if not self._committed or self._build is None:
            return
        try:
            asyncio.run(self._build.remove_committed_only())
        except _REDIS_DOWN as e:  # the gallery is committed; the next run of this build removes them
            log.warning("could not remove %d committed encode jobs from Redis (%s): the next run of this "
                        "build removes them", len(self._committed), e)


@dataclass
class FleetStats:
    """What the completed encode jobs' own records say about where a build's time went (the bench reads it).

    Queue overhead = BullMQ's time on the jobs (processedOn to finishedOn) less the workers' own time on
    the photos, plus each worker's idle time between its jobs; fixed costs of a build (scan, first and
    last commit) are outside it.
    """

    jobs: int = 0
    photos: int = 0
    worker_seconds: float = 0.0  # the workers' own time on the photos (EncodeResult.seconds)
    job_seconds: float = 0.0  # processedOn to finishedOn, summed: the worker time plus BullMQ's and search-first waits
    idle_seconds: float = 0.0  # a worker's wait between finishing a job and starting its next
    _last_finish_ms: dict[str, int] = field(default_factory=dict)

    def add(self, job: Job) -> None:
        try:
            result = parse_encode_result(job.returnvalue)
        except EncodeJobError:
            return
        self.jobs += 1
        self.photos += len(result.photos)
        self.worker_seconds += result.seconds
        if job.processedOn and job.finishedOn:
            self.job_seconds += (job.finishedOn - job.processedOn) / 1000
            last = self._last_finish_ms.get(result.worker)
            if last is not None and job.processedOn >= last:
                self.idle_seconds += (job.processedOn - last) / 1000
            self._last_finish_ms[result.worker] = job.finishedOn

    @property
    def queue_seconds(self) -> float:
        return self.job_seconds - self.worker_seconds + self.idle_seconds


@dataclass
class _Batch:
    """An encode job in flight: its photos and the tasks of this run waiting for them (by photo id)."""

    job: EncodeJob
    tasks: dict[str, Task] = field(default_factory=dict)


class _Build:
    """One run of the fleet encoding: the queue, the jobs in flight, results waiting for their tasks."""

    def __init__(self, owner: FleetEncoding, build: str, root: str, settings: dict[str, Any], record: Record):
        self.owner = owner
        self.fleet = owner.fleet
        self.build = build
        self.root = root
        self.settings = settings
        self.record = record
        self.in_flight: dict[str, _Batch] = {}
        self.covered: dict[tuple[str, str], str] = {}  # (photo id, sha256) -> the in-flight job encoding it
        # results of adopted jobs whose task has not come yet: (photo id, sha256) -> (result, worker, job id)
        self.parked: dict[tuple[str, str], tuple[EncodedPhoto, str, str]] = {}
        self.open_photos: dict[str, int] = {}  # finished job -> its photos still parked
        self.exhausted = False
        self.recorded_ids: set[str] = set()  # photos handed to the pipeline: a retried step never hands one twice
        self.queue: Queue | None = None
        self._redis_down_since: float | None = None
        self._refusals: set[str] = set()
        self._adopted: set[str] = set()
        self._last_seen_working: float | None = None  # when a job last finished or was seen running
        self._warned_idle = False

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self, tasks: Iterator[Task]) -> None:
        async with self._connected():
            try:
                await self._retrying(self._adopt, attempts=FLEET_CONNECT_ATTEMPTS)
            except _REDIS_DOWN as e:  # at the start, a wrong address is likelier than an outage: say so
                raise FswError(
                    f"cannot reach Redis at {self.fleet.redis_display} ({e}): start it, or set REDIS_URL (or "
                    "REDIS_HOST, REDIS_PORT, REDIS_PASSWORD) as for fsw-worker"
                ) from None
            next_lost_check = time.monotonic() + FLEET_LOST_CHECK_S
            while True:
                batch: list[Task] = []
                if not self.exhausted and len(self.in_flight) < self.fleet.in_flight:
                    batch = self._take_batch(tasks)
                    if batch:
                        await self._retrying(self._enqueue, [EncodePhoto(id=t.id, sha256=t.sha256, size=t.size)
                                                             for t in batch], {t.id: t for t in batch})
                finished = await self._retrying(self._collect)
                if finished or self._last_seen_working is None:
                    self._last_seen_working = time.monotonic()
                await self._retrying(self._remove_committed)
                if self.exhausted and not self.in_flight:
                    return
                if time.monotonic() >= next_lost_check:
                    await self._retrying(self._enqueue_lost)
                    await self._retrying(self._warn_if_nobody_encodes)
                    next_lost_check = time.monotonic() + FLEET_LOST_CHECK_S
                if not batch and not finished:
                    await asyncio.sleep(self.owner.poll_s)

    async def remove_committed_only(self) -> None:
        async with self._connected():
            await self._retrying(self._remove_committed, attempts=5)

    @contextlib.asynccontextmanager
    async def _connected(self) -> AsyncIterator[Queue]:
        """The build's BullMQ Queue, open for the block."""
        name = f"fsw-index:{self.fleet.hostname}:{os.getpid()}"
        self.queue = Queue(self.fleet.queue, {"connection": redis_kwargs(self.fleet.redis_url, client_name=name),
                                              "prefix": self.fleet.prefix})
        try:
            yield self.queue
        finally:
            queue, self.queue = self.queue, None
            with contextlib.suppress(Exception):  # a connection to a Redis that is away: nothing to keep
                await queue.close()

    # -- tasks in, jobs out ------------------------------------------------------------------------------

    def _take_batch(self, tasks: Iterator[Task]) -> list[Task]:
        """Up to `batch` tasks no job covers yet; tasks an adopted job covers are attached to it (or recorded
        at once from its parked result). Marks the run exhausted when the tasks run out."""
        batch: list[Task] = []
        while len(batch) < self.fleet.batch:
            task = next(tasks, None)
            if task is None:
                self._exhaust()
                break
            key = (task.id, task.sha256)
            if key in self.parked:
                result, worker, job_id = self.parked.pop(key)
                self._record(task, result, worker)
                self._photo_settled(job_id)
            elif key in self.covered:
                self.in_flight[self.covered[key]].tasks[task.id] = task
            else:
                batch.append(task)
        return batch

    def _exhaust(self) -> None:
        """Every task has come: parked results no task asked for are not needed; neither are adopted jobs
        no task was attached to, but those are still waited for so that they leave Redis."""
        self.exhausted = True
        for _, _, job_id in list(self.parked.values()):
            self._photo_settled(job_id)
        self.parked.clear()

    async def _enqueue(self, photos: list[EncodePhoto], tasks: dict[str, Task]) -> None:
        assert self.queue is not None
        job = EncodeJob(build=self.build, root=self.root, settings=self.settings, photos=photos)
        await self.queue.add(ENCODE_JOB_NAME, job.model_dump(mode="json"), {
            "jobId": job.job_id,  # the same batch asked again is the same job
            "attempts": FLEET_ATTEMPTS,
            "backoff": {"type": "fixed", "delay": FLEET_RETRY_DELAY_MS},
            "removeOnComplete": False,  # the result stays until the indexer has committed it
            "removeOnFail": False,
        })
        self.in_flight[job.job_id] = _Batch(job, tasks)
        for p in photos:
            self.covered[(p.id, p.sha256)] = job.job_id

    # -- results in ----------------------------------------------------------------------------------

    async def _collect(self) -> int:
        """Read and hand over the jobs of this build that have completed or failed since the last look."""
        assert self.queue is not None
        client = self.queue.client
        async with client.pipeline(transaction=False) as pipe:
            completed, failed = await pipe.zrange(self.queue.toKey("completed"), 0, -1).zrange(
                self.queue.toKey("failed"), 0, -1).execute()
        done = 0
        for state, ids in (("completed", completed), ("failed", failed)):
            for raw in ids:
                job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                batch = self.in_flight.get(job_id)
                if batch is None:
                    continue
                job = await Job.fromId(self.queue, job_id)
                if job is None:  # gone meanwhile: the lost-job check enqueues it again
                    continue
                # Redis first, then what is done here: a step retried after an error repeats no recording
                if state == "failed":
                    await self._failed(job_id, batch, str(job.failedReason or "no reason recorded"))
                else:
                    self._completed(job_id, batch, job.returnvalue)
                    self.owner.stats.add(job)
                self._settle_in_flight(job_id)
                done += 1
        return done

    def _settle_in_flight(self, job_id: str) -> None:
        batch = self.in_flight.pop(job_id)
        for p in batch.job.photos:
            if self.covered.get((p.id, p.sha256)) == job_id:
                del self.covered[(p.id, p.sha256)]

    def _completed(self, job_id: str, batch: _Batch, returned: Any) -> None:
        try:
            result = parse_encode_result(returned)
            outcomes = {p.id: p for p in result.photos}
            worker = result.worker
        except EncodeJobError as e:
            outcomes, worker = {}, "?"
            log.warning("encode job %s returned what this fsw cannot read (%s): a worker of another version?",
                        job_id, e)
        waiting = 0
        for photo in batch.job.photos:
            outcome = outcomes.get(photo.id) or EncodedPhoto(id=photo.id, skipped="the worker returned no result")
            task = batch.tasks.get(photo.id)
            if task is not None:
                self._record(task, outcome, worker)
            elif not self.exhausted:  # an adopted job's photo whose task has not come yet
                self.parked[(photo.id, photo.sha256)] = (outcome, worker, job_id)
                waiting += 1
        if waiting:
            self.open_photos[job_id] = waiting
        else:
            self.owner._recorded.append(job_id)

    async def _failed(self, job_id: str, batch: _Batch, reason: str) -> None:
        assert self.queue is not None
        refused = reason.startswith(REFUSED)
        if refused and reason not in self._refusals:
            self._refusals.add(reason)
            log.warning("encode job %s failed: %s", job_id, reason)
        photos = [p for p in batch.job.photos if p.id in batch.tasks or not self.exhausted]
        split = len(batch.job.photos) > 1 and not refused
        if split:
            for photo in photos:  # one job per photo: the photo that fails them all is found alone
                task = batch.tasks.get(photo.id)
                await self._enqueue([photo], {photo.id: task} if task else {})
        await self.queue.remove(job_id)  # it holds no result
        if split:
            return
        for photo in photos:
            outcome = EncodedPhoto(id=photo.id, skipped=reason if refused else f"encoding failed on every attempt: "
                                                                                f"{reason}")
            task = batch.tasks.get(photo.id)
            if task is not None:
                self._record(task, outcome, None)
            else:
                self.parked[(photo.id, photo.sha256)] = (outcome, "", "")

    def _record(self, task: Task, outcome: EncodedPhoto, worker: str | None) -> None:
        if task.id in self.recorded_ids:
            return
        self.recorded_ids.add(task.id)
        if outcome.skipped is not None:
            self.record(Encoded(task, error=outcome.skipped, worker=worker or None))
            return
        boxes, descriptors = outcome.arrays()
        photo = PendingPhoto(task.id, task.sha256, task.size, task.mtime, boxes, descriptors)
        self.record(Encoded(task, photo, worker=worker or None, too_small=outcome.too_small))

    def _photo_settled(self, job_id: str) -> None:
        """A parked photo of `job_id` was recorded or is not needed; the job goes once all of its have."""
        if not job_id:
            return
        left = self.open_photos.get(job_id, 0) - 1
        if left > 0:
            self.open_photos[job_id] = left
            return
        self.open_photos.pop(job_id, None)
        self.owner._recorded.append(job_id)

    # -- Redis housekeeping ------------------------------------------------------------------------------

    async def _adopt(self) -> None:
        """Take over the jobs an earlier run of this build left: results to record, jobs to wait for."""
        assert self.queue is not None
        mine = f"enc-{self.build}-"
        client = self.queue.client
        async with client.pipeline(transaction=False) as pipe:
            for state, kind in _JOB_STATES.items():
                key = self.queue.toKey(state)
                pipe.lrange(key, 0, -1) if kind == "list" else pipe.zrange(key, 0, -1)
            listed = await pipe.execute()
        adopted = {"completed": 0, "waiting": 0, "failed": 0}
        for state, ids in zip(_JOB_STATES, listed, strict=True):
            for raw in ids:
                job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                if not job_id.startswith(mine) or job_id in self.in_flight or job_id in self._adopted:
                    continue
                job = await Job.fromId(self.queue, job_id)
                if job is None:
                    continue
                if state == "failed":  # its photos are enqueued afresh, with new attempts
                    await self.queue.remove(job_id)
                    adopted["failed"] += 1
                    continue
                try:
                    data = EncodeJob.model_validate(job.data)
                except ValueError:
                    await self.queue.remove(job_id)
                    continue
                batch = _Batch(data)
                self._adopted.add(job_id)
                if state == "completed":
                    self._completed(job_id, batch, job.returnvalue)
                    adopted["completed"] += 1
                else:
                    self.in_flight[job_id] = batch
                    for p in data.photos:
                        self.covered[(p.id, p.sha256)] = job_id
                    adopted["waiting"] += 1
        if any(adopted.values()):
            log.info("resuming: %d finished encode jobs of an earlier run to record, %d still queued or running, "
                     "%d failed ones enqueued again", adopted["completed"], adopted["waiting"], adopted["failed"])

    async def _remove_committed(self) -> None:
        """Remove the jobs whose photos the gallery now holds, and the event stream's copies of their results."""
        assert self.queue is not None
        if not self.owner._committed:
            return
        for job_id in self.owner._committed:
            await self.queue.remove(job_id)
        self.owner._committed = []
        # each completed event repeats the job's return value; nothing of fsw reads the stream
        await self.queue.client.xtrim(self.queue.toKey("events"), maxlen=0, approximate=False)

    async def _warn_if_nobody_encodes(self) -> None:
        """Once, when jobs wait and no worker has taken one for a while: the build would seem to hang."""
        assert self.queue is not None and self._last_seen_working is not None
        now = time.monotonic()
        if self._warned_idle or now - self._last_seen_working < FLEET_IDLE_WARN_S or not self.in_flight:
            return
        if await self.queue.client.llen(self.queue.toKey("active")):
            self._last_seen_working = now
            return
        self._warned_idle = True
        log.warning("no fsw-worker has taken an encode job from queue %r at %s for %.0f s: start fsw-worker "
                    "(with encoding on) attached to this Redis; the build goes on when one does",
                    self.fleet.queue, self.fleet.redis_display, now - self._last_seen_working)

    async def _enqueue_lost(self) -> None:
        """Enqueue again the jobs Redis no longer has (it restarted without persistence)."""
        assert self.queue is not None
        ids = list(self.in_flight)
        if not ids:
            return
        async with self.queue.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(self.queue.toKey(job_id))
            exists = await pipe.execute()
        lost = [job_id for job_id, there in zip(ids, exists, strict=True) if not there]
        if lost:
            log.warning("Redis lost %d encode jobs of this build (restarted without persistence?): enqueued again",
                        len(lost))
        for job_id in lost:
            batch = self.in_flight.pop(job_id)
            await self._enqueue(batch.job.photos, batch.tasks)

    async def _retrying(self, step: Callable[..., Awaitable[T]], *args: Any, attempts: int | None = None) -> T:
        """Run a Redis step; while Redis is away, say so once and try again with backoff."""
        delay, longest = FLEET_REDIS_WAIT_S
        tried = 0
        while True:
            try:
                result = await step(*args)
            except _REDIS_DOWN as e:
                tried += 1
                if attempts is not None and tried >= attempts:
                    raise
                if self._redis_down_since is None:
                    self._redis_down_since = time.monotonic()
                    log.warning("Redis at %s unavailable (%s): retrying", self.fleet.redis_display, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
                continue
            if self._redis_down_since is not None:
                log.warning("Redis at %s answers again after %.0f s", self.fleet.redis_display,
                            time.monotonic() - self._redis_down_since)
                self._redis_down_since = None
            return result
