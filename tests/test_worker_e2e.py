"""`fsw-worker run` end to end: a real worker process, a real Redis, real faces, and two producers, the
Python bullmq Queue and the portal's own client (the official Node.js bullmq) sending the portal's exact jobs.

One CPU worker serves the whole module (`--gpus cpu`: the same worker on a machine with GPUs or
without); the tests that need a worker of their own start it beside that one, `--gpus all` among them,
checked against the GPUs the machine has. A test that needs a job in a worker's hands holds it at the
worker's gate (`testkit.gate`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from indexer.labels import Label
from matcher.gallery import Gallery
from schemas import Heartbeat
from schemas.job import data_url
from testkit.gate import Gate
from testkit.images import encoded, png_bomb
from testkit.jobs import NODE_CLIENT, run_jobs, selfie_job, wait_jobs, wait_state
from testkit.photos import PhotoTree
from testkit.worker_process import START_TIMEOUT_S, WorkerProcess, start_worker, worker_command
from worker.defaults import HEARTBEAT_INTERVAL_S
from worker.heartbeat import base_worker_id, gpu_count
from worker.service import node_client_name

QUEUE = "fsw-e2e"
BASE_ID = f"{socket.gethostname()}_cpu0_fr"


@pytest.fixture(scope="module")
def worker(redis_url: str, built_gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    gate = Gate(tmp_path_factory.mktemp("gate"))
    proc = start_worker(redis_url, built_gallery, QUEUE, tmp_path_factory.mktemp("worker"), "--gpus", "cpu", gate=gate)
    yield proc
    proc.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def people_in_gallery(labels: list[Label]) -> set[str]:
    return {p for x in labels if x.split == "gallery" for p in x.people} - {"none", "unknown"}


# -- answers ------------------------------------------------------------------------------------------


def test_every_labelled_query_gets_only_photos_of_its_person(
    worker: WorkerProcess, redis_url: str, labels: list[Label], photo_tree: PhotoTree,
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


def test_strangers_get_no_photos(worker: WorkerProcess, redis_url: str, labels: list[Label]) -> None:
    strangers = [x for x in labels if x.split == "query" and not x.people & (people_in_gallery(labels) | {"none"})]
    assert {p for x in strangers for p in x.people} >= {"carell", "paul_rudd", "adams"}
    for outcome in run_jobs(redis_url, QUEUE, [selfie_job(x.path) for x in strangers]):
        assert outcome.photo_ids == []


def test_stage_covers_only_photos_under_it(worker: WorkerProcess, redis_url: str, labels: list[Label]) -> None:
    obama = [x for x in labels if x.split == "query" and x.people == {"obama"}][0].path
    everywhere, evening = run_jobs(redis_url, QUEUE, [selfie_job(obama), selfie_job(obama, stage="Day-2/Evening")])
    assert evening.photo_ids == [i for i in everywhere.photo_ids if i.startswith("Day-2/Evening/")]
    assert len(evening.photo_ids) < len(everywhere.photo_ids)


def test_excluded_images_are_left_out(worker: WorkerProcess, redis_url: str, r: redis.Redis,
                                      labels: list[Label]) -> None:
    obama = [x for x in labels if x.split == "query" and x.people == {"obama"}][1].path
    (before,) = run_jobs(redis_url, QUEUE, [selfie_job(obama)])
    assert len(before.photo_ids) >= 2
    r.sadd("excluded_images", before.photo_ids[0])
    try:
        (after,) = run_jobs(redis_url, QUEUE, [selfie_job(obama)])
    finally:
        r.delete("excluded_images")
    assert after.photo_ids == before.photo_ids[1:]


def _png(data: bytes) -> str:
    return data_url(data, "image/png")


ONE_PIXEL = encoded(Image.new("RGB", (1, 1)))


BAD_JOBS = [
    ({"uid": "u", "stage": "", "timestamp": 1}, "image is missing"),
    ({"image": "", "stage": ""}, "image is empty"),
    ({"image": 12345}, "image must be text"),
    ({"image": "data:image/jpeg;base64,@@not*base64@@"}, "image is not valid base64"),
    ({"image": data_url(b"plain text, not a picture at all")}, "not an image (unrecognised content)"),
    ({"image": _png(png_bomb(100_000, 100_000))}, "image too large: 100000x100000 pixels"),
    ({"image": _png(ONE_PIXEL)}, "image too small: 1x1 pixels"),
    ({"image": "data:image/jpeg;base64," + "A" * (21 * 2**20)}, "image is too large: 21.0 MB of base64"),
    ({"image": _png(ONE_PIXEL), "stage": "Day-1/../../etc"}, "must be a folder inside the gallery"),
    ({"image": _png(ONE_PIXEL), "stage": "/etc"}, "must be a folder inside the gallery"),
    ({"image": _png(ONE_PIXEL), "stage": "Day-7"}, "unknown stage 'Day-7'"),
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
    if not (NODE_CLIENT / "node_modules" / "bullmq").is_dir():
        pytest.fail(f"the Node client is not installed: run `make install` (npm ci in {NODE_CLIENT})")
    schema_file = tmp_path / "schemas.json"
    printed = subprocess.run([*worker_command(), "schema"], capture_output=True, check=True, text=True)
    schema_file.write_text(printed.stdout)
    queries = faces_dir / "queries"
    command = ["node", "portal.mjs", "--redis", redis_url, "--queue", QUEUE, "--workers", "--schemas", str(schema_file),
               "--selfie", str(queries / "q04.jpg"), "--selfie", str(queries / "q06.jpg"),
               "--selfie", str(queries / "q18.jpg")]  # q18: carell, a stranger
    done = subprocess.run(command, cwd=NODE_CLIENT, capture_output=True, text=True, timeout=120)
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

    sent_at, before = time.time(), worker.wait_record()["jobs_processed"]
    (job,) = run_jobs(redis_url, QUEUE, [selfie_job(faces_dir / "queries" / "q01.jpg")])
    assert job.state == "completed"
    # a record written while the job was in hand stays until the next beat: wait for an idle one after it
    record = worker.wait_record(lambda rec: rec["jobs_processed"] > before and rec["current_job"] is None,
                                timeout=3 * HEARTBEAT_INTERVAL_S)
    Heartbeat.model_validate(record)
    assert record["id"] == BASE_ID  # --gpus cpu: the CPU worker's id, on any machine
    assert (record["hostname"], record["engine"]) == (socket.gethostname(), "face_recognition")
    assert record["concurrency"] == 1
    assert record["use_cpu"] is True
    assert record["gpu_index"] is record["gpu_name"] is record["gpu_utilization"] is None
    assert record["gpu_memory_used_mb"] is record["gpu_temperature"] is None
    assert 0 <= record["cpu_percent"] <= 100 and 0 < record["ram_percent"] < 100 and record["ram_available_gb"] > 0
    assert sent_at <= record["last_heartbeat"] <= time.time()  # seconds since the epoch, written after the job
    assert record["uptime"] == pytest.approx(record["last_heartbeat"] - record["start_time"], abs=0.2)
    assert record["gallery_version"] == manifest_version(built_gallery)
    assert record["gallery_photos"] == 19
    assert record["gallery_faces"] == Gallery.open(built_gallery).face_count  # the loaded gallery's own count
    assert record["search_p50_ms"] is not None and record["job_p50_ms"] is not None
    assert record["search_p50_ms"] < record["job_p50_ms"]  # the search is one step of a job
    assert record["queue"] == QUEUE and record["current_job"] is None


def test_heartbeat_is_rewritten_while_the_worker_is_idle(worker: WorkerProcess) -> None:
    beats: list[float] = []
    deadline = time.monotonic() + 4 * HEARTBEAT_INTERVAL_S
    while len(beats) < 3 and time.monotonic() < deadline:
        beat = worker.wait_record()["last_heartbeat"]
        if not beats or beat != beats[-1]:
            beats.append(beat)
        time.sleep(0.1)
    assert len(beats) == 3 and beats == sorted(beats), f"heartbeats seen: {beats}"


# -- pause, a second worker, SIGTERM ------------------------------------------------------------------


def test_pause_takes_no_new_job_finishes_the_one_in_hand_and_resume_serves_again(
    worker: WorkerProcess, redis_url: str, r: redis.Redis, faces_dir: Path,
) -> None:
    key, gate = f"worker:{worker.id}:paused", worker.gate
    assert gate is not None
    gate.close()
    try:
        (in_hand,) = run_jobs(redis_url, QUEUE, [selfie_job(faces_dir / "queries" / "q04.jpg")], wait=False)
        gate.wait_entered(1)
        r.set(key, "1")
        worker.wait_record(lambda rec: rec["status"] == "paused", timeout=15)
        assert wait_state(redis_url, QUEUE, in_hand.id, set(), timeout=0) == "active"  # paused, the job still in hand
    finally:
        gate.open()
    try:
        assert wait_state(redis_url, QUEUE, in_hand.id, {"completed", "failed"}) == "completed"
        (waiting,) = run_jobs(redis_url, QUEUE, [selfie_job(faces_dir / "queries" / "q01.jpg")], wait=False)
        time.sleep(3)  # a paused worker would have taken it long before now: it must not
        assert wait_state(redis_url, QUEUE, waiting.id, {"active", "completed", "failed"}, timeout=0) == "waiting"
        assert worker.record()["status"] == "paused"
    finally:
        r.delete(key)
    assert wait_state(redis_url, QUEUE, waiting.id, {"completed", "failed"}, timeout=30) == "completed"
    worker.wait_record(lambda rec: rec["status"] == "online", timeout=15)


def test_second_worker_takes_the_next_id_runs_jobs_side_by_side_and_sigterm_finishes_them(
    worker: WorkerProcess, redis_url: str, built_gallery: Path, tmp_path: Path, labels: list[Label],
    photo_tree: PhotoTree,
) -> None:
    assert worker.id == BASE_ID
    queue, gate = "fsw-e2e-second", Gate(tmp_path / "gate")
    second = start_worker(redis_url, built_gallery, queue, tmp_path, WORKER_CONCURRENCY="2", gate=gate)
    assert second.id == f"{BASE_ID}_2"  # the first is live, so the next free suffix
    assert second.record()["concurrency"] == 2

    obama = [x for x in labels if x.split == "query" and x.people == {"obama"}][0].path
    gate.close()
    try:
        jobs = run_jobs(redis_url, queue, [selfie_job(obama), selfie_job(obama)], wait=False)
        gate.wait_entered(2)  # with --concurrency 2 both jobs are in hand at once
        assert [wait_state(redis_url, queue, j.id, set(), timeout=0) for j in jobs] == ["active", "active"]
        second.signal_stop()  # SIGTERM with both jobs in hand
        second.wait_log("stopping: finishing the jobs in hand")
    finally:
        gate.open()
    assert second.wait_stopped(timeout=60) == 0
    for outcome in wait_jobs(redis_url, queue, [j.id for j in jobs], timeout=0):
        assert outcome.state == "completed" and set(outcome.photo_ids) <= photo_tree.photos_of("obama")
    assert second.record()["status"] == "offline"
    assert second.record()["jobs_processed"] == 2

    again = start_worker(redis_url, built_gallery, queue, tmp_path)  # a restart keeps its id
    try:
        assert again.id == f"{BASE_ID}_2"
    finally:
        assert again.stop() == 0


def test_gpus_all_serves_with_each_gpu_the_machine_has_or_one_cpu_process(
    redis_url: str, built_gallery: Path, tmp_path: Path, faces_dir: Path, photo_tree: PhotoTree,
) -> None:
    queue, gpus, started = "fsw-e2e-gpus", gpu_count(), time.time()
    proc = start_worker(redis_url, built_gallery, queue, tmp_path, "--gpus", "all", wait=False)

    def serving() -> list[dict[str, Any]]:  # by queue, not pid: under a supervisor each GPU has a child
        with redis.Redis.from_url(redis_url, decode_responses=True) as r:
            records = [json.loads(v) for v in r.hgetall("workers").values()]  # type: ignore[union-attr]
        return [x for x in records
                if x.get("queue") == queue and x["status"] == "online" and x["start_time"] >= started]

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(serving()) < max(gpus, 1) and time.monotonic() < deadline:
            assert proc.proc.poll() is None, proc.log_text()[-3000:]
            time.sleep(0.2)
        records = serving()
        (job,) = run_jobs(redis_url, queue, [selfie_job(faces_dir / "queries" / "q04.jpg")])
    finally:
        assert proc.stop() == 0
    assert sorted(x["gpu_index"] for x in records if x["gpu_index"] is not None) == list(range(gpus))
    assert len(records) == max(gpus, 1)
    for record in records:
        assert record["id"].startswith(base_worker_id(socket.gethostname(), record["gpu_index"]))
        assert (record["gpu_name"] is None) == (record["gpu_index"] is None)
        if not gpus:  # one CPU process, the one started
            assert record["pid"] == proc.proc.pid and record["use_cpu"] is True
    assert job.state == "completed" and set(job.photo_ids) <= photo_tree.photos_of("obama")


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
