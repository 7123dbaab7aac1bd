"""GPUs to worker processes: which devices a `fsw-worker run` serves, and one process per GPU.

`plan_devices("all", gpu_count())` lists the GPU indices to serve ([None] means one CPU process).
With one device the worker runs in the calling process; with several, `Supervisor` starts one child
process per GPU (its own worker id, `GPU_INDEX` and `CUDA_VISIBLE_DEVICES` set), passes SIGTERM/SIGINT
on, restarts a child that dies on its own (after a pause that grows with repeated failures), and exits 0
when every child stopped cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from worker.defaults import RESTART_DELAY_S

log = logging.getLogger("fsw.worker")


class DeviceError(ValueError):
    """A --gpus value that names no usable device."""


def plan_devices(spec: str | None, gpu_count: int, env_gpu_index: int | None = None) -> list[int | None]:
    """The devices to serve, one worker process each; None is the CPU.

    spec: 'all' (every GPU, or the CPU on a machine without one), 'cpu', a list like '0,2', or None
    (GPU_INDEX when set, else the CPU).
    """
    if spec is None or spec.strip() == "":
        return [env_gpu_index]
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(gpu_count)) or [None]
    if spec in ("cpu", "none"):
        return [None]
    try:
        wanted = [int(part) for part in spec.split(",")]
    except ValueError:
        raise DeviceError(f"--gpus must be 'all', 'cpu' or GPU numbers like '0,1', not {spec!r}") from None
    missing = [i for i in wanted if not 0 <= i < gpu_count]
    if missing:
        seen = f"GPUs 0 to {gpu_count - 1}" if gpu_count else "no GPU"
        raise DeviceError(f"--gpus names GPU {', '.join(map(str, missing))}, but NVML sees {seen}")
    return list(dict.fromkeys(wanted))


def child_env(base: Mapping[str, str], gpu_index: int) -> dict[str, str]:
    """A child's environment: its GPU, and only that GPU visible to CUDA (as device 0)."""
    return {**base, "GPU_INDEX": str(gpu_index), "CUDA_VISIBLE_DEVICES": str(gpu_index)}


class Supervisor:
    """One child process per GPU; `run()` blocks until all have stopped and returns the exit code."""

    def __init__(
        self,
        gpus: Sequence[int],
        command: Callable[[int], list[str]],
        env: Mapping[str, str] | None = None,
        poll_s: float = 0.5,
    ):
        self.gpus = list(gpus)
        self.command = command
        self.env = dict(os.environ if env is None else env)
        self.poll_s = poll_s
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._failures: dict[int, int] = {}
        self._restart_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._signal: int = signal.SIGTERM

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Pass the signal to every child and wait for them to finish their jobs."""
        self._signal = signum
        self._stop.set()
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        for gpu in self.gpus:
            self._start(gpu)
        while not self._stop.is_set():
            for gpu, child in list(self.children.items()):
                code = child.poll()
                if code is None or self._stop.is_set():
                    continue
                if gpu not in self._restart_at:
                    self._failures[gpu] = self._failures.get(gpu, 0) + 1
                    delay = min(RESTART_DELAY_S[0] * 2 ** (self._failures[gpu] - 1), RESTART_DELAY_S[1])
                    log.warning("worker for GPU %s exited with %s: restarting in %.0f s", gpu, code, delay)
                    self._restart_at[gpu] = time.monotonic() + delay
                elif time.monotonic() >= self._restart_at[gpu]:
                    del self._restart_at[gpu]
                    self._start(gpu)
            self._stop.wait(self.poll_s)
        codes = []
        for child in self.children.values():
            try:
                codes.append(child.wait(timeout=300))
            except subprocess.TimeoutExpired:
                child.kill()
                codes.append(child.wait())
        return 0 if all(code == 0 for code in codes) else 1

    def _start(self, gpu: int) -> None:
        self.children[gpu] = subprocess.Popen(self.command(gpu), env=child_env(self.env, gpu))
        log.info("started worker process %d for GPU %d", self.children[gpu].pid, gpu)


def worker_command(gpu: int, passthrough: Sequence[str]) -> list[str]:
    """The command line of a child worker for one GPU."""
    return [sys.executable, "-m", "worker", "run", "--gpus", str(gpu), *passthrough]
