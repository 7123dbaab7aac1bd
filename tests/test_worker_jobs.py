"""The job handler, driven in-process on real faces and a real Redis: results, progress, failures, the
excluded set, the CUDA out-of-memory fallback, the event loop kept free, and the gallery hot swap.

A test that needs a job in hand holds it at a closed `testkit.gate.Gate` rather than hoping it is slow."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bullmq import UnrecoverableError
from click.testing import CliRunner
from PIL import Image
from redis.asyncio import Redis

from indexer.labels import Label
from matcher.errors import GalleryError
from matcher.gallery import Gallery
from matcher.query import search_selfie
from schemas import dump_result
from schemas.job import data_url
from testkit.gate import Gate, gated_engines
from testkit.images import encoded
from testkit.jobs import RecordingJob, selfie_job
from testkit.photos import PhotoTree
from worker.engine import WorkerEngine, is_cuda_oom, make_worker_engine
from worker.jobs import EncoderPool, SearchJobs
from worker.reload import GalleryReloader
from worker.service import WorkerService
from worker.settings import WorkerSettings
from worker.stats import WorkerStats


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)  # one thread: its encoder is made once for the module
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def encoders() -> EncoderPool:
    return EncoderPool("onnx", threads=1)


def query(labels: list[Label], person: str, nth: int = 0) -> Path:
    return [x for x in labels if x.split == "query" and x.people == {person}][nth].path


def run_job(
    built_gallery: Path,
    executor: ThreadPoolExecutor,
    encoders: EncoderPool,
    redis_url: str,
    data: Any,
    before: Callable[[Redis], Any] | None = None,
    stats: WorkerStats | None = None,
) -> tuple[RecordingJob, Any]:
    """Run one job through SearchJobs; returns the job and its result or the exception it raised."""

    async def go() -> tuple[RecordingJob, Any]:
        galleries = GalleryReloader(built_gallery)
        await galleries.refresh()
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            if before:
                await before(redis)
            handler = SearchJobs(galleries, encoders, executor, redis, stats or WorkerStats())
            job = RecordingJob(data)
            try:
                return job, await handler(job, "token")
            except Exception as e:
                return job, e
        finally:
            await redis.delete("excluded_images")
            await redis.aclose()

    return asyncio.run(go())


def test_known_person_gets_their_photos_best_first_with_progress_in_order(
    built_gallery: Path, executor: ThreadPoolExecutor, encoders: EncoderPool, redis_url: str,
    labels: list[Label], photo_tree: PhotoTree,
) -> None:
    job, result = run_job(built_gallery, executor, encoders, redis_url, selfie_job(query(labels, "obama")))
    ids = [entry["id"] for entry in result]
    assert ids and set(ids) <= photo_tree.photos_of("obama")
    sims = [entry["similarity"] for entry in result]
    assert sims == sorted(sims, reverse=True) and min(sims) > 0.5
    assert all(len(entry["box"]) == 4 for entry in result)
    assert job.progress == [25, 50, 75, 100]


def test_a_job_answers_exactly_what_fsw_index_search_answers(
    built_gallery: Path, executor: ThreadPoolExecutor, encoders: EncoderPool, redis_url: str,
    labels: list[Label], encoder: Any,
) -> None:
    gallery = Gallery.open(built_gallery)
    for person in ("obama", "leonard", "penny", "kit_harington"):
        _, result = run_job(built_gallery, executor, encoders, redis_url, selfie_job(query(labels, person)))
        expected = dump_result(search_selfie(gallery, encoder, query(labels, person)))
        assert [(e["id"], round(e["similarity"], 6)) for e in result] == [
            (e["id"], round(float(e["similarity"]), 6)) for e in expected  # type: ignore[arg-type]
        ], person


def test_stage_covers_only_its_folder(
    built_gallery: Path, executor: ThreadPoolExecutor, encoders: EncoderPool, redis_url: str,
    labels: list[Label], photo_tree: PhotoTree,
) -> None:
    _, everywhere = run_job(built_gallery, executor, encoders, redis_url, selfie_job(query(labels, "obama")))
    _, morning = run_job(built_gallery, executor, encoders, redis_url,
                         selfie_job(query(labels, "obama"), stage="Day-1/Morning"))
    assert {e["id"] for e in everywhere} - {e["id"] for e in morning}  # obama is in both stages
    assert morning and all(e["id"].startswith("Day-1/Morning/") for e in morning)
    # the stage's photos of him, found from its own rows (its query expansion draws on the stage alone)
    assert {e["id"] for e in morning} == {e["id"] for e in everywhere if e["id"].startswith("Day-1/Morning/")}


def test_limit_applies_after_the_excluded_images_are_left_out(
    built_gallery: Path, executor: ThreadPoolExecutor, encoders: EncoderPool, redis_url: str,
    labels: list[Label],
) -> None:
    selfie = query(labels, "obama", 1)
    _, full = run_job(built_gallery, executor, encoders, redis_url, selfie_job(selfie))
    assert len(full) >= 3

    async def exclude_best(redis: Redis) -> None:
        await redis.sadd("excluded_images", full[0]["id"], "Day-9/not-in-the-gallery.jpg")

    _, limited = run_job(built_gallery, executor, encoders, redis_url, selfie_job(selfie, limit=2), exclude_best)
    assert limited == full[1:3]


@pytest.mark.parametrize(
    "make_data, message, progress",
    [
        (lambda faces: selfie_job(faces / "queries" / "q06.jpg"), "no face found in the selfie", [25]),
        (lambda faces: {"image": _png(1, 1)}, "image too small: 1x1 pixels", []),
        (lambda faces: selfie_job(faces / "queries" / "q04.jpg", stage="Day-9"), "unknown stage 'Day-9'", []),
        (lambda faces: {"image": "not base64 at all!", "stage": "Day-9"}, "unknown stage 'Day-9'", []),
        (lambda faces: {"image": "aGVsbG8gd29ybGQ="}, "not an image", []),
        (lambda faces: {"stage": "Day-1"}, "image is missing", []),
    ],
)
def test_a_job_that_cannot_be_answered_fails_unrecoverably_with_its_reason(
    built_gallery: Path, executor: ThreadPoolExecutor, encoders: EncoderPool, redis_url: str, faces_dir: Path,
    make_data: Callable[[Path], Any], message: str, progress: list[int],
) -> None:
    stats = WorkerStats()
    job, error = run_job(built_gallery, executor, encoders, redis_url, make_data(faces_dir), stats=stats)
    assert isinstance(error, UnrecoverableError)
    assert message in str(error)
    assert job.progress == progress
    assert (stats.jobs_processed, stats.jobs_failed, stats.current_job) == (0, 1, None)


def test_without_a_gallery_jobs_fail_with_gallery_not_loaded(
    tmp_path: Path, executor: ThreadPoolExecutor, encoders: EncoderPool, redis_url: str, faces_dir: Path,
) -> None:
    _, error = run_job(tmp_path / "nothing-here", executor, encoders, redis_url,
                       selfie_job(faces_dir / "queries" / "q04.jpg"))
    assert isinstance(error, UnrecoverableError)
    assert str(error).startswith(f"gallery not loaded: no gallery at {tmp_path / 'nothing-here'}")


# -- the GPU engine's fallback ----------------------------------------------------------------------


class FailingCudaEngine:
    """Stands in for ONNX Runtime on CUDA: every call fails with `error`."""

    name = "onnx"
    device = "cuda"

    def __init__(self, error: Exception):
        self.error = error
        self.calls = 0

    def describe(self, chips: Any, jitters: int = 1) -> np.ndarray:
        self.calls += 1
        raise self.error


ORT_OOM = RuntimeError(
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "CUDA failure 2: out of memory ; GPU=0 ; hostname=gpu-1 ; expr=cudaMalloc(&p, size);"
)


def engine_failing_with(error: Exception) -> Callable[..., WorkerEngine]:
    def make(name: str, threads: int | None, on_fallback: Callable[[], None] | None = None, **_: Any) -> WorkerEngine:
        return WorkerEngine(FailingCudaEngine(error), lambda: make_worker_engine("onnx", threads), on_fallback)

    return make


def service_with_engine(built_gallery: Path, redis_url: str, make_engine: Callable[..., WorkerEngine]) -> WorkerService:
    settings = WorkerSettings(redis_url=redis_url, gallery=built_gallery, gpu_index=0)
    return WorkerService(settings, make_engine=make_engine, install_signals=False)


def test_cuda_out_of_memory_falls_back_to_the_cpu_for_that_job_and_shows_in_the_heartbeat(
    built_gallery: Path, executor: ThreadPoolExecutor, encoders: EncoderPool, redis_url: str,
    labels: list[Label],
) -> None:
    data = selfie_job(query(labels, "biden"))
    _, expected = run_job(built_gallery, executor, encoders, redis_url, data)
    service = service_with_engine(built_gallery, redis_url, engine_failing_with(ORT_OOM))
    with ThreadPoolExecutor(max_workers=1) as own:
        job, result = run_job(built_gallery, own, service.encoders, redis_url, data, stats=service.stats)
    assert result == expected and job.progress == [25, 50, 75, 100]
    record = service.record()
    assert record.cuda_oom_fallbacks == 1 and record.last_cuda_oom is not None
    assert record.use_cpu is False  # the worker's engine is the GPU one; only that job fell back
    assert (record.jobs_processed, record.jobs_failed) == (1, 0)


def test_other_gpu_errors_fail_the_job_instead_of_hiding(
    built_gallery: Path, redis_url: str, labels: list[Label],
) -> None:
    service = service_with_engine(
        built_gallery, redis_url, engine_failing_with(RuntimeError("CUDA error: an illegal memory access"))
    )
    with ThreadPoolExecutor(max_workers=1) as own:
        _, error = run_job(built_gallery, own, service.encoders, redis_url, selfie_job(query(labels, "biden")),
                           stats=service.stats)
    assert isinstance(error, UnrecoverableError)
    assert "could not process this job (RuntimeError: CUDA error: an illegal memory access)" in str(error)
    assert service.record().cuda_oom_fallbacks == 0


@pytest.mark.parametrize(
    "error, oom",
    [
        (ORT_OOM, True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("cudaErrorMemoryAllocation: GPU allocation failed"), True),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"), True),
        (MemoryError("out of memory"), False),
        (RuntimeError("out of memory"), False),  # the host's, not the GPU's
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    ],
)
def test_is_cuda_oom(error: Exception, oom: bool) -> None:
    assert is_cuda_oom(error) is oom


# -- the event loop -----------------------------------------------------------------------------


def test_the_event_loop_stays_free_while_a_job_runs(
    built_gallery: Path, encoders: EncoderPool, executor: ThreadPoolExecutor, redis_url: str, labels: list[Label],
    tmp_path: Path,
) -> None:
    gate = Gate(tmp_path / "gate")

    async def go() -> list[dict[str, Any]]:
        galleries = GalleryReloader(built_gallery)
        await galleries.refresh()
        redis = Redis.from_url(redis_url, decode_responses=True)
        handler = SearchJobs(galleries, encoders, executor, redis, WorkerStats())
        gate.close()
        job = asyncio.ensure_future(handler(RecordingJob(selfie_job(query(labels, "obama"))), "t"))
        try:
            # the job waits in the engine, on a thread of the pool; the loop meanwhile turns and talks to Redis
            while gate.entered() < 1:
                assert not job.done(), job.result()
                await asyncio.sleep(0.01)
            assert await redis.ping() and not job.done()
        finally:
            gate.open()
        result = await job
        await redis.aclose()
        return result

    with gated_engines(gate):
        assert asyncio.run(asyncio.wait_for(go(), timeout=120))  # obama's photos


# -- the gallery hot swap ---------------------------------------------------------------------------


def test_reloader_swaps_in_a_new_version_while_jobs_in_hand_keep_theirs(built_gallery: Path, tmp_path: Path) -> None:
    from indexer.cli import main as fsw_index

    gallery = tmp_path / "g"
    shutil.copytree(built_gallery, gallery)
    reloader = GalleryReloader(gallery)
    assert asyncio.run(reloader.refresh()) is True
    old = reloader.require()
    assert asyncio.run(reloader.refresh()) is False  # same version: nothing to do

    removed = CliRunner().invoke(fsw_index, ["remove", "Day-2/Evening", "--gallery", str(gallery)])
    assert removed.exit_code == 0, removed.output
    assert asyncio.run(reloader.refresh()) is True
    new = reloader.require()
    assert new.version > old.version and new.photo_count < old.photo_count
    assert "Day-2/Evening" in old.folders and "Day-2/Evening" not in new.folders
    probe = old.vectors[0]
    assert old.search(probe, "Day-2/Evening") or old.search(probe, "Day-1/Morning")  # the old one still answers


def test_reloader_keeps_serving_when_a_new_version_fails_to_load(built_gallery: Path, tmp_path: Path) -> None:
    gallery = tmp_path / "g"
    shutil.copytree(built_gallery, gallery)
    opened: list[Path] = []

    def open_once(folder: Path) -> Gallery:
        if opened:
            raise GalleryError("gallery.h5 holds fewer rows than its manifest names")
        opened.append(folder)
        return Gallery.open(folder)

    reloader = GalleryReloader(gallery, open_gallery=open_once)
    asyncio.run(reloader.refresh())
    serving = reloader.require()
    manifest = gallery / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace(f'"version": {serving.version}', f'"version": {serving.version + 1}'))
    assert asyncio.run(reloader.refresh()) is False
    assert reloader.require() is serving
    assert reloader.error == "gallery.h5 holds fewer rows than its manifest names"


def _png(width: int, height: int) -> str:
    return data_url(encoded(Image.new("RGB", (width, height), (200, 150, 120))), "image/png")


def test_the_record_shows_the_job_in_hand_while_it_runs(
    built_gallery: Path, encoders: EncoderPool, executor: ThreadPoolExecutor, redis_url: str, labels: list[Label],
    tmp_path: Path,
) -> None:
    service = WorkerService(WorkerSettings(redis_url=redis_url, gallery=built_gallery), install_signals=False)
    gate = Gate(tmp_path / "gate")

    async def go() -> Any:
        await service.galleries.refresh()
        redis = Redis.from_url(redis_url, decode_responses=True)
        handler = SearchJobs(service.galleries, encoders, executor, redis, service.stats)
        gate.close()
        job = asyncio.ensure_future(handler(RecordingJob(selfie_job(query(labels, "obama")), id="42"), "t"))
        try:
            while gate.entered() < 1:
                assert not job.done(), job.result()
                await asyncio.sleep(0.01)
            in_hand = service.record()
        finally:
            gate.open()
        await job
        await redis.aclose()
        return in_hand

    with gated_engines(gate):
        in_hand = asyncio.run(asyncio.wait_for(go(), timeout=120))
    assert (in_hand.status, in_hand.current_job) == ("busy", "42")
    after = service.record()
    assert (after.status, after.current_job, after.jobs_processed, after.jobs_failed) == ("online", None, 1, 0)
    assert after.search_p50_ms is not None and after.job_p50_ms is not None
    assert (after.gallery_version, after.gallery_photos) == (1, 19)
    assert after.gallery_faces == Gallery.open(built_gallery).face_count  # the loaded gallery's own count
