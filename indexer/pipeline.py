"""Indexing photos into a gallery: scan, hash, encode in parallel, append, commit.

`index_photos` is what `fsw-index build` and `fsw-index add` call. The encoding itself is an
`indexer.encoding.Encoding`: processes on this machine by default, the fleet's workers with `--fleet`
(`indexer.fleet`); finding, deduping, recording and committing are the same for both. Photos already in the gallery
(same id, size and modification time, or the same content under any id) are skipped, so running the
same command again after Ctrl-C or a crash resumes where the last commit left off. Work is committed
every `checkpoint_s` seconds and at the end; a photo that cannot be read is skipped with its reason,
and never stops the run. A write that fails (a full disk) stops it with that error and nothing more is
written: the last committed version stands.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from indexer.defaults import CHECKPOINT_S
from indexer.encoding import Encoded, Encoding, LocalEncoding, Task
from indexer.scan import ScanError, photo_id, scan_photos
from matcher import layout
from matcher.encoder import EncoderSettings
from matcher.errors import ImageError
from matcher.files import open_photo
from matcher.writer import GalleryWriter


@dataclass
class Progress:
    total: int
    done: int = 0
    faces: int = 0
    skipped: int = 0
    workers: int = 0  # fsw-workers seen encoding (a fleet build)
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
    faces_too_small: int = 0  # found, but narrower than the settings' min_face: not indexed
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    elapsed_s: float = 0.0
    version: int = 0
    interrupted: bool = False
    workers: list[str] = field(default_factory=list)  # a fleet build: the fsw-workers whose results it recorded

    def to_json(self) -> str:
        fields: dict[str, Any] = asdict(self)
        if not self.workers:
            del fields["workers"]  # a local build's summary reads as it always has
        return json.dumps(fields, indent=2)


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
    encoding: Encoding | None = None,
) -> Summary:
    """Index the photos at or under `paths` into `gallery`.

    build: `photo_root` is given and the gallery is created when absent (or resumed when it exists
    with the same root). add: the gallery exists and `paths` must lie below its photo root.
    jobs: encoder processes (default: every core); ONNX threads per process = cores // jobs.
    encoding: who encodes (default: `LocalEncoding(jobs)`; `indexer.fleet.FleetEncoding` for the fleet).
    """
    encoding = encoding or LocalEncoding(jobs)
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
        scan = scan_photos(paths, root)
        files = scan.photos
        if not files:
            where = ", ".join(str(p) for p in paths)
            raise ScanError(f"no photos (jpg, jpeg, png, webp) under {where}")
        summary = Summary(command=command, gallery=str(gallery), photos_found=len(files))
        progress = Progress(total=len(files))
        for path, reason in scan.skipped:  # outside the tree, not a regular file: never read
            summary.skipped.append({"path": _shown(path, root), "reason": reason})
        tasks = _tasks(files, root, writer, summary, progress)
        try:
            _record_all(tasks, settings, encoding, writer, summary, progress, checkpoint_s, on_progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            if writer.failed is not None:
                # A write failed (a full disk): none more, not even the summary. It would fail alike,
                # and its error would hide the first one, which is the one to report.
                encoding.close()
            else:
                try:
                    manifest = writer.commit(final=not summary.interrupted)
                    encoding.committed()
                finally:
                    encoding.close()
                summary.version = manifest.version
                summary.elapsed_s = round(time.monotonic() - started, 3)
                layout.atomic_write(Path(gallery) / layout.SUMMARY_NAME, summary.to_json())
    return summary


def _tasks(
    files: list[Path], root: Path, writer: GalleryWriter, summary: Summary, progress: Progress
) -> Iterator[Task]:
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

    def generate() -> Iterator[Task]:
        queued: dict[str, str] = {}
        for path, pid, st in todo:
            try:
                with open_photo(path, root) as f:  # a regular file in the tree, or nothing is read
                    sha = hashlib.file_digest(f, "sha256").hexdigest()
            except ImageError as e:  # the file was changed since the scan
                _skip(summary, progress, pid, str(e))
                continue
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
            yield Task(path, pid, sha, st.st_size, st.st_mtime)

    return generate()


def _shown(path: Path, root: Path) -> str:
    """A skipped path as the summary shows it: its id when it has one."""
    try:
        return photo_id(path, root)
    except ScanError:
        return str(path)


def _skip(summary: Summary, progress: Progress, pid: str, reason: str) -> None:
    summary.skipped.append({"path": pid, "reason": reason})
    progress.done += 1
    progress.skipped += 1


def _record_all(
    tasks: Iterator[Task],
    settings: EncoderSettings,
    encoding: Encoding,
    writer: GalleryWriter,
    summary: Summary,
    progress: Progress,
    checkpoint_s: float,
    on_progress: ProgressFn | None,
) -> None:
    """Run the encoding; record each outcome in the writer and the counts; commit every `checkpoint_s`."""
    last_commit = time.monotonic()
    workers: set[str] = set()

    def record(result: Encoded) -> None:
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
            summary.faces_too_small += result.too_small
            summary.photos_without_faces += not faces
            progress.faces += faces
        if result.worker is not None and result.worker not in workers:
            workers.add(result.worker)
            summary.workers = sorted(workers)
            progress.workers = len(workers)
        if on_progress:
            on_progress(progress)
        if time.monotonic() - last_commit >= checkpoint_s:
            writer.commit(final=False)
            encoding.committed()
            last_commit = time.monotonic()

    encoding.run(tasks, settings, writer, record)
