"""A real `fsw-worker run` process, configured by its environment as an operator would, and its record.

`start_worker` starts one on a queue and a gallery and (by default) returns once its heartbeat record
says it serves; `WorkerProcess` reads that record, waits for it to show something, and stops the
process with SIGTERM as a service manager would. With `gate=`, the worker's engine waits at a
`testkit.gate.Gate`, so a test can keep a job in its hands for as long as it needs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from testkit.gate import Gate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's scripts: fsw-worker, fsw-index
START_TIMEOUT_S = 90.0  # loading the models and the gallery on a busy 2-core machine
_ENV_PREFIXES = ("REDIS_", "FSW_", "GPU_", "WORKER_")  # the worker's settings: only what the caller gives


def worker_command() -> list[str]:
    """How to run fsw-worker from this environment."""
    script = BIN / "fsw-worker"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "worker"]


@dataclass
class WorkerProcess:
    """A running `fsw-worker run` and what it writes to the `workers` hash."""

    proc: subprocess.Popen[bytes]
    log: Path
    redis_url: str
    queue: str
    gate: Gate | None = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)

    def record(self) -> dict[str, Any] | None:
        """This process's heartbeat record (found by pid), or None."""
        try:
            with self.client() as r:
                records = [json.loads(v) for v in r.hgetall("workers").values()]  # type: ignore[union-attr]
        except Exception:
            return None
        mine = [x for x in records if x.get("pid") == self.proc.pid]
        return max(mine, key=lambda x: x.get("last_heartbeat", 0)) if mine else None

    def wait_record(self, check: Callable[[dict[str, Any]], bool] = lambda rec: True,
                    timeout: float = 60) -> dict[str, Any]:
        """The first record that passes `check`; AssertionError if the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fsw-worker exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            rec = self.record()
            if rec is not None and check(rec):
                return rec
            time.sleep(0.1)
        raise AssertionError(
            f"no matching heartbeat record within {timeout} s; last: {self.record()}\n{self.log_text()[-3000:]}"
        )

    @property
    def id(self) -> str:
        return str(self.wait_record(lambda rec: rec["status"] != "starting")["id"])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, text: str, timeout: float = 30) -> None:
        """Return once the worker's output holds `text`; AssertionError if it exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fsw-worker did not print {text!r}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def signal_stop(self) -> None:
        """SIGTERM once: the worker takes no new job and finishes the ones in hand (a second would abandon them)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 60) -> int:
        """The exit code; if the process still runs after `timeout`, it is killed and AssertionError raised."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"fsw-worker still running {timeout} s after SIGTERM:\n{self.log_text()[-3000:]}"
            ) from None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (its gate opened first, so no held job keeps it), then its exit code."""
        if self.gate is not None:
            self.gate.open()
        self.signal_stop()
        return self.wait_stopped(timeout)


def start_worker(redis_url: str, gallery: Path, queue: str, workdir: Path, *args: str, wait: bool = True,
                 gate: Gate | None = None, **env: str) -> WorkerProcess:
    """Start `fsw-worker run *args` with REDIS_URL, FSW_GALLERY and FSW_QUEUE (and `env`) in its environment.

    The caller's own REDIS_/FSW_/GPU_/WORKER_ variables are left out, so only what is given configures it;
    `env` may replace REDIS_URL (e.g. with REDIS_HOST, REDIS_PORT, REDIS_PASSWORD). With `wait`, returns
    once the heartbeat record says it has started.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"worker-{queue}-{time.monotonic_ns()}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    full_env.update({"REDIS_URL": redis_url, "FSW_GALLERY": str(gallery), "FSW_QUEUE": queue})
    full_env.update(env)
    if gate is None:
        command = [*worker_command(), "run", *args]
    else:
        command = [sys.executable, "-m", "testkit.gated_worker", str(gate.folder), "run", *args]
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=full_env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    worker = WorkerProcess(proc, log, redis_url, queue, gate)
    if wait:
        worker.wait_record(lambda rec: rec["status"] != "starting", timeout=START_TIMEOUT_S)
    return worker
