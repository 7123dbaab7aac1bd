"""Per-job latency through a real `fsw-worker run` on a private Redis, as the portal submits jobs.

A private redis-server on a free port, one worker process per gallery (env REDIS_URL, FSW_GALLERY,
FSW_QUEUE), jobs added with Python bullmq's `Queue.add("process-face", {...})` one at a time. A job's
latency is the client's view: from `add` to seeing it completed (state polled every 2 ms), so it
includes the queue, the worker's pickup and the result's round trip. The worker's own record
(finishedOn - timestamp) is reported too. The worker's RSS is read once it has answered.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import ROOT, log, stats

POLL_S = 0.002


def worker_available() -> bool:
    return (ROOT / "worker" / "cli.py").is_file() and shutil.which("redis-server") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    def __init__(self, folder: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _worker_command() -> list[str]:
    script = Path(sys.executable).parent / "fsw-worker"
    if script.is_file():
        return [str(script), "run"]
    return [sys.executable, "-m", "worker", "run"]


async def _submit(queue: Any, payload: dict[str, Any], timeout_s: float) -> tuple[float, float, Any]:
    from bullmq import Job

    t = time.perf_counter()
    job = await queue.add("process-face", payload, {"attempts": 1})
    deadline = time.monotonic() + timeout_s
    while True:
        state = await queue.getJobState(job.id)
        if state in ("completed", "failed"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.id} still {state} after {timeout_s} s")
        await asyncio.sleep(POLL_S)
    wall = time.perf_counter() - t
    done = await Job.fromId(queue, job.id)
    if state == "failed":
        raise RuntimeError(f"worker failed the job: {done.failedReason}")
    return wall, (done.finishedOn - done.timestamp) / 1000, done.returnvalue


async def _jobs(redis_url: str, queue_name: str, payload: dict[str, Any], repeats: int, warmup: int,
                startup_timeout: float) -> dict[str, Any]:
    from bullmq import Queue

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
        redis = PrivateRedis(Path(tmp))
        try:
            for faces, gallery in sorted(galleries.items()):
                queue = f"fsw-bench-{faces}"
                env = {**os.environ, "REDIS_URL": redis.url, "FSW_GALLERY": str(gallery), "FSW_QUEUE": queue}
                env.pop("GPU_INDEX", None)
                logfile = Path(tmp) / f"worker-{faces}.log"
                with open(logfile, "wb") as logf:
                    proc = subprocess.Popen([*_worker_command(), "--encoder", engine, "--log-level", "warning"],
                                            cwd=tmp, env=env, stdout=logf, stderr=subprocess.STDOUT)
                try:
                    started = time.perf_counter()
                    row = asyncio.run(_jobs(redis.url, queue, payload, repeats, 2, 300))
                    row["startup_to_first_result_s"] = round(time.perf_counter() - started, 2)
                    if proc.poll() is not None:
                        raise RuntimeError(f"fsw-worker exited {proc.returncode}: {logfile.read_text()[-2000:]}")
                    p = psutil.Process(proc.pid)
                    row["rss_bytes"] = p.memory_info().rss + sum(
                        c.memory_info().rss for c in p.children(recursive=True))
                    row["matches"] = len(row.pop("result") or [])
                    out["sizes"][str(faces)] = row
                    log(f"  worker, {faces:,} faces: {row['latency']['median_ms']:.0f} ms")
                except Exception as e:
                    tail = logfile.read_text(errors="replace")[-1500:] if logfile.exists() else ""
                    raise RuntimeError(f"{e}\nworker log:\n{tail}") from e
                finally:
                    _stop(proc)
        finally:
            redis.stop()
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
