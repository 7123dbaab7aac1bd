"""The heartbeat record: what each worker writes to the Redis hash `workers` for the admin dashboard.

Every 5 s (`worker.defaults.HEARTBEAT_INTERVAL_S`) a worker runs `HSET workers <id> <json of Heartbeat>`.
The first block of fields is the portal dashboard's (the old Python worker wrote them, the dashboard
reads them); the second is fsw's own. The dashboard calls a worker online when `last_heartbeat` is
under `ONLINE_WINDOW_S` old.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WORKERS_HASH = "workers"
ONLINE_WINDOW_S = 15.0  # the dashboard's rule; a worker beats well inside it
ENGINE = "face_recognition"  # what the dashboard shows; fsw's descriptor engine is in `descriptor_engine`

WorkerStatus = Literal["starting", "online", "busy", "paused", "offline"]


def paused_key(worker_id: str) -> str:
    """The key an operator sets to "1" to pause one worker (it finishes the job in hand first)."""
    return f"worker:{worker_id}:paused"


class Heartbeat(BaseModel):
    """One worker's record in the `workers` hash."""

    model_config = ConfigDict(title="Heartbeat")

    # -- the dashboard's fields ------------------------------------------------------------------
    id: str = Field(description="<hostname>_gpu<N>_fr or <hostname>_cpu0_fr, with _2, _3... when taken.")
    hostname: str
    status: WorkerStatus = Field(description="online (idle), busy (a job in hand), paused, offline, or starting.")
    gpu_index: int | None = Field(description="The GPU this worker runs on; null on the CPU.")
    gpu_name: str | None
    use_cpu: bool = Field(description="True when descriptors are computed on the CPU.")
    concurrency: int
    engine: str = Field(ENGINE, description='Always "face_recognition", as the dashboard expects.')
    start_time: float = Field(description="When the worker started (epoch seconds).")
    uptime: float = Field(description="Seconds since start_time.")
    last_heartbeat: float = Field(description="When this record was written (epoch seconds).")
    jobs_processed: int = Field(description="Jobs completed since start.")
    jobs_failed: int = Field(description="Jobs failed since start.")
    current_job: str | None = Field(description="Id of the job in hand (the oldest, with concurrency > 1).")
    cpu_percent: float = Field(description="Machine CPU use, percent, since the previous heartbeat.")
    ram_percent: float
    ram_available_gb: float
    gpu_utilization: float | None = Field(description="Percent; null without a GPU.")
    gpu_memory_used_mb: float | None
    gpu_temperature: float | None = Field(description="Degrees Celsius.")

    # -- fsw's own ---------------------------------------------------------------------------------
    pid: int
    queue: str
    fsw_version: str
    descriptor_engine: str = Field(description="onnx or dlib.")
    gallery_version: int | None = Field(description="The gallery version serving jobs; null when none is loaded.")
    gallery_photos: int | None
    gallery_faces: int | None
    gallery_error: str | None = Field(description="Why no gallery is loaded, or why the newest failed to load.")
    search_p50_ms: float | None = Field(description="Median gallery search time over recent jobs.")
    job_p50_ms: float | None = Field(description="Median job time (decode, encode, search) over recent jobs.")
    cuda_oom_fallbacks: int = Field(
        0, description="Jobs whose encoding fell back to the CPU after CUDA ran out of memory."
    )
    last_cuda_oom: float | None = Field(None, description="When that last happened (epoch seconds).")
    search_gpu_fallbacks: int = Field(
        0, description="Searches done on the CPU after FAISS on the GPU failed (a CUDA error), or a gallery that "
        "could not be put on the GPU."
    )
