"""The pieces of a fleet build, in-process: the encode job contract, a worker's photo sources (a folder, and
HTTP against a local server: a 404, a server that never answers, one that trickles, an oversized and a
non-image response), the encode handler (results equal to a local encoding, skip reasons, refusals), the
search-first rule and the settings. The whole build with real workers: tests/test_fleet_build.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bullmq import UnrecoverableError
from redis.asyncio import Redis

from matcher import layout
from matcher.encoder import Encoder, EncoderSettings
from matcher.images import load_image
from schemas.encode import (
    REFUSED,
    EncodedPhoto,
    EncodeJob,
    EncodeJobError,
    EncodePhoto,
    build_key,
    encode_job_id,
    parse_encode_job,
    parse_encode_result,
)
from worker.encode_jobs import EncodeJobs, EncodeRefused, SearchFirst
from worker.jobs import EncoderPool
from worker.photo_source import FolderSource, HttpSource, PhotoUnavailable, photo_source
from worker.settings import SettingsError, WorkerSettings
from worker.stats import WorkerStats

BUILD = build_key("host", "/srv/gallery")


def _photo(path: Path, root: Path) -> EncodePhoto:
    return EncodePhoto(id=path.relative_to(root).as_posix(), sha256=layout.file_sha256(path), size=path.stat().st_size)


# -- the contract -----------------------------------------------------------------------------------------


def test_packed_arrays_come_back_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    boxes = rng.integers(-5, 5000, size=(3, 4)).astype(np.int32)
    descriptors = rng.normal(size=(3, 128)).astype(np.float32)
    sent = EncodedPhoto.of("a/b.jpg", "0" * 64, 10, boxes, descriptors)
    back = parse_encode_result({"worker": "w", "photos": [sent.model_dump(mode="json")]}).photos[0]
    got_boxes, got_descriptors = back.arrays()
    assert np.array_equal(got_boxes, boxes) and np.array_equal(got_descriptors, descriptors)
    assert len(sent.descriptors) == 2048  # 3 faces x 512 bytes as base64: about 683 characters a face
    assert EncodedPhoto.of("none.jpg", "0" * 64, 1, np.zeros((0, 4)), np.zeros((0, 128))).arrays()[1].shape == (0, 128)


def test_arrays_that_do_not_match_their_face_count_are_refused() -> None:
    photo = EncodedPhoto.of("a.jpg", "0" * 64, 10, np.zeros((2, 4)), np.zeros((2, 128)))
    with pytest.raises(EncodeJobError, match="a.jpg: boxes: 32 bytes, expected 3 x 4 x 4"):
        photo.model_copy(update={"faces": 3}).arrays()


def test_the_same_batch_and_settings_make_the_same_job_id() -> None:
    photos = [EncodePhoto(id="Day-1/a.jpg", sha256="a" * 64, size=1), EncodePhoto(id="Day-1/b.jpg", sha256="b" * 64,
                                                                                  size=2)]
    settings = {"detector": "hog", "upsample": 1}
    job = EncodeJob(build=BUILD, settings=settings, photos=photos)
    assert job.job_id == encode_job_id(BUILD, dict(settings), list(photos)) and job.job_id.startswith(f"enc-{BUILD}-")
    assert job.job_id != encode_job_id(BUILD, {**settings, "upsample": 0}, photos)
    assert job.job_id != encode_job_id(BUILD, settings, photos[:1])
    assert job.job_id != encode_job_id(build_key("host", "/srv/other"), settings, photos)
    assert ":" not in job.job_id  # BullMQ job ids may not hold a colon


@pytest.mark.parametrize("bad", ["../etc/passwd.jpg", "/etc/x.jpg", "a/../../b.jpg", "a\\b.jpg"])
def test_a_photo_id_outside_the_tree_is_refused(bad: str) -> None:
    with pytest.raises(EncodeJobError, match="must be a path inside the photo tree"):
        parse_encode_job({"build": BUILD, "settings": {}, "photos": [{"id": bad, "sha256": "0" * 64, "size": 1}]})


# -- photo sources ------------------------------------------------------------------------------------------


def test_folder_source_reads_photos_and_says_why_one_is_missing(tmp_path: Path) -> None:
    (tmp_path / "Day-1").mkdir()
    (tmp_path / "Day-1" / "a.jpg").write_bytes(b"abc")
    source = photo_source(None, str(tmp_path))
    assert isinstance(source, FolderSource) and source.available() is None
    assert source.read("Day-1/a.jpg") == b"abc"
    with pytest.raises(PhotoUnavailable, match="cannot read file: No such file"):
        source.read("Day-1/gone.jpg")
    with pytest.raises(PhotoUnavailable, match="photo too large"):
        FolderSource(tmp_path, max_bytes=2).read("Day-1/a.jpg")
    assert "set FSW_PHOTOS" in (FolderSource(tmp_path / "elsewhere").available() or "")


@dataclass
class _Site:
    url: str
    release: threading.Event


@pytest.fixture
def photo_site(faces_dir: Path) -> Iterator[_Site]:
    """A local HTTP server: /photos/<id> serves the dev gallery's photos; others misbehave on purpose."""
    release = threading.Event()  # the stuck responses wait for it: set when the test ends
    photo = (faces_dir / "gallery" / "g01.jpg").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/photos/Day-1/g01.jpg", "/photos/Day%202/g01.jpg"):  # a space is quoted
                self._send(200, photo, "image/jpeg")
            elif self.path.endswith("/never.jpg"):
                release.wait(30)  # accepts the request, never answers while the test runs
            elif self.path.endswith("/trickle.jpg"):
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"\xff\xd8")
                self.wfile.flush()
                release.wait(30)  # then nothing more
            elif self.path.endswith("/declared-huge.jpg"):
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
            elif self.path.endswith("/endless.jpg"):  # no length given, more bytes than the cap
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 4096)
            elif self.path.endswith("/page.jpg"):
                self._send(200, b"<html>login</html>", "text/html; charset=utf-8")
            else:
                self._send(404, b"not found", "text/plain")

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *_: None  # type: ignore[method-assign]  # a client that gave up: expected here
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Site(f"http://127.0.0.1:{server.server_address[1]}/photos", release)
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_http_source_fetches_a_photo(photo_site: _Site, faces_dir: Path) -> None:
    source = photo_source(photo_site.url + "/", "/ignored")
    assert isinstance(source, HttpSource)
    assert source.read("Day-1/g01.jpg") == (faces_dir / "gallery" / "g01.jpg").read_bytes()
    assert source.read("Day 2/g01.jpg")[:2] == b"\xff\xd8"


