"""A worker's life around its job: the gallery appearing, growing and shrinking under it (built and
extended with `indexer.pipeline.index_photos`, as `fsw-index build` and `add` do; `fsw-index remove`)
without a restart or a failed job, and Redis going away and coming back."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from indexer.pipeline import index_photos
from matcher.encoder import EncoderSettings
from testkit.jobs import JobOutcome, run_jobs, selfie_job
from testkit.photos import PhotoTree
from testkit.redis_server import RedisServer
from testkit.worker_process import BIN, start_worker
from worker.service import node_client_name


def fsw_index(*args: str) -> None:
    done = subprocess.run([str(BIN / "fsw-index"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not so after {timeout} s"
        time.sleep(0.05)


def test_gallery_built_added_to_and_removed_from_is_served_without_restart_or_failed_job(
    redis_url: str, photo_tree: PhotoTree, faces_dir: Path, tmp_path: Path,
) -> None:
    queue = "fsw-reload"
    photos, gallery = tmp_path / "photos", tmp_path / "gallery"
    (photos / "Day-1" / "Morning").mkdir(parents=True)
    for name in ("g05.jpg", "g13.jpg"):  # obama alone; clapton
        shutil.copy(faces_dir / "gallery" / name, photos / "Day-1" / "Morning" / name)
    obama = selfie_job(faces_dir / "queries" / "q19.jpg")
    obama_day3 = {**obama, "stage": "Day-3"}

    worker = start_worker(redis_url, gallery, queue, tmp_path / "w")  # before there is any gallery
    try:
        record = worker.wait_record()
        assert record["gallery_version"] is None and "no gallery at" in record["gallery_error"]
        (early,) = run_jobs(redis_url, queue, [obama])
        assert early.state == "failed"
        assert early.failed_reason.startswith(f"gallery not loaded: no gallery at {gallery}")

        index_photos(gallery, [photos], EncoderSettings(), photo_root=photos, jobs=1)
        worker.wait_record(lambda rec: rec["gallery_version"] == 1, timeout=15)
        one, unknown = run_jobs(redis_url, queue, [obama, obama_day3])
        assert one.photo_ids == ["Day-1/Morning/g05.jpg"]
        assert unknown.state == "failed" and "unknown stage 'Day-3'" in unknown.failed_reason

        # Jobs keep coming while `add` writes and the worker reloads: none may fail.
        stop, during = threading.Event(), []

        def keep_asking() -> None:
            while not stop.is_set():
                during.extend(run_jobs(redis_url, queue, [obama], timeout=30))
                stop.wait(0.3)  # leave the two cores some room for the indexer

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            wait_until(lambda: len(during) >= 1)  # one answered from version 1 before the add begins
            (photos / "Day-3").mkdir()
            for name in ("g15.jpg", "g02.jpg"):  # biden and obama, twice
                shutil.copy(faces_dir / "gallery" / name, photos / "Day-3" / name)
            index_photos(gallery, [photos / "Day-3"], EncoderSettings(), jobs=1, command="add")
            worker.wait_record(lambda rec: rec["gallery_version"] == 2, timeout=15)
            after_reload = len(during)
            wait_until(lambda: len(during) >= after_reload + 2)  # and some after the reload
        finally:
            stop.set()
            asker.join(timeout=60)
        assert len(during) >= 3 and all(j.state == "completed" for j in during), during
        assert {tuple(j.photo_ids) for j in during} >= {("Day-1/Morning/g05.jpg",)}
        (day3,) = run_jobs(redis_url, queue, [obama_day3])
        assert sorted(day3.photo_ids) == ["Day-3/g02.jpg", "Day-3/g15.jpg"]

        fsw_index("remove", "Day-3", "--gallery", str(gallery))
        record = worker.wait_record(lambda rec: rec["gallery_version"] == 3, timeout=15)
        assert (record["gallery_photos"], record["gallery_error"]) == (2, None)
        (gone,) = run_jobs(redis_url, queue, [obama_day3])
        assert gone.state == "failed" and "unknown stage 'Day-3'" in gone.failed_reason
        assert record["jobs_failed"] == 2  # the two expected failures above, nothing else
    finally:
        assert worker.stop() == 0


def test_worker_waits_for_a_password_protected_redis_and_survives_its_restart(
    private_redis: RedisServer, built_gallery: Path, faces_dir: Path, photo_tree: PhotoTree, tmp_path: Path,
) -> None:
    queue, url = "fsw-restart", private_redis.url
    biden = selfie_job(faces_dir / "queries" / "q01.jpg")
    private_redis.stop()
    # configured the other way: host, port and password; Redis is not there yet
    worker = start_worker(url, built_gallery, queue, tmp_path, wait=False, REDIS_URL="", REDIS_HOST="127.0.0.1",
                          REDIS_PORT=str(private_redis.port), REDIS_PASSWORD="fsw-test-secret")
    try:
        worker.wait_log("unavailable")
        assert "Redis at redis://:***@127.0.0.1" in worker.log_text(), worker.log_text()
        private_redis.start()
        worker.wait_record(lambda rec: rec["status"] == "online", timeout=30)
        (before,) = run_jobs(url, queue, [biden])
        assert before.photo_ids and set(before.photo_ids) <= photo_tree.photos_of("biden")

        private_redis.stop()  # no persistence: the queue, the workers hash, everything goes
        time.sleep(3)
        assert worker.proc.poll() is None, worker.log_text()
        private_redis.start()
        (after,) = run_jobs(url, queue, [biden], timeout=60)
        assert after == JobOutcome(after.id, "completed", before.returnvalue, None)
        worker.wait_record(lambda rec: rec["status"] == "online", timeout=15)  # heartbeats resumed
        with redis.Redis.from_url(url, decode_responses=True) as r:
            names = [c["name"] for c in r.client_list()]
        assert names.count(node_client_name("bull", queue, worker.id)) == 2  # reconnected, named for Node
        log = worker.log_text()
        assert log.count("unavailable") == 2  # at the start and after the restart, once each
        assert "answers again" in log
        assert "fsw-test-secret" not in log and f"redis://:***@127.0.0.1:{private_redis.port}" in log
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("signal_name", ["SIGINT"])
def test_sigint_stops_an_idle_worker_cleanly(
    signal_name: str, redis_url: str, built_gallery: Path, tmp_path: Path,
) -> None:
    import signal

    worker = start_worker(redis_url, built_gallery, "fsw-sigint", tmp_path)
    worker.proc.send_signal(getattr(signal, signal_name))
    assert worker.proc.wait(timeout=30) == 0
    assert worker.record()["status"] == "offline"
