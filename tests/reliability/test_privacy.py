"""Secrets and selfies stay out of everything the worker and the CLIs print.

A password-protected Redis; `fsw-worker run --log-level debug` (the most it ever says), jobs from the
Python producer and from `fsw-worker submit` (password in REDIS_URL, then in REDIS_PASSWORD), failing
jobs among them, and `fsw-index search` / `info` on the same selfies. Every byte they print is captured;
neither the password nor any 40-character run of a selfie's base64 may appear. TLS: a `rediss://` URL
gives the worker's, the BullMQ queue's and the BullMQ worker's connections TLS.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from pathlib import Path

from redis.asyncio.connection import SSLConnection

from testkit.jobs import run_jobs, selfie_job
from testkit.redis_server import RedisServer
from testkit.worker_process import BIN, start_worker
from worker.settings import WorkerSettings

QUEUE = "rel-privacy"
WINDOW = 40


def _windows(text: str) -> set[str]:
    return {text[i:i + WINDOW] for i in range(len(text) - WINDOW + 1)}


def _leaks(output: str, secrets: set[str]) -> list[str]:
    return [output[i:i + WINDOW] for i in range(len(output) - WINDOW + 1) if output[i:i + WINDOW] in secrets]


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    return f"$ {' '.join(args[:2])} (exit {done.returncode})\n{done.stdout}\n{done.stderr}\n"


def test_no_password_and_no_selfie_in_any_output(
    private_redis: RedisServer, built_gallery: Path, faces_dir: Path, tmp_path: Path,
    reliability_report,  # type: ignore[no-untyped-def]
) -> None:
    password = private_redis.password
    assert password
    selfies = [faces_dir / "queries" / name for name in ("q01.jpg", "q04.jpg", "q08.jpg", "q06.jpg")]  # q06: no face
    secrets: set[str] = set()
    for selfie in selfies:
        secrets |= _windows(base64.b64encode(selfie.read_bytes()).decode())
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FSW_"))}
    url_env = {**base_env, "REDIS_URL": private_redis.url, "FSW_QUEUE": QUEUE}
    split_env = {**base_env, "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(private_redis.port),
                 "REDIS_PASSWORD": password, "FSW_QUEUE": QUEUE}
    outputs: list[str] = []
    worker = start_worker(private_redis.url, built_gallery, QUEUE, tmp_path / "w", "--log-level", "debug")
    try:
        outcomes = run_jobs(private_redis.url, QUEUE, [selfie_job(s) for s in selfies]
                            + [{**selfie_job(selfies[0]), "stage": "Day-9"}, {**selfie_job(selfies[1]), "limit": 0}])
        for selfie in selfies:
            outputs.append(_cli([str(BIN / "fsw-worker"), "submit", str(selfie)], url_env, tmp_path))
        outputs.append(_cli([str(BIN / "fsw-worker"), "submit", str(selfies[2]), "--stage", "Day-1/Morning"],
                            split_env, tmp_path))
        for selfie in selfies[:2]:
            outputs.append(_cli([str(BIN / "fsw-index"), "search", str(selfie), "--gallery", str(built_gallery)],
                                base_env, tmp_path))
        outputs.append(_cli([str(BIN / "fsw-index"), "info", "--gallery", str(built_gallery)], base_env, tmp_path))
        worker.wait_record(lambda rec: rec["jobs_processed"] + rec["jobs_failed"] >= len(outcomes) + len(selfies) + 1,
                           timeout=30)
    finally:
        worker.stop()
    outputs.append(worker.log_text())
    everything = "\n".join(outputs)
    leaks = _leaks(everything, secrets)
    reliability_report.record(
        "worker: secrets and selfies in output", trials=1, jobs_sent=len(outcomes) + len(selfies) + 1,
        jobs_answered=len(outcomes) + len(selfies) + 1, wrong_answers=len(leaks) + everything.count(password),
        notes=f"{len(everything)} characters of worker (debug) and CLI output scanned for the password and "
        f"{len(secrets)} 40-character runs of selfie base64",
    )
    assert " DEBUG " in worker.log_text()  # the debug level was on
    assert [o.state for o in outcomes] == ["completed", "completed", "completed", "failed", "failed", "failed"]
    assert "found" in everything  # the CLIs did print their answers
    assert password not in everything, "the Redis password was printed"
    assert not leaks, f"selfie base64 printed: {leaks[:3]}"


def test_rediss_url_gives_every_connection_tls() -> None:
    settings = WorkerSettings.from_env({"REDIS_URL": "rediss://:secret@redis.example.com:6380/0"})

    async def connections() -> list[type]:
        from bullmq import Queue, Worker

        async def nothing(job, token):  # type: ignore[no-untyped-def]
            return None

        queue = Queue("q", {"connection": settings.redis_kwargs()})
        worker = Worker("q", nothing, {"connection": settings.redis_kwargs(client_name="bull:x"), "autorun": False})
        from redis.asyncio import Redis

        own = Redis(**settings.redis_kwargs())
        return [queue.client.connection_pool.connection_class, worker.client.connection_pool.connection_class,
                worker.bclient.connection_pool.connection_class, own.connection_pool.connection_class]

    assert asyncio.run(connections()) == [SSLConnection] * 4
