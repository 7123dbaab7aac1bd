"""`fsw-index build --fleet` with real fsw-worker processes, a private Redis and BullMQ, on the dev photo tree.

Each test holds the workers' photos at a closed gate (`testkit.fleet`) until the moment it needs (both
workers holding a batch, a worker killed with one in hand, the indexer killed with results waiting), so
nothing depends on how fast the machine is, and no test asserts how long anything took.
Checked: the gallery equals the local build's (same photos, boxes, descriptors within 1e-6), no encode
job or result is left in Redis (SCAN), and a selfie is answered while encode jobs wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from indexer.fleet import FleetEncoding, FleetSettings
from indexer.pipeline import Summary, index_photos
from matcher.encoder import EncoderSettings
from testkit.fleet import FAIL_PHOTOS, gallery_faces, leftover_keys, max_difference, start_encoder
from testkit.gate import Gate
from testkit.jobs import run_jobs, selfie_job
from testkit.photos import PhotoTree
from testkit.redis_server import RedisServer
from testkit.worker_process import WorkerProcess

BIN = Path(sys.executable).parent
STALLED_WITHIN_S = 150  # lock expiry (15 s) + the survivor's stalled check (every 15 s), on a loaded machine


@pytest.fixture
def queues() -> tuple[str, str]:
    """A search queue and an encode queue of the test's own."""
    tag = uuid.uuid4().hex[:8]
    return f"fleet-search-{tag}", f"fleet-encode-{tag}"


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.stop()


class _Build(threading.Thread):
    """index_photos with the fleet's encoding, in a thread, as `fsw-index build --fleet` runs it."""

    def __init__(self, redis_url: str, encode_queue: str, tree: PhotoTree, gallery: Path):
        super().__init__(daemon=True)
        self.fleet = FleetSettings(redis_url=redis_url, queue=encode_queue, batch=2)
        self.tree, self.gallery = tree, gallery
        self.summary: Summary | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.summary = index_photos(self.gallery, [self.tree.root], EncoderSettings(), photo_root=self.tree.root,
                                        encoding=FleetEncoding(self.fleet, poll_s=0.05))
        except BaseException as e:  # reported by result()
            self.error = e

    def result(self, timeout: float = 300) -> Summary:
        self.join(timeout)
        assert not self.is_alive(), "the fleet build did not finish"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def _assert_same_as_local(gallery: Path, local: Path, summary: Summary) -> None:
    assert not summary.skipped and not summary.interrupted and summary.photos_indexed == len(gallery_faces(local))
    assert max_difference(gallery_faces(gallery), gallery_faces(local)) < 1e-6


def test_two_workers_build_the_gallery_a_local_build_makes(
    redis_url: str, photo_tree: PhotoTree, built_gallery: Path, tmp_path: Path, queues: tuple[str, str],
    workers: list[WorkerProcess],
) -> None:
    search, encode = queues
    gate = Gate(tmp_path / "gate")
    gate.close()
    workers += [start_encoder(redis_url, tmp_path / "no-gallery", search, encode, tmp_path / f"w{i}", gate=gate)
                for i in range(2)]
    build = _Build(redis_url, encode, photo_tree, tmp_path / "gallery")
    gate.wait_entered(2)  # each worker holds a batch: both take part
    gate.open()
    summary = build.result()
    _assert_same_as_local(tmp_path / "gallery", built_gallery, summary)
    assert sorted(summary.workers) == sorted(w.id for w in workers)
    assert leftover_keys(redis_url, encode) == {}


def test_a_batch_held_by_a_killed_worker_is_encoded_by_another(
    redis_url: str, photo_tree: PhotoTree, built_gallery: Path, tmp_path: Path, queues: tuple[str, str],
    workers: list[WorkerProcess],
) -> None:
    search, encode = queues
    gate = Gate(tmp_path / "gate")
    gate.close()
    workers += [start_encoder(redis_url, tmp_path / "no-gallery", search, encode, tmp_path / f"w{i}", gate=gate)
                for i in range(2)]
    build = _Build(redis_url, encode, photo_tree, tmp_path / "gallery")
    gate.wait_entered(2)
    victim, survivor = workers
    victim.proc.kill()  # SIGKILL, a batch in hand
    victim.proc.wait()
    gate.open()
    summary = build.result(timeout=STALLED_WITHIN_S + 300)
    _assert_same_as_local(tmp_path / "gallery", built_gallery, summary)
    assert summary.workers == [survivor.id]
    assert leftover_keys(redis_url, encode) == {}


