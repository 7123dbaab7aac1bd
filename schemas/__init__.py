"""The contracts of fsw, as typed models with JSON Schema: one source of truth for Python and Node.

Modules: `job` (`FaceSearchJob`, a job's data, and `parse_job`; `SearchResult` of `MatchEntry`, its return
value, written by `dump_result`), `heartbeat` (`Heartbeat`, a worker's record in the `workers` hash, and
the pause key), `connection` (how every fsw process reads the Redis settings from the environment),
`forget` (the portal's `forget-face` job, its result, and the `forgotten_faces` hash), `encode` (the
encode job of `fsw-index build --fleet` on queue `fsw-encode`, and its result).
`fsw-worker schema` prints `json_schemas()`; docs/worker.md describes them. This package imports nothing
of the project.
"""

from __future__ import annotations

from typing import Any

from schemas.heartbeat import (
    ENGINE,
    ONLINE_WINDOW_S,
    WORKERS_HASH,
    Heartbeat,
    WorkerStatus,
    paused_key,
)
from schemas.job import (
    DEFAULT_THRESHOLD,
    JOB_NAME,
    MAX_IMAGE_CHARS,
    MAX_THRESHOLD,
    MIN_THRESHOLD,
    PROGRESS,
    QUEUE,
    FaceSearchJob,
    JobDataError,
    MatchEntry,
    SearchResult,
    dump_result,
    explain,
    parse_job,
    stage_problem,
)

EXCLUDED_SET = "excluded_images"  # Redis set of photo ids the portal has taken down

MODELS = {"job": FaceSearchJob, "result": SearchResult, "heartbeat": Heartbeat}


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema (draft 2020-12) of the job data, the result and the heartbeat record, by name."""
    return {name: model.model_json_schema() for name, model in MODELS.items()}


__all__ = [
    "DEFAULT_THRESHOLD",
    "ENGINE",
    "EXCLUDED_SET",
    "JOB_NAME",
    "MAX_IMAGE_CHARS",
    "MAX_THRESHOLD",
    "MIN_THRESHOLD",
    "MODELS",
    "ONLINE_WINDOW_S",
    "PROGRESS",
    "QUEUE",
    "WORKERS_HASH",
    "FaceSearchJob",
    "Heartbeat",
    "JobDataError",
    "MatchEntry",
    "SearchResult",
    "WorkerStatus",
    "dump_result",
    "explain",
    "json_schemas",
    "parse_job",
    "paused_key",
    "stage_problem",
]