@pytest.mark.parametrize("photo_id, reason", [
    ("Day-1/missing.jpg", "HTTP 404 Not Found from 127.0.0.1"),
    ("Day-1/never.jpg", "no answer from 127.0.0.1 within 0.5 s"),
    ("Day-1/trickle.jpg", "no answer from 127.0.0.1 within 0.5 s"),
    ("Day-1/declared-huge.jpg", "photo too large: 1,000,000,000 bytes, over the limit of 102,400"),
    ("Day-1/endless.jpg", "bytes or more, over the limit of 102,400"),
    ("Day-1/page.jpg", "127.0.0.1 served 'text/html', not an image"),
])
def test_http_source_gives_each_bad_response_its_reason(photo_site: _Site, photo_id: str, reason: str) -> None:
    source = HttpSource(photo_site.url, timeout_s=0.5, max_bytes=100 * 1024)
    with pytest.raises(PhotoUnavailable) as e:
        source.read(photo_id)
    assert reason in str(e.value)


# -- the encode handler -------------------------------------------------------------------------------------


class _Job:
    def __init__(self, data: Any):
        self.id = "enc-test"
        self.data = data

    async def updateProgress(self, progress: Any) -> None:  # noqa: N802 - bullmq's name
        pass


class _NoSearches:
    async def clear(self) -> None:
        pass


@pytest.fixture(scope="module")
def encode_jobs() -> Iterator[EncodeJobs]:
    handler = EncodeJobs(EncoderPool("onnx", 1), 1, _NoSearches(), lambda: "test_cpu0_fr")  # type: ignore[arg-type]
    yield handler
    handler.shutdown()


def test_a_batch_is_encoded_exactly_as_a_local_build_encodes(encode_jobs: EncodeJobs, faces_dir: Path,
                                                             encoder: Encoder, tmp_path: Path) -> None:
    root = faces_dir / "gallery"
    paths = sorted(root.glob("*.jpg"))[:3]
    (tmp_path / "empty.jpg").write_bytes(b"")
    photos = [_photo(p, root) for p in paths]
    settings = EncoderSettings().recorded()
    job = EncodeJob(build=BUILD, root=str(root), settings=settings, photos=photos)
    result = parse_encode_result(asyncio.run(encode_jobs(_Job(job.model_dump(mode="json")))))
    assert result.worker == "test_cpu0_fr" and [p.id for p in result.photos] == [p.id for p in photos]
    for path, photo in zip(paths, result.photos, strict=True):
        boxes, descriptors = photo.arrays()
        faces = encoder.faces(load_image(path))
        assert photo.skipped is None and photo.sha256 == layout.file_sha256(path) and len(faces) == photo.faces > 0
        assert [tuple(b) for b in boxes.tolist()] == [tuple(f.box) for f in faces]
        assert np.abs(descriptors - np.array([f.descriptor for f in faces], np.float32)).max() < 1e-6


