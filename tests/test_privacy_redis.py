"""No selfie outlives its job in Redis: the job's record stays (its result or failure reason), its selfie does not.

A redis-server of this module's own (so that SCAN sees only these jobs) and real `fsw-worker run`
processes. Jobs are sent as the portal sends them: the official Node.js client (`tests/node/portal.mjs`,
the portal's options: `attempts: 1`, completed jobs kept 24 h or 1,000, failed ones 7 days), the
Python producer (`worker.submit.add_jobs`, the same options) and `fsw-worker submit`. Once each job
has ended, Redis is read directly: `HGET bull:<queue>:<id> data`, and every value of every key (SCAN)
searched for runs of the selfie's base64. Covered: answered jobs, jobs failed after decoding (no face),
before it (unknown stage, bad base64, too large, data that is not an object), a job whose worker was
SIGKILLed while it held it (run again after BullMQ's stalled-job check), and jobs that ended without
fsw's handler (as BullMQ fails a job stalled twice, or as an earlier fsw version left them).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from bullmq import Queue, UnrecoverableError, Worker
from redis.asyncio import Redis as AsyncRedis

from testkit.gate import Gate
from testkit.jobs import NODE_CLIENT, UID, add_jobs, run_jobs, selfie_job, wait_jobs
from testkit.photos import PhotoTree
from testkit.redis_server import RedisServer
from testkit.worker_process import BIN, WorkerProcess, start_worker
from worker.defaults import REMOVE_ON_COMPLETE, REMOVE_ON_FAIL
from worker.jobs import SearchJobs
from worker.reload import GalleryReloader
from worker.selfies import REMOVED, SelfieRemoval
from worker.settings import WorkerSettings
from worker.stats import WorkerStats

QUEUE = "privacy"
NEEDLE = 48  # characters of base64 that can only come from that selfie


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    own = RedisServer(tmp_path_factory.mktemp("privacy-redis"))
    yield own
    own.stop()


@pytest.fixture(scope="module")
def worker(server: RedisServer, built_gallery: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[WorkerProcess]:
    proc = start_worker(server.url, built_gallery, QUEUE, tmp_path_factory.mktemp("privacy-worker"))
    yield proc
    proc.stop()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def needles(text: str) -> list[bytes]:
    """Runs of `text` from its start, middle and end (and between): any copy of it holds them."""
    last = max(0, len(text) - NEEDLE)
    return [text[i:i + NEEDLE].encode() for i in sorted({0, last // 4, last // 2, 3 * last // 4, last})]


def keys_holding(url: str, runs: list[bytes]) -> list[str]:
    """Every key of the server (SCAN) whose value, of any type, holds one of `runs`."""
    found = []
    with redis.Redis.from_url(url) as r:
        for key in r.scan_iter(count=1000):
            kind = r.type(key).decode()
            if kind == "string":
                values = [r.get(key)]
            elif kind == "hash":
                values = list(r.hgetall(key).values())  # type: ignore[union-attr]
            elif kind == "list":
                values = r.lrange(key, 0, -1)  # type: ignore[assignment]
            elif kind == "set":
                values = list(r.smembers(key))  # type: ignore[arg-type]
            elif kind == "zset":
                values = r.zrange(key, 0, -1)  # type: ignore[assignment]
            elif kind == "stream":
                values = [v for _, fields in r.xrange(key) for v in fields.values()]  # type: ignore[union-attr]
            else:
                values = []
            if any(run in (value or b"") for value in values for run in runs):
                found.append(key.decode())
    return found


def job_record(url: str, queue: str, job_id: str) -> dict[str, Any]:
    """The job's hash as Redis holds it, with `data` and `opts` parsed."""
    with redis.Redis.from_url(url, decode_responses=True) as r:
        record: dict[str, Any] = r.hgetall(f"bull:{queue}:{job_id}")  # type: ignore[assignment]
    assert record, f"job {job_id} is gone from Redis: its record must stay for the portal to read"
    record["data"] = json.loads(record["data"])
    record["opts"] = json.loads(record.get("opts", "{}"))
    return record


