"""Per-job latency through a real `fsw-worker run` on a private Redis, as the portal submits jobs.

A private redis-server on a free port (`testkit.redis_server`), one worker process per gallery
(`testkit.worker_process`: env REDIS_URL, FSW_GALLERY, FSW_QUEUE), jobs added one at a time with the
worker's own producer (`worker.submit.add_jobs`, the portal's `process-face` job). A job's latency is
the client's view: from adding it to holding its result (state polled every 2 ms, then the result
read), so it includes the queue, the worker's pickup and the result's round trip. The worker's own
record (finishedOn - timestamp) is reported too. The worker's RSS is read once it has answered.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from bullmq import Queue

from bench.common import ROOT, log, stats
from testkit.redis_server import RedisServer
from testkit.worker_process import start_worker
from worker.submit import add_jobs, wait_job

POLL_S = 0.002


def worker_available() -> bool:
    return (ROOT / "worker" / "cli.py").is_file() and shutil.which("redis-server") is not None


async def _submit(queue: Queue, payload: dict[str, Any], timeout_s: float) -> tuple[float, float, Any]:
    t = time.perf_counter()
    (job_id,) = await add_jobs(queue, [payload])
    done = await wait_job(queue, job_id, timeout_s, poll_s=POLL_S)
    wall = time.perf_counter() - t
    if done.state == "failed":
        raise RuntimeError(f"worker failed the job: {done.failed_reason}")
    if done.state != "completed":
        raise TimeoutError(f"job {job_id} still {done.state} after {timeout_s} s")
    assert done.finished_ms is not None and done.added_ms is not None
    return wall, (done.finished_ms - done.added_ms) / 1000, done.result


async def _jobs(redis_url: str, queue_name: str, payload: dict[str, Any], repeats: int, warmup: int,
                startup_timeout: float) -> dict[str, Any]:
    queue = Queue(queue_name, {"connection": redis_url})
    try:
        t = time.perf_counter()
        _, _, first = await _submit(queue, payload, startup_timeout)  # answered once the worker is up
        ready_s = time.perf_counter() - t
        for _ in range(warmup):
            await _submit(queue, payload, 60)
        walls, server, result = [], [], first
        for _ in range(repeats):
            wall, own, result = await _submit(queue, payload, 60)
            walls.append(wall)
            server.append(own)
        return {"latency": stats(walls), "worker_recorded": stats(server), "first_job_s": round(ready_s, 2),
                "result": result}
    finally:
        await queue.close()


def measure(galleries: dict[int, Path], payload: dict[str, Any], repeats: int, engine: str = "onnx"
            ) -> dict[str, Any]:
    """Latency through the worker for each gallery, with the worker's RSS."""
    out: dict[str, Any] = {"engine": engine, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="fsw-bench-redis-") as tmp:
        redis = RedisServer(Path(tmp))
        try:
            for faces, gallery in sorted(galleries.items()):
                queue = f"fsw-bench-{faces}"
                started = time.perf_counter()
                worker = start_worker(redis.url, gallery, queue, Path(tmp), "--encoder", engine,
                                      "--log-level", "warning", wait=False)
                try:
                    row = asyncio.run(_jobs(redis.url, queue, payload, repeats, 2, 300))
                    row["startup_to_first_result_s"] = round(time.perf_counter() - started, 2)
                    if worker.proc.poll() is not None:
                        raise RuntimeError(f"fsw-worker exited {worker.proc.returncode}: {worker.log_text()[-2000:]}")
                    p = psutil.Process(worker.proc.pid)
                    row["rss_bytes"] = p.memory_info().rss + sum(
                        c.memory_info().rss for c in p.children(recursive=True))
                    row["matches"] = len(row.pop("result") or [])
                    out["sizes"][str(faces)] = row
                    log(f"  worker, {faces:,} faces: {row['latency']['median_ms']:.0f} ms")
                except Exception as e:
                    raise RuntimeError(f"{e}\nworker log:\n{worker.log_text()[-1500:]}") from e
                finally:
                    worker.stop(timeout=30)
        finally:
            redis.stop()
    return out
