"""`fsw-worker run` end to end: a real worker process, a real Redis, real faces, and two producers, the
Python bullmq Queue and the portal's own client (the official Node.js bullmq) sending the portal's exact jobs.

One worker serves the whole module (started with `--gpus all`, which on this GPU-less machine must
mean one CPU process); the tests that need a worker of their own start it beside that one.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from schemas import Heartbeat
from worker.service import node_client_name

from conftest import NODE_DIR, JobOutcome, Labelled, PhotoTree, WorkerProcess, run_jobs, selfie_job, start_worker

QUEUE = "fsw-e2e"
BASE_ID = f"{socket.gethostname()}_cpu0_fr"


@pytest.fixture(scope="module")
def worker(redis_url: str, built_gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = start_worker(redis_url, built_gallery, QUEUE, tmp_path_factory.mktemp("worker"), "--gpus", "all")
    yield proc
    proc.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def people_in_gallery(labels: list[Labelled]) -> set[str]:
    return {p for x in labels if x.split == "gallery" for p in x.people} - {"none", "unknown"}


def wait_state(redis_url: str, queue: str, job_id: str, states: set[str], timeout: float = 30) -> str:
    import asyncio

    from bullmq import Queue

    async def go() -> str:
        q = Queue(queue, {"connection": redis_url})
        try:
            deadline = time.monotonic() + timeout
            state = ""
            while time.monotonic() < deadline:
                state = await q.getJobState(job_id)
                if state in states:
                    return state
                await asyncio.sleep(0.02)
            return state
        finally:
            await q.close()

    return asyncio.run(go())


# -- answers ------------------------------------------------------------------------------------------


def test_every_labelled_query_gets_only_photos_of_its_person(
    worker: WorkerProcess, redis_url: str, labels: list[Labelled], photo_tree: PhotoTree,
) -> None:
    queries = photo_tree.queries
    outcomes = run_jobs(redis_url, QUEUE, [selfie_job(q.path) for q in queries])
    known = people_in_gallery(labels)
    found: dict[str, set[str]] = {}
    for q, outcome in zip(queries, outcomes, strict=True):
        (person,) = q.people
        if person == "none":
            assert outcome.state == "failed" and outcome.failed_reason.startswith("no face found in the selfie")
            continue
        ids = outcome.photo_ids
        if person in known:
            assert set(ids) <= photo_tree.photos_of(person), f"{q.file} ({person}) got {ids}"
            found.setdefault(person, set()).update(ids)
        else:
            assert ids == [], f"{q.file}: {person} is not in the gallery but got {ids}"
        sims = [entry["similarity"] for entry in outcome.returnvalue]
        assert sims == sorted(sims, reverse=True) and all(s > 0.5 for s in sims)
    for person in ("obama", "biden", "leonard"):
        assert found.get(person), f"no photo of {person} found"


def test_strangers_get_no_photos(worker: WorkerProcess, redis_url: str, labels: list[Labelled]) -> None:
    strangers = [x for x in labels if x.split == "query" and not x.people & (people_in_gallery(labels) | {"none"})]
    assert {p for x in strangers for p in x.people} >= {"tom_hanks", "carell", "paul_rudd", "adams"}
    for outcome in run_jobs(redis_url, QUEUE, [selfie_job(x.path) for x in strangers]):
        assert outcome.photo_ids == []


def test_stage_covers_only_photos_under_it(worker: WorkerProcess, redis_url: str, labels: list[Labelled]) -> None:
    obama = [x for x in labels if x.split == "query" and x.people == {"obama"}][0].path
    everywhere, evening = run_jobs(redis_url, QUEUE, [selfie_job(obama), selfie_job(obama, stage="Day-2/Evening")])
    assert evening.photo_ids == [i for i in everywhere.photo_ids if i.startswith("Day-2/Evening/")]
    assert len(evening.photo_ids) < len(everywhere.photo_ids)


def test_excluded_images_are_left_out(worker: WorkerProcess, redis_url: str, r: redis.Redis,
                                      labels: list[Labelled]) -> None:
    obama = [x for x in labels if x.split == "query" and x.people == {"obama"}][1].path
    (before,) = run_jobs(redis_url, QUEUE, [selfie_job(obama)])
    assert len(before.photo_ids) >= 2
    r.sadd("excluded_images", before.photo_ids[0])
    try:
        (after,) = run_jobs(redis_url, QUEUE, [selfie_job(obama)])
    finally:
        r.delete("excluded_images")
    assert after.photo_ids == before.photo_ids[1:]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions (a decompression bomb's header) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _one_pixel_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG")
    return out.getvalue()


BAD_JOBS = [
    ({"uid": "u", "stage": "", "timestamp": 1}, "image is missing"),
    ({"image": "", "stage": ""}, "image is empty"),
    ({"image": 12345}, "image must be text"),
    ({"image": "data:image/jpeg;base64,@@not*base64@@"}, "image is not valid base64"),
    ({"image": _data_url(b"plain text, not a picture at all", "jpeg")}, "not an image (unrecognised content)"),
    ({"image": _data_url(_png_header(100_000, 100_000))}, "image too large: 100000x100000 pixels"),
    ({"image": _data_url(_one_pixel_png())}, "image too small: 1x1 pixels"),
    ({"image": "data:image/jpeg;base64," + "A" * (21 * 2**20)}, "image is too large: 21.0 MB of base64"),
    ({"image": _data_url(_one_pixel_png()), "stage": "Day-1/../../etc"}, "must be a folder inside the gallery"),
    ({"image": _data_url(_one_pixel_png()), "stage": "/etc"}, "must be a folder inside the gallery"),
    ({"image": _data_url(_one_pixel_png()), "stage": "Day-7"}, "unknown stage 'Day-7'"),
]


def test_bad_jobs_fail_with_their_message_and_the_worker_goes_on(
    worker: WorkerProcess, redis_url: str, faces_dir: Path
) -> None:
    failed_before = worker.record()["jobs_failed"]
    good = selfie_job(faces_dir / "queries" / "q01.jpg")
    outcomes = run_jobs(redis_url, QUEUE, [data for data, _ in BAD_JOBS] + [good])
    for (_, message), outcome in zip(BAD_JOBS, outcomes, strict=False):
        assert outcome.state == "failed", f"expected failure '{message}', got {outcome}"
        assert message in outcome.failed_reason
        assert "AAAAAAAAAAAAAAAA" not in outcome.failed_reason  # never the payload
    assert outcomes[-1].photo_ids  # biden: the next good job is answered
    record = worker.wait_record(lambda rec: rec["jobs_failed"] >= failed_before + len(BAD_JOBS), timeout=10)
    assert record["status"] in ("online", "busy")
    assert "AAAAAAAAAAAAAAAA" not in worker.log_text()


# -- the portal's own client --------------------------------------------------------------------------


def test_node_portal_client_gets_results_progress_failures_and_sees_the_worker(
    worker: WorkerProcess, redis_url: str, faces_dir: Path, photo_tree: PhotoTree, tmp_path: Path,
) -> None:
    if not (NODE_DIR / "node_modules" / "bullmq").is_dir():
        pytest.fail(f"the Node client is not installed: run `make install` (npm ci in {NODE_DIR})")
    schema_file = tmp_path / "schemas.json"
    printed = subprocess.run([str(Path(worker.proc.args[0])), "schema"], capture_output=True, check=True, text=True)
    schema_file.write_text(printed.stdout)
    queries = faces_dir / "queries"
    command = ["node", "portal.mjs", "--redis", redis_url, "--queue", QUEUE, "--workers", "--schemas", str(schema_file),
               "--selfie", str(queries / "q04.jpg"), "--selfie", str(queries / "q06.jpg"),
               "--selfie", str(queries / "q09.jpg")]
    done = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    obama, no_face, stranger, workers, checked = lines

    assert obama["state"] == "completed"
    ids = [entry["id"] for entry in obama["returnvalue"]]
    assert ids and set(ids) <= photo_tree.photos_of("obama")
    assert obama["progress"] == [25, 50, 75, 100]
    assert no_face["state"] == "failed" and no_face["failedReason"].startswith("no face found in the selfie")
    assert stranger["state"] == "completed" and stranger["returnvalue"] == []
    assert node_client_name("bull", QUEUE, worker.id) in workers["workers"]
    assert checked["schema_errors"] == []


# -- the heartbeat -------------------------------------------------------------------------------------


def test_heartbeat_record_has_the_dashboards_fields_with_real_values(
    worker: WorkerProcess, built_gallery: Path, redis_url: str, faces_dir: Path,
) -> None:
    from matcher.layout import manifest_version

    (job,) = run_jobs(redis_url, QUEUE, [selfie_job(faces_dir / "queries" / "q01.jpg")])
    assert job.state == "completed"
    # a record written while the job was in hand stays until the next 5 s beat: wait for an idle one
    record = worker.wait_record(lambda rec: rec["jobs_processed"] > 0 and rec["current_job"] is None, timeout=12)
    Heartbeat.model_validate(record)
    assert record["id"] == BASE_ID  # --gpus all without a GPU: one CPU process
    assert (record["hostname"], record["engine"]) == (socket.gethostname(), "face_recognition")
    assert record["concurrency"] == 1
    assert record["use_cpu"] is True
    assert record["gpu_index"] is record["gpu_name"] is record["gpu_utilization"] is None
    assert record["gpu_memory_used_mb"] is record["gpu_temperature"] is None
    assert 0 <= record["cpu_percent"] <= 100 and 0 < record["ram_percent"] < 100 and record["ram_available_gb"] > 0
    assert abs(record["last_heartbeat"] - time.time()) < 10
    assert record["uptime"] == pytest.approx(record["last_heartbeat"] - record["start_time"], abs=0.2)
    assert record["gallery_version"] == manifest_version(built_gallery)
    assert (record["gallery_photos"], record["gallery_faces"]) == (19, 40)
    assert record["search_p50_ms"] > 0 and record["job_p50_ms"] > record["search_p50_ms"]
    assert record["queue"] == QUEUE and record["current_job"] is None


def test_heartbeat_is_written_every_5_seconds(worker: WorkerProcess) -> None:
    beats: list[float] = []
    deadline = time.monotonic() + 16
    while len(beats) < 3 and time.monotonic() < deadline:
        beat = worker.record()["last_heartbeat"]
        if not beats or beat != beats[-1]:
            beats.append(beat)
        time.sleep(0.1)
    assert len(beats) == 3, f"heartbeats seen: {beats}"
    for earlier, later in zip(beats, beats[1:], strict=False):
        assert 4.5 <= later - earlier <= 6.0


# -- pause, a second worker, SIGTERM ------------------------------------------------------------------


def test_pause_takes_no_new_job_finishes_the_one_in_hand_and_resume_serves_again(
    worker: WorkerProcess, redis_url: str, r: redis.Redis, slow_selfie: Path, faces_dir: Path,
) -> None:
    key = f"worker:{worker.id}:paused"
    (in_hand,) = run_jobs(redis_url, QUEUE, [selfie_job(slow_selfie)], wait=False)
    assert wait_state(redis_url, QUEUE, in_hand.id, {"active"}) == "active"
    r.set(key, "1")
    try:
        worker.wait_record(lambda rec: rec["status"] == "paused", timeout=5)
        assert wait_state(redis_url, QUEUE, in_hand.id, {"completed", "failed"}) == "completed"
        (waiting,) = run_jobs(redis_url, QUEUE, [selfie_job(faces_dir / "queries" / "q01.jpg")], wait=False)
        time.sleep(3)
        assert wait_state(redis_url, QUEUE, waiting.id, {"active", "completed", "failed"}, timeout=0.1) == "waiting"
        assert worker.record()["status"] == "paused"
    finally:
        r.delete(key)
    assert wait_state(redis_url, QUEUE, waiting.id, {"completed", "failed"}, timeout=15) == "completed"
    worker.wait_record(lambda rec: rec["status"] == "online", timeout=5)


def test_second_worker_takes_the_next_id_runs_jobs_side_by_side_and_sigterm_finishes_them(
    worker: WorkerProcess, redis_url: str, built_gallery: Path, tmp_path: Path, slow_selfie: Path,
    photo_tree: PhotoTree,
) -> None:
    assert worker.id == BASE_ID
    queue = "fsw-e2e-second"
    second = start_worker(redis_url, built_gallery, queue, tmp_path, WORKER_CONCURRENCY="2")
    assert second.id == f"{BASE_ID}_2"  # the first is live, so the next free suffix
    assert second.record()["concurrency"] == 2

    jobs = run_jobs(redis_url, queue, [selfie_job(slow_selfie), selfie_job(slow_selfie)], wait=False)
    deadline = time.monotonic() + 20
    while [wait_state(redis_url, queue, j.id, {"active"}, timeout=0.01) for j in jobs] != ["active", "active"]:
        assert time.monotonic() < deadline, "with --concurrency 2 both jobs should be in hand at once"
    assert second.stop(timeout=60) == 0  # SIGTERM with both jobs in hand
    for job in jobs:
        (outcome,) = run_jobs_state(redis_url, queue, job.id)
        assert outcome.state == "completed" and set(outcome.photo_ids) <= photo_tree.photos_of("obama")
    assert second.record()["status"] == "offline"
    assert second.record()["jobs_processed"] == 2

    again = start_worker(redis_url, built_gallery, queue, tmp_path)  # a restart keeps its id
    try:
        assert again.id == f"{BASE_ID}_2"
    finally:
        assert again.stop() == 0


def run_jobs_state(redis_url: str, queue: str, job_id: str) -> list[JobOutcome]:
    import asyncio

    from bullmq import Job, Queue

    async def go() -> list[JobOutcome]:
        q = Queue(queue, {"connection": redis_url})
        try:
            job = await Job.fromId(q, job_id)
            return [JobOutcome(job_id, await q.getJobState(job_id), job.returnvalue, job.failedReason or None)]
        finally:
            await q.close()

    return asyncio.run(go())


def test_fsw_worker_submit_prints_the_result_or_the_reason(
    worker: WorkerProcess, redis_url: str, faces_dir: Path, photo_tree: PhotoTree, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from worker.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("FSW_QUEUE", QUEUE)
    found = CliRunner().invoke(main, ["submit", str(faces_dir / "queries" / "q04.jpg"), "--stage", "Day-1/Morning"])
    assert found.exit_code == 0, found.output
    result = json.loads(found.stdout)
    assert result and all(e["id"].startswith("Day-1/Morning/") and "obama" in photo_tree.people[e["id"]]
                          for e in result)
    no_face = CliRunner().invoke(main, ["submit", str(faces_dir / "queries" / "q15.jpg")])
    assert no_face.exit_code == 1
    assert "failed: no face found in the selfie" in no_face.output
