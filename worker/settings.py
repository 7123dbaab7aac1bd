"""The worker's configuration: one typed object, read once at the edge from the environment.

Variables (a `.env` file in the working directory is read first by the CLI, without overriding the
environment): `REDIS_URL` (redis:// or rediss:// for TLS), or `REDIS_HOST`, `REDIS_PORT`,
`REDIS_PASSWORD`; `FSW_QUEUE` (default face-search), `FSW_GALLERY` (default ./gallery),
`WORKER_CONCURRENCY` (default 1), `GPU_INDEX` (unset: the CPU, or the GPU `--gpus` names),
`FSW_CACHE_DIR` (converted ONNX models; default ~/.cache/fsw), `FSW_KEEP_SELFIES` (1: leave each job's
selfie in Redis, for debugging; default 0). Defaults: `worker.defaults`, `matcher.defaults`.
Encode jobs for `fsw-index --fleet` (`worker.encode_jobs`): `FSW_PHOTOS` (where this machine sees the
photo tree: a folder or an http(s) base URL; default: the indexer's photo root), `FSW_ENCODE_QUEUE`
(default fsw-encode), `FSW_ENCODE_CONCURRENCY` (encode jobs at once, default 1; 0: never encode).
The Redis variables are read by `schemas.connection`, which `fsw-index --fleet` shares. The Redis
password never appears in `repr` or in a log line: use `redis_display`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from matcher.defaults import DEFAULT_GALLERY
from schemas import QUEUE
from schemas.connection import DEFAULT_REDIS_URL, SettingsError, redis_display, redis_kwargs, redis_url
from schemas.encode import ENCODE_QUEUE
from worker.defaults import DEFAULT_CONCURRENCY, DEFAULT_ENCODE_CONCURRENCY, MAX_CONCURRENCY

__all__ = ["SettingsError", "WorkerSettings"]  # SettingsError lives with the Redis variables fsw-index reads too


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs to know about its surroundings."""

    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    queue: str = QUEUE
    gallery: Path = DEFAULT_GALLERY
    concurrency: int = DEFAULT_CONCURRENCY
    gpu_index: int | None = None
    cache_dir: Path | None = None  # converted ONNX models; None: matcher.defaults.CACHE_DIR
    hostname: str = field(default_factory=socket.gethostname)
    prefix: str = "bull"  # BullMQ's key prefix; the portal uses the default
    encode_queue: str = ENCODE_QUEUE  # fsw-index --fleet's encode jobs
    encode_concurrency: int = DEFAULT_ENCODE_CONCURRENCY  # encode jobs at once; 0: this worker never encodes
    photos: str | None = None  # where this worker reads photos to encode; None: the photo root a job names
    keep_selfies: bool = False  # leave each job's selfie in Redis (debugging only; see worker.selfies)

    def __post_init__(self) -> None:
        if not self.queue:
            raise SettingsError("FSW_QUEUE is empty: name the BullMQ queue (the portal's is face-search)")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise SettingsError(f"WORKER_CONCURRENCY must be 1 to {MAX_CONCURRENCY}, not {self.concurrency}")
        if self.gpu_index is not None and self.gpu_index < 0:
            raise SettingsError(f"GPU_INDEX must be 0 or more, not {self.gpu_index}")
        if not 0 <= self.encode_concurrency <= MAX_CONCURRENCY:
            raise SettingsError(f"FSW_ENCODE_CONCURRENCY must be 0 (never encode) to {MAX_CONCURRENCY}, "
                                f"not {self.encode_concurrency}")
        if self.encode_concurrency and self.encode_queue in ("", self.queue):
            raise SettingsError(f"FSW_ENCODE_QUEUE must name a queue of its own, not {self.encode_queue!r}: "
                                "a selfie must never wait behind a batch of photos")
        try:
            self.redis_kwargs()
        except ValueError as e:
            raise SettingsError(f"REDIS_URL {self.redis_display} is not usable: {e}") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from environment variables, then `overrides` (command-line flags) where not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {"redis_url": redis_url(env)}
        if env.get("FSW_QUEUE"):
            values["queue"] = env["FSW_QUEUE"]
        if env.get("FSW_GALLERY"):
            values["gallery"] = Path(env["FSW_GALLERY"])
        if env.get("WORKER_CONCURRENCY"):
            values["concurrency"] = _int(env, "WORKER_CONCURRENCY")
        if env.get("GPU_INDEX", "").strip():
            values["gpu_index"] = _int(env, "GPU_INDEX")
        if env.get("FSW_CACHE_DIR"):
            values["cache_dir"] = Path(env["FSW_CACHE_DIR"])
        if env.get("FSW_ENCODE_QUEUE"):
            values["encode_queue"] = env["FSW_ENCODE_QUEUE"]
        if env.get("FSW_ENCODE_CONCURRENCY", "").strip():
            values["encode_concurrency"] = _int(env, "FSW_ENCODE_CONCURRENCY")
        if env.get("FSW_PHOTOS", "").strip():
            values["photos"] = env["FSW_PHOTOS"].strip()
        if env.get("FSW_KEEP_SELFIES", "").strip():
            values["keep_selfies"] = _flag(env, "FSW_KEEP_SELFIES")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_gpu(self, gpu_index: int | None) -> WorkerSettings:
        return replace(self, gpu_index=gpu_index)

    @property
    def redis_display(self) -> str:
        """The Redis URL with any password masked: the only form that may be logged."""
        return redis_display(self.redis_url)

    def redis_kwargs(self, client_name: str | None = None) -> dict[str, Any]:
        """Keyword arguments for `redis.asyncio.Redis` (host, port, password, TLS...).

        `client_name` is set on every connection made with them, reconnections included.
        """
        return redis_kwargs(self.redis_url, client_name)

    def __repr__(self) -> str:
        return (
            f"WorkerSettings(redis={self.redis_display!r}, queue={self.queue!r}, gallery={str(self.gallery)!r}, "
            f"concurrency={self.concurrency}, gpu_index={self.gpu_index}, hostname={self.hostname!r}, "
            f"keep_selfies={self.keep_selfies})"
        )


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env[name].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 1 or 0, not {env[name]!r}")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name].strip())
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, not {env[name]!r}") from None
