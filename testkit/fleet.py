"""A fleet build in the tests and the bench: encoding fsw-workers, a gate on their photos, galleries compared.

    start_encoder    a real `fsw-worker run` on a search queue and an encode queue; with `gate=`, every
                     photo of an encode job waits at a `testkit.gate.Gate` while it is closed (selfies do
                     not), so a test holds a batch in a worker's hands for as long as it needs
    gallery_faces    a gallery's photos and their faces by photo id: a fleet build is compared with a local one
    leftover_keys    what Redis still holds of an encode queue (SCAN): jobs, results, events with descriptors

`python -m testkit.fleet GATE_FOLDER run [fsw-worker options]` is the gated worker: fsw-worker's own CLI,
settings and process, with the gate installed before each photo of an encode job. With `FAIL_PHOTOS`
(photo ids, comma-separated) in its environment, a job holding one of them fails at that photo, as a
photo that crashes the encoding code would (one that kills the process is BullMQ's stalled check).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from testkit.gate import Gate
from testkit.worker_process import _ENV_PREFIXES, ROOT, START_TIMEOUT_S, WorkerProcess, worker_command

ENCODE_JOB_KEY = "enc-"  # every encode job id starts so (schemas.encode.encode_job_id)
FAIL_PHOTOS = "FSW_TEST_FAIL_PHOTOS"


def start_encoder(redis_url: str, gallery: Path, queue: str, encode_queue: str, workdir: Path, *args: str,
                  gate: Gate | None = None, wait: bool = True, cpus: set[int] | None = None,
                  **env: str) -> WorkerProcess:
    """Start `fsw-worker run *args` serving `queue` and encoding from `encode_queue` (env as an operator sets it).

    The caller's own REDIS_/FSW_/GPU_/WORKER_ variables are left out, as `start_worker` does. `cpus`: the
    cores the process may use (its threads follow: a worker as on a machine of that many cores).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"worker-{encode_queue}-{time.monotonic_ns()}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    full_env.update({"REDIS_URL": redis_url, "FSW_GALLERY": str(gallery), "FSW_QUEUE": queue,
                     "FSW_ENCODE_QUEUE": encode_queue, **env})
    if gate is None:
        command = [*worker_command(), "run", *args]
    else:
        command = [sys.executable, "-m", "testkit.fleet", str(gate.folder), "run", *args]
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=full_env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    worker = WorkerProcess(proc, log, redis_url, queue, gate)
    if wait:
        worker.wait_record(lambda rec: rec["status"] != "starting", timeout=START_TIMEOUT_S)
        worker.wait_log("encoding photos from queue", timeout=START_TIMEOUT_S)
    return worker


def gallery_faces(folder: Path) -> dict[str, list[tuple[tuple[int, ...], np.ndarray]]]:
    """Live photo id -> its faces as (box, descriptor), sorted by box."""
    from matcher.gallery import Gallery

    g = Gallery.open(folder)
    out: dict[str, list[tuple[tuple[int, ...], np.ndarray]]] = {
        str(pid): [] for pid, live in zip(g.photo_ids, g.photo_live, strict=True) if live}
    for row, photo in enumerate(g.face_photo):
        if g.photo_live[photo]:
            out[str(g.photo_ids[photo])].append((tuple(int(x) for x in g.face_boxes[row]), np.array(g.vectors[row])))
    return {pid: sorted(faces, key=lambda f: f[0]) for pid, faces in out.items()}


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest descriptor difference between two `gallery_faces` with the same photos and boxes."""
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    worst = 0.0
    for pid in a:
        assert [box for box, _ in a[pid]] == [box for box, _ in b[pid]], pid
        for (_, x), (_, y) in zip(a[pid], b[pid], strict=True):
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


def leftover_keys(redis_url: str, encode_queue: str, prefix: str = "bull") -> dict[str, str]:
    """Keys of the encode queue that still hold a job or a result, by SCAN: key -> what it holds."""
    found: dict[str, str] = {}
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        for key in r.scan_iter(match=f"{prefix}:{encode_queue}:*", count=500):
            kind = r.type(key)
            if kind == "hash" and key.split(":")[-1].startswith(ENCODE_JOB_KEY):
                found[key] = "a job"
            elif kind == "stream":
                entries = r.xrange(key)
                if any("descriptors" in str(fields) for _, fields in entries):
                    found[key] = f"{len(entries)} events with descriptors"
            elif kind in ("list", "zset"):
                members = r.lrange(key, 0, -1) if kind == "list" else r.zrange(key, 0, -1)
                if any(str(m).startswith(ENCODE_JOB_KEY) for m in members):
                    found[key] = f"job ids: {members[:3]}"
    return found


def _install(gate: Gate) -> None:
    """Every photo of an encode job in this process waits at `gate` first."""
    from worker.encode_jobs import EncodeJobs

    encode_photo = EncodeJobs._encode_photo
    failing = set(filter(None, os.environ.get(FAIL_PHOTOS, "").split(",")))

    def held(self: Any, request: Any, source: Any, photo: Any) -> Any:
        gate.hold()
        if photo.id in failing:
            raise RuntimeError(f"{photo.id} fails every time (testkit.fleet {FAIL_PHOTOS})")
        return encode_photo(self, request, source, photo)

    EncodeJobs._encode_photo = held  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m testkit.fleet GATE_FOLDER run [fsw-worker options]")
    _install(Gate(Path(argv[0])))
    from worker.cli import main as fsw_worker

    fsw_worker(args=argv[1:], prog_name="fsw-worker")


if __name__ == "__main__":
    main(sys.argv[1:])