def portal(url: str, queue: str, *selfies: Path, **options: str) -> list[dict[str, Any]]:
    """The portal's client: a job for each selfie (`--stage`, `--data` as given); its printed lines."""
    if not (NODE_CLIENT / "node_modules" / "bullmq").is_dir():
        pytest.fail(f"the Node client is not installed: run `make install` (npm ci in {NODE_CLIENT})")
    command = ["node", "portal.mjs", "--redis", url, "--queue", queue]
    for selfie in selfies:
        command += ["--selfie", str(selfie)]
    for name, value in options.items():
        command += [f"--{name}", value]
    done = subprocess.run(command, cwd=NODE_CLIENT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def assert_selfie_gone(url: str, queue: str, job_id: str, runs: list[bytes]) -> dict[str, Any]:
    record = job_record(url, queue, job_id)
    data = record["data"]
    assert data == REMOVED or data["image"] == REMOVED, f"job {job_id}'s data still holds its image"
    assert not keys_holding(url, runs), f"selfie base64 still in Redis after job {job_id} ended"
    return record


# -- jobs that end in the worker's hands -----------------------------------------------------------------


def test_no_selfie_stays_after_jobs_the_portal_sends_end(
    server: RedisServer, worker: WorkerProcess, faces_dir: Path, photo_tree: PhotoTree, tmp_path: Path,
) -> None:
    queries = faces_dir / "queries"
    obama, no_face, leonard = queries / "q04.jpg", queries / "q06.jpg", queries / "q08.jpg"
    bad = b64(leonard)
    bad = f"data:image/jpeg;base64,{bad[:len(bad) // 2]}!{bad[len(bad) // 2:]}"  # not base64: refused before decoding
    huge = f"data:image/jpeg;base64,{b64(obama) * (21 * 2**20 // len(b64(obama)) + 1)}"  # over the 20 MB limit
    sent = {  # what each job carried, and how it must end
        "answered": portal(server.url, QUEUE, obama)[0],
        "no face": portal(server.url, QUEUE, no_face)[0],
        "unknown stage": portal(server.url, QUEUE, leonard, stage="Day-9")[0],
        "bad base64": portal(server.url, QUEUE, leonard, data=json.dumps({"image": bad}))[0],
    }
    runs = needles(b64(obama)) + needles(b64(no_face)) + needles(b64(leonard))
    huge_job, bare_job = run_jobs(server.url, QUEUE, [selfie_job(obama, image=huge), b64(leonard)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FSW_"))}
    submitted = subprocess.run([str(BIN / "fsw-worker"), "submit", str(leonard), "--no-wait"], capture_output=True,
                               text=True, env={**env, "REDIS_URL": server.url, "FSW_QUEUE": QUEUE}, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    submit_id = submitted.stdout.split()[1]  # "job <id> added to queue ..."
    (by_submit,) = wait_jobs(server.url, QUEUE, [submit_id])

    assert sent["answered"]["state"] == "completed"
    assert {x["id"] for x in sent["answered"]["returnvalue"]} <= photo_tree.photos_of("obama")
    assert sent["no face"]["failedReason"].startswith("no face found")
    assert sent["unknown stage"]["failedReason"].startswith("unknown stage 'Day-9'")
    assert "not valid base64" in sent["bad base64"]["failedReason"]
    assert (huge_job.state, bare_job.state, by_submit.state) == ("failed", "failed", "completed")
    for job_id in [line["id"] for line in sent.values()] + [huge_job.id, bare_job.id, submit_id]:
        record = assert_selfie_gone(server.url, QUEUE, job_id, runs)
        assert "returnvalue" in record or "failedReason" in record  # the portal still reads the outcome by id
        assert record["opts"]["attempts"] == 1
        assert (record["opts"]["removeOnComplete"], record["opts"]["removeOnFail"]) == (
            REMOVE_ON_COMPLETE, REMOVE_ON_FAIL)  # every producer of ours sends the portal's options
        if isinstance(record["data"], dict):
            assert record["data"]["uid"] in (UID, "fsw-worker-submit")  # the rest of the data stays


# -- a job whose worker dies while it holds it ----------------------------------------------------------


def test_a_job_run_again_after_its_worker_died_keeps_its_selfie_until_it_ends(
    server: RedisServer, built_gallery: Path, faces_dir: Path, photo_tree: PhotoTree, tmp_path: Path,
) -> None:
    queue = "privacy-stalled"
    obama = faces_dir / "queries" / "q04.jpg"
    gate = Gate(tmp_path / "gate")
    gate.close()
    first = start_worker(server.url, built_gallery, queue, tmp_path / "first", gate=gate)
    second: WorkerProcess | None = None
    try:
        (job_id,) = add_jobs(server.url, queue, [selfie_job(obama)])
        gate.wait_entered(1)
        # in hand: the selfie is still there, because a worker that dies now leaves the job to be run again
        assert job_record(server.url, queue, job_id)["data"]["image"].endswith(b64(obama))
        first.proc.kill()
        first.proc.wait()
        second = start_worker(server.url, built_gallery, queue, tmp_path / "second")
        (outcome,) = wait_jobs(server.url, queue, [job_id], timeout=150)  # lock expiry + two stalled checks
    finally:
        gate.open()
        first.stop()
        if second is not None:
            second.stop()
    assert outcome.state == "completed", outcome.failed_reason  # run again, with its selfie
    assert set(outcome.photo_ids) <= photo_tree.photos_of("obama") and outcome.photo_ids
    record = assert_selfie_gone(server.url, queue, job_id, needles(b64(obama)))
    assert record.get("stc") == "1"  # it did stall once


# -- jobs that ended without fsw's handler ---------------------------------------------------------------


def test_the_worker_removes_selfies_left_in_jobs_that_ended_without_it(
    server: RedisServer, built_gallery: Path, faces_dir: Path, tmp_path: Path,
) -> None:
    """BullMQ fails a job stalled twice without running the handler; earlier versions of fsw kept every selfie.
    A plain bullmq Worker ends such jobs here; a starting fsw-worker (and its sweep, every 15 s) removes them."""
    queue = "privacy-leftovers"
    selfies = [faces_dir / "queries" / name for name in ("q01.jpg", "q04.jpg")]

    async def end_without_fsw() -> list[str]:
        queue_ = Queue(queue, {"connection": server.url})
        ids = [job.id for job in [await queue_.add("process-face", selfie_job(s), {"attempts": 1}) for s in selfies]]

        async def fail_the_second(job, token):  # type: ignore[no-untyped-def]
            if job.id == ids[1]:
                raise UnrecoverableError("job stalled more than allowable limit")
            return []

        plain = Worker(queue, fail_the_second, {"connection": server.url})
        while [await queue_.getJobState(i) for i in ids] != ["completed", "failed"]:
            await asyncio.sleep(0.05)
        await plain.close()
        await queue_.close()
        return [str(i) for i in ids]

    ids = asyncio.run(end_without_fsw())
    runs = [run for s in selfies for run in needles(b64(s))]
    assert keys_holding(server.url, runs)  # the selfies are there before fsw-worker starts
    fsw = start_worker(server.url, built_gallery, queue, tmp_path / "w")
    try:
        fsw.wait_log("removed the selfie left in 2 finished jobs")
    finally:
        fsw.stop()
    for job_id in ids:
        assert_selfie_gone(server.url, queue, job_id, runs)


# -- the pieces ---------------------------------------------------------------------------------------------


def test_the_selfie_is_removed_only_while_the_attempt_holds_the_jobs_lock(server: RedisServer, faces_dir: Path) -> None:
    """An attempt whose lock has gone (a Redis outage longer than the lock) must leave the selfie for the next."""
    queue = "privacy-lock"

    async def go() -> tuple[bool, str, bool, str]:
        client = AsyncRedis.from_url(server.url, decode_responses=True)
        removal = SelfieRemoval(client, "bull", queue)
        queue_ = Queue(queue, {"connection": server.url})
        seen: list[Any] = []
        held = asyncio.Event()

        async def hold(job, token):  # type: ignore[no-untyped-def]
            seen.append(await removal.remove(job, "someone else's token"))
            seen.append(json.loads(await client.hget(f"bull:{queue}:{job.id}", "data"))["image"])
            seen.append(await removal.remove(job, token))
            seen.append(json.loads(await client.hget(f"bull:{queue}:{job.id}", "data"))["image"])
            held.set()
            return []

        plain = Worker(queue, hold, {"connection": server.url})
        await queue_.add("process-face", selfie_job(faces_dir / "queries" / "q04.jpg"), {"attempts": 1})
        await asyncio.wait_for(held.wait(), 60)
        await plain.close()
        await queue_.close()
        await client.aclose()
        return seen[0], seen[1], seen[2], seen[3]

    wrong_removed, after_wrong, removed, after = asyncio.run(go())
    assert not wrong_removed and after_wrong.startswith("data:image/jpeg;base64,")
    assert removed and after == REMOVED


def test_a_job_whose_selfie_was_removed_fails_saying_to_send_it_again(tmp_path: Path) -> None:
    class Job:
        id, data = "7", {"image": REMOVED, "uid": UID, "stage": ""}

        async def updateProgress(self, value: Any) -> None:
            raise AssertionError("no progress for a job that cannot run")

    handler = SearchJobs(GalleryReloader(tmp_path), None, None, None, WorkerStats())  # type: ignore[arg-type]
    with pytest.raises(UnrecoverableError, match="send the selfie again"):
        asyncio.run(handler(Job(), "token"))


@pytest.mark.parametrize("value, keep", [("1", True), ("true", True), ("0", False), ("", False)])
def test_fsw_keep_selfies_keeps_them_for_debugging(value: str, keep: bool) -> None:
    assert WorkerSettings.from_env({"FSW_KEEP_SELFIES": value}).keep_selfies is keep
    assert WorkerSettings.from_env({}).keep_selfies is False  # off unless asked for
