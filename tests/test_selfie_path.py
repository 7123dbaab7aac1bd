"""One selfie path: `fsw-index search` and a worker job give the same answer and the same refusal for the
same bytes (a face, a stranger, no face, an unknown stage, too small, not an image, too many pixels)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bullmq import UnrecoverableError
from click.testing import CliRunner
from PIL import Image
from redis.asyncio import Redis

from indexer.cli import main as fsw_index
from matcher.defaults import MIN_SELFIE_SIDE, SELFIE_MAX_PIXELS
from testkit.jobs import RecordingJob
from worker.jobs import EncoderPool, SearchJobs
from worker.reload import GalleryReloader
from worker.stats import WorkerStats
from worker.submit import job_data


@dataclass(frozen=True)
class Answer:
    """What one path made of a selfie: the result array, or the refusal's message."""

    result: list[dict[str, Any]] | None = None
    refusal: str | None = None


def cli_answer(gallery: Path, selfie: Path, stage: str) -> Answer:
    run = CliRunner().invoke(fsw_index, ["search", str(selfie), "--gallery", str(gallery), "--stage", stage, "--json"])
    if run.exit_code == 0:
        return Answer(result=json.loads(run.output))
    assert run.exit_code == 1 and run.exception is not None and isinstance(run.exception, SystemExit), run.output
    assert run.output.startswith("Error: "), run.output
    return Answer(refusal=run.output.removeprefix("Error: ").strip())


def job_answer(gallery: Path, selfie: Path, stage: str, redis_url: str) -> Answer:
    async def go() -> Answer:
        galleries = GalleryReloader(gallery)
        await galleries.refresh()
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            with ThreadPoolExecutor(max_workers=1) as executor:
                handler = SearchJobs(galleries, EncoderPool("onnx"), executor, redis, WorkerStats())
                try:
                    return Answer(result=await handler(RecordingJob(job_data(selfie, stage)), "token"))
                except UnrecoverableError as e:
                    return Answer(refusal=str(e))
        finally:
            await redis.aclose()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def selfies(faces_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("selfies")
    too_small = folder / "too-small.png"
    Image.new("RGB", (MIN_SELFIE_SIDE - 1, 200), (128, 128, 128)).save(too_small)
    not_an_image = folder / "not-an-image.jpg"
    not_an_image.write_bytes(b"hello world, this is no JPEG")
    too_many_pixels = folder / "too-many-pixels.png"
    side = int(SELFIE_MAX_PIXELS**0.5) + 1
    Image.new("1", (side, side)).save(too_many_pixels)  # refused from its header, never decoded
    queries = faces_dir / "queries"
    return {
        "obama": queries / "q04.jpg",
        "kit_harington": queries / "q03.jpg",
        "penny": queries / "q17.jpg",
        "stranger": queries / "q18.jpg",
        "no face": queries / "q06.jpg",
        "too small": too_small,
        "not an image": not_an_image,
        "too many pixels": too_many_pixels,
    }


@pytest.mark.parametrize(
    "name, stage, expect",
    [
        ("obama", "", "photos"),
        ("kit_harington", "", "photos"),
        ("penny", "Day-1", "photos"),
        ("stranger", "", "no photos"),
        ("obama", "Day-9", "unknown stage 'Day-9'"),
        ("no face", "", "no face found in the selfie"),
        ("too small", "", f"image too small: {MIN_SELFIE_SIDE - 1}x200 pixels"),
        ("not an image", "", "not an image"),
        ("too many pixels", "", "image too large"),
    ],
)
def test_fsw_index_search_and_a_job_answer_the_same_selfie_alike(
    built_gallery: Path, redis_url: str, selfies: dict[str, Path], name: str, stage: str, expect: str,
) -> None:
    selfie = selfies[name]
    cli = cli_answer(built_gallery, selfie, stage)
    job = job_answer(built_gallery, selfie, stage, redis_url)
    assert cli == job, f"{name}: fsw-index search gave {cli}, a job gave {job}"
    if expect == "photos":
        assert job.result, name
    elif expect == "no photos":
        assert job.result == [], name
    else:
        assert job.refusal is not None and expect in job.refusal, job