def test_a_photo_that_fails_every_attempt_is_reported_and_the_rest_indexed(
    redis_url: str, photo_tree: PhotoTree, built_gallery: Path, tmp_path: Path, queues: tuple[str, str],
    workers: list[WorkerProcess],
) -> None:
    search, encode = queues
    local = gallery_faces(built_gallery)
    bad = sorted(local)[3]
    workers.append(start_encoder(redis_url, tmp_path / "no-gallery", search, encode, tmp_path / "w",
                                 gate=Gate(tmp_path / "gate"), **{FAIL_PHOTOS: bad}))
    summary = _Build(redis_url, encode, photo_tree, tmp_path / "gallery").result()
    # its batch failed three times, was split, and the photo alone failed three times more: then reported
    assert [item["path"] for item in summary.skipped] == [bad]
    assert summary.skipped[0]["reason"].startswith("encoding failed on every attempt: ")
    assert "fails every time" in summary.skipped[0]["reason"]
    del local[bad]
    assert max_difference(gallery_faces(tmp_path / "gallery"), local) < 1e-6
    assert leftover_keys(redis_url, encode) == {}


def _fsw_index(*args: str, redis_url: str, encode: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FSW_"))}
    env.update({"REDIS_URL": redis_url, "FSW_ENCODE_QUEUE": encode})
    script = BIN / "fsw-index"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "indexer.cli"]
    return subprocess.Popen([*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _completed_jobs(redis_url: str, encode: str) -> list[str]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        return list(r.zrange(f"bull:{encode}:completed", 0, -1))


def test_a_killed_indexer_resumes_from_the_results_waiting_in_redis(
    redis_url: str, photo_tree: PhotoTree, built_gallery: Path, tmp_path: Path, queues: tuple[str, str],
    workers: list[WorkerProcess],
) -> None:
    search, encode = queues
    gate = Gate(tmp_path / "gate")
    gate.close()
    (worker,) = workers[:] = [start_encoder(redis_url, tmp_path / "no-gallery", search, encode, tmp_path / "w",
                                            gate=gate)]
    gallery = tmp_path / "gallery"
    # one commit at the end only: everything returned before the kill waits in Redis, nothing in the gallery
    command = ["build", str(photo_tree.root), "--gallery", str(gallery), "--fleet", "--checkpoint-s", "3600"]
    first = _fsw_index(*command, redis_url=redis_url, encode=encode)
    gate.wait_entered(1)
    gate.open()
    deadline_jobs = 3
    while len(_completed_jobs(redis_url, encode)) < deadline_jobs:
        assert first.poll() is None, first.stdout.read() if first.stdout else ""
        threading.Event().wait(0.05)
    gate.close()
    gate.wait_entered(1)  # the worker holds the next batch
    returned = _completed_jobs(redis_url, encode)
    first.send_signal(signal.SIGKILL)
    first.wait()
    encoded_before = worker.log_text().count("encode job ")

    gate.open()
    second = _fsw_index(*command, redis_url=redis_url, encode=encode)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out.decode(errors="replace")
    summary = Summary(**json.loads((gallery / "last-run.json").read_text()))
    _assert_same_as_local(gallery, built_gallery, summary)
    log = worker.log_text()
    for job_id in returned:  # results returned before the kill were recorded, not encoded again
        assert log.count(f"encode job {job_id}:") == 1, job_id
    assert log.count("encode job ") > encoded_before  # the rest was encoded after the resume
    assert leftover_keys(redis_url, encode) == {}


def test_a_build_with_no_worker_says_so_and_goes_on_when_one_starts(
    redis_url: str, photo_tree: PhotoTree, built_gallery: Path, tmp_path: Path, queues: tuple[str, str],
    workers: list[WorkerProcess], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import indexer.fleet

    monkeypatch.setattr(indexer.fleet, "FLEET_IDLE_WARN_S", 0.5)  # instead of 30 s
    monkeypatch.setattr(indexer.fleet, "FLEET_LOST_CHECK_S", 0.2)
    search, encode = queues
    build = _Build(redis_url, encode, photo_tree, tmp_path / "gallery")
    deadline = time.monotonic() + 60
    while "no fsw-worker has taken an encode job" not in caplog.text:
        assert build.is_alive() and time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert encode in caplog.text
    workers.append(start_encoder(redis_url, tmp_path / "no-gallery", search, encode, tmp_path / "w"))
    _assert_same_as_local(tmp_path / "gallery", built_gallery, build.result())


def test_fsw_index_add_fleet_adds_a_stage(
    redis_url: str, photo_tree: PhotoTree, built_gallery: Path, tmp_path: Path, queues: tuple[str, str],
    workers: list[WorkerProcess],
) -> None:
    search, encode = queues
    gallery = tmp_path / "gallery"
    first, second = sorted(p for p in photo_tree.root.iterdir() if p.is_dir())
    index_photos(gallery, [first], EncoderSettings(), photo_root=photo_tree.root, jobs=1)
    workers.append(start_encoder(redis_url, tmp_path / "no-gallery", search, encode, tmp_path / "w"))
    add = _fsw_index("add", str(second), "--gallery", str(gallery), "--fleet", redis_url=redis_url, encode=encode)
    out, _ = add.communicate(timeout=300)
    text = out.decode(errors="replace")
    assert add.returncode == 0, text
    assert f"encoded by 1 fsw-worker: {workers[0].id}" in text
    assert max_difference(gallery_faces(gallery), gallery_faces(built_gallery)) < 1e-6
    assert leftover_keys(redis_url, encode) == {}


def test_a_selfie_is_answered_while_encode_jobs_wait(
    redis_url: str, photo_tree: PhotoTree, built_gallery: Path, faces_dir: Path, tmp_path: Path,
    queues: tuple[str, str], workers: list[WorkerProcess],
) -> None:
    search, encode = queues
    gate = Gate(tmp_path / "gate")
    gate.close()
    workers.append(start_encoder(redis_url, built_gallery, search, encode, tmp_path / "w", gate=gate))
    build = _Build(redis_url, encode, photo_tree, tmp_path / "gallery")
    gate.wait_entered(1)  # the only worker holds a batch; the rest of the build waits on the queue
    query = next(q for q in photo_tree.queries if q.people == frozenset({"obama"}))
    (answer,) = run_jobs(redis_url, search, [selfie_job(query.path)], timeout=120)
    assert set(answer.photo_ids) == photo_tree.photos_of("obama")
    with redis.Redis.from_url(redis_url) as r:
        assert r.llen(f"bull:{encode}:wait") > 0  # encode jobs were still waiting when the selfie was answered
    assert build.is_alive()
    gate.open()
    _assert_same_as_local(tmp_path / "gallery", built_gallery, build.result())


@pytest.mark.parametrize("persistent", [True, False], ids=["append-only", "no-persistence"])
def test_the_build_carries_on_when_redis_restarts(
    photo_tree: PhotoTree, built_gallery: Path, tmp_path: Path, queues: tuple[str, str],
    workers: list[WorkerProcess], persistent: bool,
) -> None:
    """With persistence the queue survives the restart; without, Redis forgets every job and the indexer
    enqueues them again."""
    search, encode = queues
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", persistent=persistent)
    try:
        gate = Gate(tmp_path / "gate")
        gate.close()
        workers.append(start_encoder(server.url, tmp_path / "no-gallery", search, encode, tmp_path / "w", gate=gate))
        build = _Build(server.url, encode, photo_tree, tmp_path / "gallery")
        gate.wait_entered(1)
        server.stop()
        server.start()
        gate.open()
        summary = build.result()
        _assert_same_as_local(tmp_path / "gallery", built_gallery, summary)
        assert leftover_keys(server.url, encode) == {}
    finally:
        for w in workers:
            w.stop()
        workers.clear()
        server.stop()
