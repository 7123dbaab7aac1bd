"""The worker registry the portal's dashboard reads: the worker's id, its record, the machine's metrics.

- `base_worker_id`: `<hostname>_gpu<N>_fr` on a GPU, `<hostname>_cpu0_fr` on the CPU, stable across
  restarts. `claim_worker_id` takes it, or the first free `_2`, `_3`... when another live worker
  (heartbeat under 15 s old, status not offline) holds it; the check and the first record are one
  Lua script, so two workers starting at once never take the same id.
- `HostMetrics.sample()`: CPU and RAM from psutil, GPU utilisation, memory and temperature from NVML
  (`pynvml`); the GPU fields are None on a machine without one.
- `write_heartbeat`: `HSET workers <id> <Heartbeat JSON>`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psutil
from redis.asyncio import Redis

from schemas import ONLINE_WINDOW_S, WORKERS_HASH, Heartbeat
from worker.defaults import MAX_ID_SUFFIX

log = logging.getLogger("fsw.worker")
_ID_MARK = "__FSW_WORKER_ID__"

# KEYS[1]: the workers hash. ARGV: now (s), online window (s), the record with _ID_MARK for its id,
# then the candidate ids in order. Writes the record under the first free id and returns that id.
_CLAIM = """
local now, window, record = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i = 4, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], id)
  local live = false
  if raw then
    local ok, rec = pcall(cjson.decode, raw)
    if ok and type(rec) == 'table' then
      local beat = tonumber(rec['last_heartbeat'])
      if beat and beat > 1e11 then beat = beat / 1000 end
      live = rec['status'] ~= 'offline' and beat ~= nil and now - beat < window
    end
  end
  if not live then
    local text = string.gsub(record, '__FSW_WORKER_ID__', (string.gsub(id, '%%', '%%%%')))
    redis.call('HSET', KEYS[1], id, text)
    return id
  end
end
return false
"""


class WorkerIdError(RuntimeError):
    """Every id from the base to its last suffix is held by a live worker."""


def base_worker_id(hostname: str, gpu_index: int | None) -> str:
    """The worker's stable id before any collision suffix."""
    return f"{hostname}_gpu{gpu_index}_fr" if gpu_index is not None else f"{hostname}_cpu0_fr"


def candidate_ids(base: str, count: int = MAX_ID_SUFFIX) -> list[str]:
    return [base] + [f"{base}_{n}" for n in range(2, count + 1)]


async def claim_worker_id(redis: Redis, base: str, record: Heartbeat, now: float | None = None) -> str:
    """Take the first id not held by a live worker, writing `record` (its id replaced) under it."""
    template = record.model_copy(update={"id": _ID_MARK}).model_dump_json()
    now = time.time() if now is None else now
    claimed = await redis.eval(  # type: ignore[misc]
        _CLAIM, 1, WORKERS_HASH, str(now), str(ONLINE_WINDOW_S), template, *candidate_ids(base)
    )
    if not claimed:
        raise WorkerIdError(f"{MAX_ID_SUFFIX} live workers already hold {base} and its suffixes in '{WORKERS_HASH}'")
    return claimed.decode() if isinstance(claimed, bytes) else str(claimed)


async def write_heartbeat(redis: Redis, record: Heartbeat) -> None:
    await redis.hset(WORKERS_HASH, record.id, record.model_dump_json())  # type: ignore[misc]


def gpu_count() -> int:
    """GPUs NVML sees; 0 without a driver or GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


class HostMetrics:
    """The machine's CPU, RAM and (for `gpu_index`) GPU readings, as the heartbeat's fields."""

    def __init__(self, gpu_index: int | None):
        self.gpu_index = gpu_index
        self.gpu_name: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        psutil.cpu_percent(interval=None)  # the first reading starts the interval; it is meaningless
        if gpu_index is not None:
            self._open_gpu(gpu_index)

    def _open_gpu(self, index: int) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
            self._nvml = pynvml
        except Exception as e:
            log.warning("GPU %s metrics unavailable (NVML: %s); GPU fields will be null", index, e)
            self._handle = None

    def sample(self) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        out: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "ram_percent": memory.percent,
            "ram_available_gb": round(memory.available / 2**30, 2),
            "gpu_name": self.gpu_name,
            "gpu_utilization": None,
            "gpu_memory_used_mb": None,
            "gpu_temperature": None,
        }
        if self._handle is not None:
            nv = self._nvml
            try:
                out["gpu_utilization"] = float(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu)
                out["gpu_memory_used_mb"] = round(nv.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20, 1)
                out["gpu_temperature"] = float(nv.nvmlDeviceGetTemperature(self._handle, nv.NVML_TEMPERATURE_GPU))
            except Exception as e:  # a reading can fail transiently; the next heartbeat tries again
                log.debug("NVML reading failed: %s", e)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None
