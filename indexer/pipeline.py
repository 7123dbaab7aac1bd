"""Indexing photos into a gallery: scan, hash, encode in parallel, append, commit.

`index_photos` is what `fsw-index build` and `fsw-index add` call. Photos already in the gallery
(same id, size and modification time, or the same content under any id) are skipped, so running the
same command again after Ctrl-C or a crash resumes where the last commit left off. Work is committed
every `checkpoint_s` seconds and at the end; a photo that cannot be read is skipped with its reason,
and never stops the run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from indexer.defaults import CHECKPOINT_S, JOBS, TASKS_PER_JOB
from indexer.scan import ScanError, find_photos, photo_id
from matcher import layout
from matcher.encoder import Encoder, EncoderSettings, cores
from matcher.errors import FswError, ImageError
from matcher.images import load_image
from matcher.writer import GalleryWriter, PendingPhoto


@dataclass
class Progress:
    total: int
    done: int = 0
    faces: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Summary:
    """What a build or add did; printed at the end and saved as last-run.json in the gallery."""

    command: str
    gallery: str
    photos_found: int = 0
    photos_indexed: int = 0
    photos_already_indexed: int = 0
    photos_without_faces: int = 0
    faces: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    elapsed_s: float = 0.0
    version: int = 0
    interrupted: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class _Task:
    path: Path
    id: str
    sha256: str
    size: int
    mtime: float


@dataclass
class _Encoded:
    """An encoder process's answer: the photo's faces as arrays (they pickle small), or why it failed."""

    task: _Task
    photo: PendingPhoto | None = None
    error: str | None = None


ProgressFn = Callable[[Progress], None]


def index_photos(
    gallery: str | os.PathLike[str],
    paths: list[Path],
    settings: EncoderSettings,
    *,
    photo_root: Path | None = None,
    jobs: int | None = None,
    command: str = "build",
    checkpoint_s: float = CHECKPOINT_S,
    on_progress: ProgressFn | None = None,
) -> Summary:
    """Index the photos at or under `paths` into `gallery`.

    build: `photo_root` is given and the gallery is created when absent (or resumed when it exists
    with the same root). add: the gallery exists and `paths` must lie below its photo root.
    jobs: encoder processes (default: every core); ONNX threads per process = cores // jobs.
    """
    started = time.monotonic()
    creating = photo_root is not None
    if creating:
        assert photo_root is not None
        if not photo_root.is_dir():
            raise ScanError(f"{photo_root} is not a folder of photos")
    with GalleryWriter(gallery, settings.recorded(), photo_root, f"fsw-index {command}", create=creating) as writer:
        root = writer.photo_root
        if creating and photo_root is not None and root != photo_root.resolve():
            raise ScanError(
                f"gallery at {gallery} indexes photos under {root}, not {photo_root.resolve()}: "
                "use `fsw-index add` for photos below that root, or another --gallery"
            )
        files = find_photos(paths)
        if not files:
            where = ", ".join(str(p) for p in paths)
            raise ScanError(f"no photos (jpg, jpeg, png, webp) under {where}")
        summary = Summary(command=command, gallery=str(gallery), photos_found=len(files))
        progress = Progress(total=len(files))
        tasks = _tasks(files, root, writer, summary, progress)
        try:
            _encode_all(tasks, settings, jobs, writer, summary, progress, checkpoint_s, on_progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            manifest = writer.commit(final=not summary.interrupted)
            summary.version = manifest.version
            summary.elapsed_s = round(time.monotonic() - started, 3)
            layout.atomic_write(Path(gallery) / layout.SUMMARY_NAME, summary.to_json())
    return summary


def _tasks(
    files: list[Path], root: Path, writer: GalleryWriter, summary: Summary, progress: Progress
) -> Iterator[_Task]:
    """Photos that need encoding, hashed; skips unchanged and duplicate ones (counted in `summary`)."""
    todo: list[tuple[Path, str, os.stat_result]] = []
    for path in files:
        pid = photo_id(path, root)
        try:
            st = path.stat()
        except OSError as e:
            _skip(summary, progress, pid, f"cannot read file: {e.strerror}")
            continue
        if writer.known.unchanged(pid, st.st_size, st.st_mtime):
            summary.photos_already_indexed += 1
            progress.done += 1
        else:
            todo.append((path, pid, st))

    def generate() -> Iterator[_Task]:
        queued: dict[str, str] = {}
        for path, pid, st in todo:
            try:
                sha = layout.file_sha256(path)
            except OSError as e:
                _skip(summary, progress, pid, f"cannot read file: {e.strerror}")
                continue
            same = writer.known.by_hash.get(sha) or queued.get(sha)
            if same == pid:
                summary.photos_already_indexed += 1
                progress.done += 1
                continue
            if same is not None:
                _skip(summary, progress, pid, f"same content as {same}, indexed once")
                continue
            queued[sha] = pid
            yield _Task(path, pid, sha, st.st_size, st.st_mtime)

    return generate()


def _skip(summary: Summary, progress: Progress, pid: str, reason: str) -> None:
    summary.skipped.append({"path": pid, "reason": reason})
    progress.done += 1
    progress.skipped += 1


def _encode_all(
    tasks: Iterator[_Task],
    settings: EncoderSettings,
    jobs: int | None,
    writer: GalleryWriter,
    summary: Summary,
    progress: Progress,
    checkpoint_s: float,
    on_progress: ProgressFn | None,
) -> None:
    jobs = max(1, jobs or JOBS or cores())
    threads = max(1, cores() // jobs)
    last_commit = time.monotonic()

    def record(result: _Encoded) -> None:
        nonlocal last_commit
        t = result.task
        if result.error is not None:
            _skip(summary, progress, t.id, result.error)
        else:
            progress.done += 1
            assert result.photo is not None
            writer.add(result.photo)
            faces = result.photo.face_count
            summary.photos_indexed += 1
            summary.faces += faces
            summary.photos_without_faces += not faces
            progress.faces += faces
        if on_progress:
            on_progress(progress)
        if time.monotonic() - last_commit >= checkpoint_s:
            writer.commit(final=False)
            last_commit = time.monotonic()

    worker_settings = EncoderSettings(**{**settings.as_dict(), "threads": threads})
    if jobs == 1:
        _init(worker_settings)
        for task in tasks:
            record(_encode(task))
        return
    context = multiprocessing.get_context("spawn")  # fork would copy ONNX Runtime's and OpenMP's threads
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init, initargs=(worker_settings,)) as pool:
        pending: set[Future[_Encoded]] = set()
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


_encoder: Encoder | None = None


def _init(settings: EncoderSettings) -> None:
    global _encoder
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it commits
    _encoder = Encoder(settings)


def _encode(task: _Task) -> _Encoded:
    assert _encoder is not None
    try:
        image = load_image(task.path)
        faces = _encoder.faces(image)
    except ImageError as e:
        return _Encoded(task, error=str(e))
    except Exception as e:  # an encoder failure on one photo must not stop the build
        return _Encoded(task, error=f"encoder error: {type(e).__name__}: {e}")
    return _Encoded(task, PendingPhoto.from_faces(task.id, task.sha256, task.size, task.mtime, faces))

