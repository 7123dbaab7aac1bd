"""The registry on a real Redis: which id a starting worker takes (the collision rule), and the machine
metrics the record carries, GPU ones included (read through a stand-in NVML, so on any machine), and the
GPU count NVML gives, checked against what `nvidia-smi` lists: on a machine with GPUs as on one without."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from schemas import Heartbeat
from worker.heartbeat import HostMetrics, base_worker_id, claim_worker_id, gpu_count

BASE = "host-a_cpu0_fr"


def record(**changes: Any) -> Heartbeat:
    values: dict[str, Any] = dict(
        id="", hostname="host-a", status="starting", gpu_index=None, gpu_name=None, use_cpu=True, concurrency=1,
        start_time=time.time(), uptime=0.0, last_heartbeat=time.time(), jobs_processed=0, jobs_failed=0,
        current_job=None, cpu_percent=1.0, ram_percent=2.0, ram_available_gb=3.0, gpu_utilization=None,
        gpu_memory_used_mb=None, gpu_temperature=None, pid=1, queue="q", fsw_version="0", descriptor_engine="onnx",
        gallery_version=None, gallery_photos=None, gallery_faces=None, gallery_error=None, search_p50_ms=None,
        job_p50_ms=None,
    )
    return Heartbeat(**{**values, **changes})


def gpus_nvidia_smi_lists() -> int:
    """The GPUs this machine has, as the NVIDIA driver's own tool lists them; 0 without the driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


def with_redis(redis_url: str, body: Callable[[Redis], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        r = Redis.from_url(redis_url, db=3, decode_responses=True)  # away from the live workers' records
        try:
            await r.delete("workers")
            return await body(r)
        finally:
            await r.delete("workers")
            await r.aclose()

    return asyncio.run(go())


def test_base_ids() -> None:
    assert base_worker_id("gpu-box", 3) == "gpu-box_gpu3_fr"
    assert base_worker_id("gpu-box", None) == "gpu-box_cpu0_fr"


@pytest.mark.parametrize(
    "held, expected",
    [
        ({}, BASE),
        ({BASE: {"status": "online", "age": 1}}, f"{BASE}_2"),
        ({BASE: {"status": "busy", "age": 14}}, f"{BASE}_2"),
        ({BASE: {"status": "online", "age": 16}}, BASE),  # its heartbeat is stale: that worker is gone
        ({BASE: {"status": "offline", "age": 1}}, BASE),  # stopped cleanly a second ago
        ({BASE: {"status": "online", "age": 1}, f"{BASE}_2": {"status": "paused", "age": 3}}, f"{BASE}_3"),
        ({BASE: {"status": "online", "age": 1}, f"{BASE}_2": {"status": "offline", "age": 3}}, f"{BASE}_2"),
        ({BASE: {"status": "online", "age": 1, "ms": True}}, f"{BASE}_2"),  # a heartbeat in milliseconds
        ({BASE: "not json"}, BASE),
    ],
)
def test_id_collision_rule(redis_url: str, held: dict[str, Any], expected: str) -> None:
    async def body(r: Redis) -> str:
        now = time.time()
        for wid, rec in held.items():
            if isinstance(rec, str):
                await r.hset("workers", wid, rec)
                continue
            beat = now - rec["age"]
            await r.hset("workers", wid, json.dumps({"id": wid, "status": rec["status"],
                                                     "last_heartbeat": beat * 1000 if rec.get("ms") else beat}))
        claimed = await claim_worker_id(r, BASE, record())
        written = json.loads(await r.hget("workers", claimed))
        assert written["id"] == claimed and written["status"] == "starting"
        return claimed

    assert with_redis(redis_url, body) == expected


def test_workers_starting_together_never_share_an_id(redis_url: str) -> None:
    async def body(r: Redis) -> list[str]:
        return list(await asyncio.gather(*(claim_worker_id(r, BASE, record()) for _ in range(6))))

    ids = with_redis(redis_url, body)
    assert sorted(ids) == sorted([BASE] + [f"{BASE}_{n}" for n in range(2, 7)])


def test_host_metrics_of_a_cpu_worker_have_no_gpu_fields() -> None:
    sample = HostMetrics(None).sample()  # a CPU worker, on a machine with GPUs or without
    assert sample["gpu_name"] is sample["gpu_utilization"] is sample["gpu_memory_used_mb"] is None
    assert sample["gpu_temperature"] is None
    assert 0 <= sample["cpu_percent"] <= 100 and 0 < sample["ram_percent"] < 100 and sample["ram_available_gb"] > 0


def test_gpu_count_is_what_the_machine_has() -> None:
    assert gpu_count() == gpus_nvidia_smi_lists()


def test_host_metrics_read_the_gpu_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Any] = []
    nvml = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: asked.append(i) or f"handle-{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37, memory=12),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30 + 2**19, total=141 * 2**30),
        nvmlDeviceGetTemperature=lambda h, sensor: 54,
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sample = HostMetrics(1).sample()
    assert asked == [1]
    assert (sample["gpu_name"], sample["gpu_utilization"], sample["gpu_memory_used_mb"], sample["gpu_temperature"]) == (
        "NVIDIA H200", 37.0, 3072.5, 54.0)
    assert gpu_count() == 2