def test_unreadable_and_changed_photos_are_skipped_with_reasons(encode_jobs: EncodeJobs, faces_dir: Path,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not a photo")
    (root / "changed.jpg").write_bytes((faces_dir / "gallery" / "g01.jpg").read_bytes())
    photos = [_photo(root / name, root) for name in ("empty.jpg", "text.jpg", "changed.jpg")]
    photos.append(EncodePhoto(id="gone.jpg", sha256="0" * 64, size=3))
    (root / "changed.jpg").write_bytes((faces_dir / "gallery" / "g02.jpg").read_bytes())  # after the indexer hashed it
    job = EncodeJob(build=BUILD, root=str(root), settings=EncoderSettings().recorded(), photos=photos)
    result = parse_encode_result(asyncio.run(encode_jobs(_Job(job.model_dump(mode="json")))))
    reasons = {p.id: p.skipped for p in result.photos}
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "not an image" in (reasons["text.jpg"] or "")
    assert "differs from the indexer's" in (reasons["changed.jpg"] or "")
    assert (reasons["gone.jpg"] or "").startswith("cannot read file")
    assert all(p.faces == 0 for p in result.photos)


def test_a_job_with_other_settings_or_no_photo_tree_is_refused_with_the_reason(encode_jobs: EncodeJobs,
                                                                                faces_dir: Path) -> None:
    root = faces_dir / "gallery"
    photos = [_photo(root / "g01.jpg", root)]
    other = {**EncoderSettings().recorded(), "model": "f" * 64}
    with pytest.raises(EncodeRefused) as e:
        asyncio.run(encode_jobs(_Job(EncodeJob(build=BUILD, root=str(root), settings=other, photos=photos)
                                     .model_dump(mode="json"))))
    assert str(e.value).startswith(f"{REFUSED}test_cpu0_fr: ") and "model: job 'ffff" in str(e.value)
    unknown = {**EncoderSettings().recorded(), "detector_version": 7}
    with pytest.raises(EncodeRefused, match="detector_version: job 7, this worker None"):
        asyncio.run(encode_jobs(_Job(EncodeJob(build=BUILD, root=str(root), settings=unknown, photos=photos)
                                     .model_dump(mode="json"))))
    with pytest.raises(EncodeRefused, match="not a folder on this machine: set FSW_PHOTOS"):
        asyncio.run(encode_jobs(_Job(EncodeJob(build=BUILD, root="/no/such/tree", settings=EncoderSettings()
                                               .recorded(), photos=photos).model_dump(mode="json"))))
    with pytest.raises(UnrecoverableError, match="not an encode job"):
        asyncio.run(encode_jobs(_Job({"photos": "everything"})))


# -- search first --------------------------------------------------------------------------------------------


def test_no_photo_starts_while_a_search_job_is_in_hand_or_waiting(redis_url: str) -> None:
    async def go() -> None:
        redis = Redis.from_url(redis_url)
        stats = WorkerStats()
        first = SearchFirst(stats, redis, "search-first-test", poll_s=0.01)
        try:
            await asyncio.wait_for(first.clear(), 10)  # nothing in hand, nothing waiting
            stats.job_started("selfie-1")
            waiting = asyncio.ensure_future(first.clear())
            await asyncio.sleep(0.2)
            assert not waiting.done()
            await redis.lpush("bull:search-first-test:wait", "selfie-2")  # the next selfie already waits
            stats.job_finished("selfie-1", ok=True)
            await asyncio.sleep(0.2)
            assert not waiting.done()
            await redis.delete("bull:search-first-test:wait")  # taken by a worker
            await asyncio.wait_for(waiting, 10)
        finally:
            await redis.aclose()

    asyncio.run(go())


# -- settings ------------------------------------------------------------------------------------------------


def test_worker_encode_settings_are_read_and_checked() -> None:
    s = WorkerSettings.from_env({"FSW_ENCODE_QUEUE": "enc", "FSW_ENCODE_CONCURRENCY": "2", "FSW_PHOTOS": "/mnt/p"})
    assert (s.encode_queue, s.encode_concurrency, s.photos) == ("enc", 2, "/mnt/p")
    assert WorkerSettings.from_env({}).encode_queue == "fsw-encode"
    never = WorkerSettings.from_env({"FSW_ENCODE_CONCURRENCY": "0", "FSW_ENCODE_QUEUE": "face-search"})
    assert never.encode_concurrency == 0
    with pytest.raises(SettingsError, match="FSW_ENCODE_QUEUE must name a queue of its own"):
        WorkerSettings.from_env({"FSW_ENCODE_QUEUE": "face-search"})
    with pytest.raises(SettingsError, match="FSW_ENCODE_CONCURRENCY must be 0"):
        WorkerSettings.from_env({"FSW_ENCODE_CONCURRENCY": "-1"})


def test_the_indexer_reads_redis_as_the_worker_does() -> None:
    from indexer.fleet import FleetSettings

    env = {"REDIS_HOST": "cache", "REDIS_PORT": "6390", "REDIS_PASSWORD": "pw", "FSW_ENCODE_QUEUE": "enc"}
    fleet, worker = FleetSettings.from_env(env), WorkerSettings.from_env(env)
    assert fleet.redis_url == worker.redis_url and fleet.queue == worker.encode_queue == "enc"
    assert "pw" not in fleet.redis_display and "pw" not in repr(fleet)


def test_encode_threads_run_at_a_lower_priority_than_search(encode_jobs: EncodeJobs) -> None:
    import os

    from worker.defaults import ENCODE_NICE

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice()
    assert encode_jobs.executor.submit(nice).result() == min(19, mine + ENCODE_NICE) or mine >= 19
