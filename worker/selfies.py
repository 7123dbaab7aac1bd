"""A job's selfie leaves Redis when the job ends; the job's record stays (the portal reads its result or failure by id).

- `SelfieRemoval.remove(job, token)`: the handler calls it on every way out of a job that ends there
  (answered, or failed for good). It replaces `image` in the job's data with `REMOVED`, in one Lua script
  and only while the job's lock is still this attempt's: a job whose lock was lost (a Redis outage longer
  than the lock) is being taken again by BullMQ's stalled-job check, and that attempt needs the selfie.
- `SelfieRemoval.sweep()`: the backstop, run by the worker at start and every `SELFIE_SWEEP_S`: the same
  for every job of the queue's completed and failed sets (those finished since the previous sweep) whose
  data still holds a selfie: a job BullMQ failed without running the handler (stalled more often than
  `maxStalledCount`), one whose removal could not reach Redis, jobs finished by earlier fsw versions.
- `FSW_KEEP_SELFIES=1` (`WorkerSettings.keep_selfies`) keeps them, for debugging only.

Why when the job ends and not as soon as the selfie is decoded: a job whose worker dies or loses Redis for
longer than its lock is run again by BullMQ's stalled-job check, and that run needs the selfie. Removed at
the end, the selfie stays in Redis only while its job runs (well under a second), as it already stayed
while the job waited in the queue; removed at decoding, every such retry would fail. A retry that still
finds `REMOVED` (the worker died between the removal and BullMQ's completion, or an operator retried a
finished job) fails with a message saying to send the selfie again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.defaults import SELFIE_SWEEP_BATCH, SELFIE_SWEEP_OVERLAP_S, SELFIE_SWEEP_S

log = logging.getLogger("fsw.worker")

# What `image` holds once the selfie has left: plain words, so whoever reads the job sees what happened.
REMOVED = "removed by fsw-worker when the job ended"
FINISHED = ("completed", "failed")  # BullMQ's sets of finished jobs, scored by the time they finished (ms)

# KEYS[1] the job's hash, KEYS[2] its lock. ARGV[1] this attempt's token, ARGV[2] the data without the selfie.
_REMOVE_IF_LOCKED = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[2])
return 1
"""
# KEYS[1] the job's hash, KEYS[2] the set it finished in. ARGV[1] its id, ARGV[2] the sha1 of the data the
# sweep read, ARGV[3] the data without the selfie. Nothing is written if the job has left the set (an
# operator retried it) or its data changed since it was read.
_REMOVE_IF_FINISHED = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local data = redis.call('HGET', KEYS[1], 'data')
if not data or redis.sha1hex(data) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[3])
return 1
"""


class JobLike(Protocol):
    id: Any
    data: Any


def without_selfie(data: Any) -> Any | None:
    """The job data with its selfie replaced by `REMOVED`, or None when there is none to remove.

    Data that is not an object is not the portal's format and may be the selfie itself: it is replaced whole.
    """
    if isinstance(data, dict):
        return {**data, "image": REMOVED} if "image" in data and data["image"] != REMOVED else None
    if isinstance(data, str | list) and data != REMOVED:
        return REMOVED
    return None


def was_removed(data: Any) -> bool:
    """Whether this job's selfie has already been removed (an earlier attempt of the job ended)."""
    return data == REMOVED or (isinstance(data, dict) and data.get("image") == REMOVED)


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)  # as bullmq writes job data


class SelfieRemoval:
    """Removes the selfies of the jobs of one queue (`prefix`:`queue`) once they end, with `redis`."""

    def __init__(self, redis: Redis, prefix: str, queue: str):
        self.redis = redis
        self.base = f"{prefix}:{queue}"
        self._since_ms: float | None = None  # when the last complete sweep began; None: sweep everything
        self._seen: set[str] = set()  # the jobs that sweep read, not read again by the next

    def job_key(self, job_id: Any) -> str:
        return f"{self.base}:{job_id}"

    async def remove(self, job: JobLike, token: str | None) -> bool:
        """Remove the selfie from the job's data while `token` holds its lock; whether it was removed now.

        Raises Redis' errors (the caller retries while Redis is away).
        """
        data = without_selfie(job.data)
        if data is None or not token:
            return False
        key = self.job_key(job.id)
        done = await self.redis.eval(_REMOVE_IF_LOCKED, 2, key, f"{key}:lock", token, _dumps(data))  # type: ignore[misc]
        return bool(done)

    async def sweep(self) -> int:
        """Remove the selfie of every job finished since the last sweep that still holds one; how many were."""
        started_ms = time.time() * 1000
        low = "-inf" if self._since_ms is None else self._since_ms - SELFIE_SWEEP_OVERLAP_S * 1000
        removed = 0
        seen: set[str] = set()
        for state in FINISHED:
            finished = f"{self.base}:{state}"
            ids = [str(i) for i in await self.redis.zrangebyscore(finished, low, "+inf")]
            seen.update(ids)
            fresh = [i for i in ids if i not in self._seen]
            for start in range(0, len(fresh), SELFIE_SWEEP_BATCH):
                batch = fresh[start:start + SELFIE_SWEEP_BATCH]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in batch:
                        pipe.hget(self.job_key(job_id), "data")
                    raws = await pipe.execute()
                for job_id, raw in zip(batch, raws, strict=True):
                    removed += await self._remove_finished(finished, job_id, raw)
        self._since_ms, self._seen = started_ms, seen
        return removed

    async def _remove_finished(self, finished: str, job_id: str, raw: str | bytes | None) -> int:
        if raw is None:
            return 0
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            data = without_selfie(json.loads(text))
            rewritten = None if data is None else _dumps(data)
        except ValueError:  # not JSON (or NaN in it): no BullMQ producer wrote it; not ours to rewrite
            return 0
        if rewritten is None:
            return 0
        sha1 = hashlib.sha1(text.encode()).hexdigest()
        done = await self.redis.eval(  # type: ignore[misc]
            _REMOVE_IF_FINISHED, 2, self.job_key(job_id), finished, job_id, sha1, rewritten
        )
        return int(bool(done))

    async def keep_sweeping(self, done: asyncio.Event) -> None:
        """Sweep now and every `SELFIE_SWEEP_S` until `done` is set; a sweep that fails is made up by the next."""
        while not done.is_set():
            try:
                removed = await self.sweep()
                if removed:
                    log.info("removed the selfie left in %d finished job%s", removed, "" if removed == 1 else "s")
            except (RedisError, OSError) as e:  # Redis away: the heartbeat reports it; the next sweep catches up
                log.debug("selfie sweep not done (%s): next in %.0f s", type(e).__name__, SELFIE_SWEEP_S)
            except Exception:  # a bug must not end the sweeps for the worker's life
                log.exception("selfie sweep failed: trying again in %.0f s", SELFIE_SWEEP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), SELFIE_SWEEP_S)
