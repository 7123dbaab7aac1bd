"""The encode step of a build: photos to encode in, their faces (or why they have none) out.

`index_photos` (`indexer.pipeline`) finds, hashes and dedupes the photos, and records each outcome in
the gallery's writer, committing at checkpoints. Between the two, an `Encoding` turns `Task`s into
`Encoded` results, in whatever order they finish:

    LocalEncoding   a pool of encoder processes on this machine (`--jobs`): the default
    FleetEncoding   (`indexer.fleet`) batches on the fsw-encode queue, encoded by the fleet's fsw-workers

The pipeline tells the encoding after each commit (`committed()`), so that one holding results outside
the gallery (the fleet's, in Redis) can drop those the gallery now holds, and `close()`s it after the
last commit.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from indexer.defaults import JOBS, TASKS_PER_JOB
from matcher.encoder import Encoder, EncoderSettings, cores
from matcher.errors import FswError, ImageError
from matcher.files import open_photo
from matcher.images import load_scaled
from matcher.writer import GalleryWriter, PendingPhoto


@dataclass
class Task:
    """A photo to encode, as the indexer found it."""

    path: Path
    id: str
    sha256: str
    size: int
    mtime: float


@dataclass
class Encoded:
    """A task's outcome: the photo's faces as arrays (they pickle small), or why it failed; and who encoded it."""

    task: Task
    photo: PendingPhoto | None = None
    error: str | None = None
    worker: str | None = None  # the fsw-worker's id for a fleet build; None on this machine
    too_small: int = 0  # faces found but narrower than the settings' min_face: counted, not indexed


Record = Callable[[Encoded], None]


class Encoding(Protocol):
    def run(self, tasks: Iterator[Task], settings: EncoderSettings, writer: GalleryWriter, record: Record) -> None:
        """Encode every task and pass each outcome to `record` (which may commit); return when all are done."""

    def committed(self) -> None:
        """The writer has just committed every outcome recorded so far."""

    def close(self) -> None:
        """The build is over (finished or interrupted) and its last commit made."""


class LocalEncoding:
    """Encoder processes on this machine: `jobs` of them (default: every core), ONNX threads = cores // jobs."""

    def __init__(self, jobs: int | None = None):
        self.jobs = max(1, jobs or JOBS or cores())

    def run(self, tasks: Iterator[Task], settings: EncoderSettings, writer: GalleryWriter, record: Record) -> None:
        jobs = self.jobs
        worker_settings = EncoderSettings(**{**settings.as_dict(), "threads": max(1, cores() // jobs)})
        if jobs == 1:
            _init(worker_settings)
            for task in tasks:
                record(_encode(task))
            return
        context = multiprocessing.get_context("spawn")  # fork would copy ONNX Runtime's and OpenMP's threads
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init, initargs=(worker_settings,)) as pool:
            pending: set[Future[Encoded]] = set()
            try:
                for task in tasks:
                    pending.add(pool.submit(_encode, task))
                    if len(pending) >= jobs * TASKS_PER_JOB:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            record(f.result())
                for f in list(pending):
                    record(f.result())
            except BrokenProcessPool:
                raise FswError(
                    "an encoder process died (out of memory?); finished photos are committed: "
                    "run the same command again to resume, perhaps with fewer --jobs"
                ) from None
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    def committed(self) -> None:
        pass

    def close(self) -> None:
        pass


_encoder: Encoder | None = None


def _init(settings: EncoderSettings) -> None:
    global _encoder
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it commits
    _encoder = Encoder(settings)


def _encode(task: Task) -> Encoded:
    assert _encoder is not None
    try:
        # decoded no larger than the detector's largest pass needs: a 64 MP photo held 1 GB per process
        with open_photo(task.path, None) as f:  # in the tree (checked by the scan), and a regular file still
            image, scale = load_scaled(f, max_side=_encoder.settings.max_side)
        faces, too_small = _encoder.photo_faces(image, scale)
    except ImageError as e:
        return Encoded(task, error=str(e))
    except Exception as e:  # an encoder failure on one photo must not stop the build
        return Encoded(task, error=f"encoder error: {type(e).__name__}: {e}")
    return Encoded(task, PendingPhoto.from_faces(task.id, task.sha256, task.size, task.mtime, faces),
                   too_small=too_small)
