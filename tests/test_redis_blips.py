"""A Redis error around a job does not fail it: every job completes, with the right answer, whichever of the
handler's Redis calls fails.

The handler runs in a real bullmq Worker on a real Redis, jobs are added with the portal's options
(`attempts: 1`, so BullMQ would fail a job for good at its first error). Between the handler and Redis,
`Blips` counts every call the handler makes (progress updates through the job; every command of its
client: the `excluded_images` read, the selfie's removal, the forgotten faces' read) and raises redis'
`ConnectionError` ("Connection closed by server.", as a dropped connection does) at the calls a test
plans. A clean job first lists those calls; then one job per call has that call fail; then every
progress update of a job fails, and the excluded set's read fails three times running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bullmq import Queue, Worker
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas import EXCLUDED_SET
from testkit.jobs import selfie_job
from testkit.photos import PhotoTree
from worker.jobs import EncoderPool, SearchJobs
from worker.reload import GalleryReloader
from worker.selfies import REMOVED, SelfieRemoval
from worker.stats import WorkerStats
from worker.submit import add_jobs, wait_job

QUEUE = "redis-blips"


class Blips:
    """The handler's Redis calls, in order; the ones whose index is in `failing` raise ConnectionError."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.failing: set[int] = set()
        self.failed: list[str] = []

    def plan(self, failing: set[int]) -> None:
        self.calls, self.failing, self.failed = [], failing, []

    def call(self, name: str) -> None:
        index = len(self.calls)
        self.calls.append(name)
        if index in self.failing:
            self.failed.append(name)
            raise RedisConnectionError("Connection closed by server.")


class BlippingRedis(Redis):
    """A real redis client whose every command passes `Blips` first (its name, e.g. SMISMEMBER)."""

    blips: Blips

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.blips.call(str(args[0]).upper())
        return await super().execute_command(*args, **options)


class BlippingJob:
    """A bullmq Job whose progress updates pass `Blips` first."""

    def __init__(self, job: Any, blips: Blips):
        self._job, self._blips = job, blips

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    async def updateProgress(self, value: Any) -> None:
        self._blips.call("updateProgress")
        await self._job.updateProgress(value)


@dataclass
class Ended:
    state: str
    answer: Any
    failed_reason: str | None
    calls: list[str]
    failed: list[str]
    image: Any


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown()


def run(redis_url: str, built_gallery: Path, executor: ThreadPoolExecutor, data: dict[str, Any], excluded: str,
        plans: Callable[[list[str]], list[set[int]]]) -> tuple[Ended, list[Ended]]:
    """A clean job, then one job per plan that `plans(clean job's calls)` gives; how each ended.

    `excluded` is in the `excluded_images` set meanwhile."""

    async def go() -> tuple[Ended, list[Ended]]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        queue = Queue(QUEUE, {"connection": redis_url})
        blips = Blips()
        galleries = GalleryReloader(built_gallery)
        await galleries.refresh()
        blipping = BlippingRedis.from_url(redis_url, decode_responses=True)
        blipping.blips = blips
        handler = SearchJobs(galleries, EncoderPool("onnx", threads=1), executor, blipping, WorkerStats(),
                             SelfieRemoval(blipping, "bull", QUEUE))

        async def processor(job: Any, token: str) -> Any:
            return await handler(BlippingJob(job, blips), token)

        worker = Worker(QUEUE, processor, {"connection": redis_url})

        async def one(failing: set[int]) -> Ended:
            blips.plan(failing)
            (job_id,) = await add_jobs(queue, [data])
            ended = await wait_job(queue, job_id, timeout_s=120)
            image = (await redis.hget(f"bull:{QUEUE}:{job_id}", "data") or "").split('"image":')[1][:60]
            return Ended(ended.state, ended.result, ended.failed_reason, blips.calls, blips.failed, image)

        try:
            await redis.delete(EXCLUDED_SET)
            await redis.sadd(EXCLUDED_SET, excluded)
            clean = await one(set())
            return clean, [await one(failing) for failing in plans(clean.calls)]
        finally:
            await worker.close()
            await queue.close()
            await redis.delete(EXCLUDED_SET)
            await redis.aclose()
            await blipping.aclose()

    return asyncio.run(go())


def assert_answered_like(clean: Ended, ended: Ended) -> None:
    assert ended.failed, f"no call failed (the plan missed): {ended.calls}"
    assert ended.state == "completed", f"{ended.failed} failed the job: {ended.failed_reason}"
    assert ended.answer == clean.answer
    assert ended.image.startswith(f'"{REMOVED}"')  # and its selfie still left Redis


def test_a_connection_error_at_any_redis_call_of_the_handler_does_not_fail_the_job(
    redis_url: str, built_gallery: Path, executor: ThreadPoolExecutor, faces_dir: Path, photo_tree: PhotoTree,
) -> None:
    data = selfie_job(faces_dir / "queries" / "q04.jpg")  # obama
    taken_down = min(photo_tree.photos_of("obama"))  # a photo of his the portal took down
    clean, each = run(redis_url, built_gallery, executor, data, taken_down,
                      lambda calls: [{i} for i in range(len(calls))])
    assert clean.state == "completed" and clean.answer
    assert {x["id"] for x in clean.answer} <= photo_tree.photos_of("obama") - {taken_down}
    assert clean.calls.count("updateProgress") == 4 and {"SMISMEMBER", "EVAL"} <= set(clean.calls)
    assert [e.failed for e in each] == [[call] for call in clean.calls]
    for ended in each:
        assert_answered_like(clean, ended)


def test_progress_that_cannot_be_sent_is_logged_once_and_the_job_goes_on(
    redis_url: str, built_gallery: Path, executor: ThreadPoolExecutor, faces_dir: Path, photo_tree: PhotoTree,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = selfie_job(faces_dir / "queries" / "q04.jpg")

    def every_progress_update(calls: list[str]) -> list[set[int]]:
        return [{i for i, name in enumerate(calls) if name == "updateProgress"}]

    with caplog.at_level(logging.INFO, logger="fsw.worker"):
        clean, (ended,) = run(redis_url, built_gallery, executor, data, min(photo_tree.photos_of("obama")),
                              every_progress_update)
    assert ended.failed == ["updateProgress"] * 4
    assert_answered_like(clean, ended)
    assert sum("progress not sent" in r.getMessage() for r in caplog.records) == 1


def test_the_excluded_set_is_read_again_until_redis_answers(
    redis_url: str, built_gallery: Path, executor: ThreadPoolExecutor, faces_dir: Path, photo_tree: PhotoTree,
) -> None:
    data = selfie_job(faces_dir / "queries" / "q04.jpg")

    def three_reads_running(calls: list[str]) -> list[set[int]]:
        first = calls.index("SMISMEMBER")
        return [{first, first + 1, first + 2}]

    taken_down = min(photo_tree.photos_of("obama"))
    clean, (ended,) = run(redis_url, built_gallery, executor, data, taken_down, three_reads_running)
    assert ended.failed == ["SMISMEMBER"] * 3
    assert_answered_like(clean, ended)
    assert taken_down not in {x["id"] for x in ended.answer}

