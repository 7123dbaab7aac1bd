"""A gallery that was tampered with, damaged or written on a full disk: what readers and the writer do.

Issue 12: the FAISS file is checked against its recorded sha256 (and its size) before FAISS reads it, and
rebuilt from the row files when it fails; a manifest is validated field by field, its file names kept
inside the gallery folder; a failed write leaves no temporary file and is not tried twice; the writer's
lock is never followed through a link; the files are private to their owner unless the folder is shared
with a group (setgid).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from indexer import cli
from indexer.encoding import Encoded
from indexer.pipeline import index_photos
from matcher import layout, writer
from matcher.encoder import EncoderSettings
from matcher.errors import GalleryError
from matcher.gallery import Gallery
from matcher.writer import GalleryWriter, PendingPhoto
from worker.reload import GalleryReloader

SETTINGS = {"model": "m1", "landmarks": "5-point", "detector": "hog", "upsample": 1, "jitters": 1, "max_side": 1600}
FACES = 400  # face rows in the test gallery: one person per photo, each photo one face


def _descriptor(i: int) -> np.ndarray:
    v = np.random.default_rng(i).normal(size=128)
    return (1.5 * v / np.linalg.norm(v)).astype(np.float32)


def _photo(i: int) -> PendingPhoto:
    return PendingPhoto(f"Day-1/p{i}.jpg", f"{i:064x}", 1000, 1.0, [(10, 60, 60, 10)], _descriptor(i)[None])


def _build(folder: Path, n: int = FACES) -> None:
    with GalleryWriter(folder, SETTINGS, folder.parent, create=True) as w:
        for i in range(n):
            w.add(_photo(i))
        w.commit()


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    _build(tmp_path / "g")
    return tmp_path / "g"


def _manifest(g: Path) -> dict:
    return json.loads((g / layout.MANIFEST_NAME).read_text())


def _edit_manifest(g: Path, **changes: object) -> None:
    (g / layout.MANIFEST_NAME).write_text(json.dumps({**_manifest(g), **changes}))


def _answers(g: Gallery, people: list[int]) -> list[list[str]]:
    return [[m.id for m in g.search(_descriptor(i))] for i in people]


# -- the FAISS file: checked before it is read (deliverable 4) -------------------------------------------


def _index_header(g: Path) -> tuple[Path, int]:
    """The index file and the length of its header (what precedes the vectors)."""
    path = g / _manifest(g)["index"]
    return path, path.stat().st_size - FACES * 128 * 4


def test_a_swapped_vector_in_the_index_is_not_trusted_the_rows_answer(gallery, caplog):
    path, header = _index_header(gallery)
    data = bytearray(path.read_bytes())
    row = 512  # person 1's vector written over person 0's: a search for 1 would find photo 0 at similarity 1
    data[header : header + row] = data[header + row : header + 2 * row]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        g = Gallery.open(gallery)
    assert _answers(g, [0, 1, 2]) == [["Day-1/p0.jpg"], ["Day-1/p1.jpg"], ["Day-1/p2.jpg"]]
    [line] = [r.getMessage() for r in caplog.records if path.name in r.getMessage()]
    assert "sha256" in line and "row files" in line


def test_an_index_changed_after_a_load_is_checked_again(gallery, caplog):
    assert _answers(Gallery.open(gallery), [0]) == [["Day-1/p0.jpg"]]  # checked, and remembered as sound
    path, header = _index_header(gallery)
    stamp = path.stat()
    data = bytearray(path.read_bytes())
    data[header : header + 512] = data[header + 512 : header + 1024]
    path.write_bytes(bytes(data))  # same file, same size: its times tell it changed
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    with caplog.at_level(logging.WARNING):
        assert _answers(Gallery.open(gallery), [0, 1]) == [["Day-1/p0.jpg"], ["Day-1/p1.jpg"]]
    assert any(path.name in r.getMessage() for r in caplog.records)


_OPEN_IN_A_CHILD = """
import sys
from matcher.gallery import Gallery
from matcher.errors import GalleryError
try:
    g = Gallery.open(sys.argv[1])
except GalleryError as e:
    print("refused:", e)
else:
    print("faces", g.face_count)
# the peak of this program's own memory: VmHWM starts again at exec, where the parent's size, which the
# forked child counted until its exec, stays in ru_maxrss
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(peak.split()[1]) / 1024, file=sys.stderr)
"""


def _open_in_a_child(g: Path, out: Path) -> tuple[str, str, float]:
    """Open the gallery in a fresh process: what it printed and logged, and its own peak RSS in MiB."""
    err = out.with_suffix(".err")
    with out.open("w") as f, err.open("w") as e:
        child = subprocess.run([sys.executable, "-c", _OPEN_IN_A_CHILD, str(g)], stdout=f, stderr=e)
    assert child.returncode == 0, err.read_text()
    logged, _, peak = err.read_text().rstrip().rpartition("\n")
    return out.read_text().strip(), logged, float(peak)


@pytest.mark.parametrize("sha_recorded", [False, True], ids=["file-altered", "file-and-manifest-altered"])
def test_an_index_whose_size_field_asks_for_gigabytes_is_not_read(gallery, sha_recorded):
    path, header = _index_header(gallery)
    data = bytearray(path.read_bytes())
    assert struct.unpack("<Q", data[header - 8 : header]) == (FACES * 128,)  # the vector's length, in floats
    data[header - 8 : header] = struct.pack("<Q", 1 << 30)  # 4 GiB of floats
    path.write_bytes(bytes(data))
    if sha_recorded:  # whoever altered the file also recorded its hash: only the size check is left
        _edit_manifest(gallery, index_sha256=hashlib.sha256(bytes(data)).hexdigest())
    said, logged, peak_mib = _open_in_a_child(gallery, gallery.parent / "child.out")
    assert said == f"faces {FACES}"  # rebuilt from the row files
    assert path.name in logged and "read from the row files instead" in logged
    # a bound, not a time: the child's imports (numpy, h5py, faiss) cost ~150 MiB; the field asked for 4,096
    assert peak_mib < 1024, peak_mib


def test_a_gallery_that_fails_the_same_way_is_not_retried(gallery, monkeypatch):
    (gallery / layout.H5_NAME).write_bytes(b"not hdf5")
    calls = []
    load = Gallery._load.__func__  # type: ignore[attr-defined]

    def counted(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Gallery, "_load", classmethod(counted))
    with pytest.raises(GalleryError, match="could not read the gallery"):
        Gallery.open(gallery)
    assert len(calls) == 1


def test_a_load_that_fails_because_a_writer_committed_meanwhile_is_retried(gallery, monkeypatch):
    load = Gallery._load.__func__  # type: ignore[attr-defined]
    calls = []

    def commit_first(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:  # a writer commits version 2 under the reader, which then finds a file gone
            with GalleryWriter(gallery, SETTINGS) as w:
                w.add(_photo(FACES))
                w.commit()
            raise OSError(errno.ENOENT, "No such file or directory")
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Gallery, "_load", classmethod(commit_first))
    assert Gallery.open(gallery).version == 2 and len(calls) == 2


# -- the manifest: validated field by field (deliverable 8) ---------------------------------------------


BAD_MANIFESTS = {
    "photos-a-string": ({"photos": "x"}, "photos"),
    "segments-a-string": ({"segments": "gallery-v2.h5"}, "segments"),
    "segment-not-an-object": ({"segments": ["gallery-v2.h5"]}, "segments[0]"),
    "segment-count-a-string": ({"segments": [{"file": "gallery-v2.h5", "photos": "1", "faces": 0}]},
                               "segments[0].photos"),
    "version-null": ({"version": None}, "version"),
    "index-absolute": ({"index": "/etc/passwd"}, "index"),
    "index-up": ({"index": "../x.faiss"}, "index"),
    "index-in-a-subfolder": ({"index": "sub/index-v1.faiss"}, "index"),
    "segment-file-up": ({"segments": [{"file": "../x.h5", "photos": 0, "faces": 0}]}, "segments[0].file"),
    "segment-file-absolute": ({"segments": [{"file": "/tmp/x.h5", "photos": 0, "faces": 0}]}, "segments[0].file"),
    "segment-file-backslash": ({"segments": [{"file": "..\\x.h5", "photos": 0, "faces": 0}]}, "segments[0].file"),
    "index-sha-not-hex": ({"index_sha256": 12}, "index_sha256"),
    "settings-a-list": ({"settings": ["hog"]}, "settings"),
    "photo-root-a-number": ({"photo_root": 3}, "photo_root"),
    "index-faces-past-faces": ({"index_faces": FACES + 1}, "index_faces"),
}


@pytest.mark.parametrize(("changes", "field"), BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_a_malformed_manifest_is_refused_naming_the_field(gallery, changes, field):
    _edit_manifest(gallery, **changes)
    with pytest.raises(GalleryError, match=r"manifest\.json: malformed [^(]*" + re.escape(field)):
        Gallery.open(gallery)


def test_the_worker_keeps_serving_the_previous_version_when_the_new_manifest_is_bad(gallery, caplog):
    async def go() -> None:
        reloader = GalleryReloader(gallery)
        assert await reloader.refresh() and reloader.require().version == 1
        for changes, field in [({"version": 2, "photos": "x"}, "photos"), ({"version": None}, "version"),
                               ({"version": 2, "index": "/etc/passwd"}, "index")]:
            _edit_manifest(gallery, **changes)
            assert not await reloader.refresh()
            assert reloader.require().version == 1
            assert reloader.error is not None and field in reloader.error

    saved = _manifest(gallery)
    with caplog.at_level(logging.WARNING, "fsw.worker"):
        asyncio.run(go())
    assert any("still serving version 1" in r.getMessage() for r in caplog.records)
    assert saved["version"] == 1


def test_a_worker_started_on_a_bad_manifest_waits_and_says_so_until_a_good_one_appears(gallery, caplog):
    good = _manifest(gallery)
    _edit_manifest(gallery, segments=["x"])  # a TypeError at start on main: the worker exited

    async def go() -> None:
        reloader = GalleryReloader(gallery, poll_s=0.01, waiting_log_s=0.05)
        stop = asyncio.Event()
        watching = asyncio.ensure_future(reloader.watch(stop))
        try:
            while len(_waiting_lines(caplog)) < 3:
                await asyncio.sleep(0.01)
            assert reloader.current is None
            (gallery / layout.MANIFEST_NAME).write_text(json.dumps(good))
            while reloader.current is None:
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await watching

    with caplog.at_level(logging.WARNING, "fsw.worker"):
        asyncio.run(asyncio.wait_for(go(), 60))
    lines = _waiting_lines(caplog)
    assert all("segments[0]" in line for line in lines) and len(set(lines)) == 1


def _waiting_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]


# -- a failed write (deliverable 9) -----------------------------------------------------------------------


class _Encoding:
    """Encodes nothing: each task's photo gets the face of person `task.size`."""

    def run(self, tasks, settings, writer, record):  # type: ignore[no-untyped-def]
        for t in tasks:
            record(Encoded(t, PendingPhoto(t.id, t.sha256, t.size, t.mtime, [(1, 2, 2, 1)], _descriptor(t.size)[None])))

    def committed(self) -> None:
        pass

    def close(self) -> None:
        pass


def _photo_files(folder: Path, first: int, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(first, first + n):
        (folder / f"p{i}.jpg").write_bytes(b"\xff\xd8" + bytes([i % 256]) * i)  # size i: the encoding's person
        out.append(folder / f"p{i}.jpg")
    return out


def _disk_full_after(monkeypatch: pytest.MonkeyPatch, datasets: int) -> list[str]:
    """Every row file write fails with ENOSPC after `datasets` datasets are written; returns the files tried."""
    tried: list[str] = []
    written = [0]
    write_file, dataset = writer._write_file, writer._dataset

    def counted_write_file(folder, name, *args):  # type: ignore[no-untyped-def]
        tried.append(name)
        return write_file(folder, name, *args)

    def full(*args):  # type: ignore[no-untyped-def]
        written[0] += 1
        if written[0] > datasets:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return dataset(*args)

    monkeypatch.setattr(writer, "_write_file", counted_write_file)
    monkeypatch.setattr(writer, "_dataset", full)
    return tried


def test_a_full_disk_during_add_leaves_the_last_version_and_no_temporary_file(tmp_path, monkeypatch):
    photos, g = tmp_path / "photos", tmp_path / "g"
    _photo_files(photos / "Day-1", 1, 3)
    settings = EncoderSettings()
    index_photos(g, [photos], settings, photo_root=photos, encoding=_Encoding())
    before = {p.name: p.read_bytes() for p in g.iterdir()}
    _photo_files(photos / "Day-2", 4, 3)
    tried = _disk_full_after(monkeypatch, datasets=3)
    with pytest.raises(GalleryError, match="No space left on device") as e:
        index_photos(g, [photos / "Day-2"], settings, command="add", checkpoint_s=0, encoding=_Encoding())
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert len(tried) == 1  # the checkpoint's write failed; no second write was tried after it
    assert {p.name: p.read_bytes() for p in g.iterdir()} == before  # no .tmp, no new file, last-run.json kept
    assert Gallery.open(g).version == 1


def test_the_cli_reports_a_full_disk_in_one_line_and_exits_1(gallery, monkeypatch):
    _disk_full_after(monkeypatch, datasets=0)
    before = sorted(p.name for p in gallery.iterdir())
    result = CliRunner().invoke(cli.main, ["remove", "Day-1/p3.jpg", "--gallery", str(gallery)])
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert "No space left on device" in line and "version 1" in line
    assert sorted(p.name for p in gallery.iterdir()) == before


def test_the_cli_reports_any_os_error_in_one_line(tmp_path, monkeypatch):
    def fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "g" / layout.SUMMARY_NAME))

    monkeypatch.setattr(cli, "index_photos", fails)
    (tmp_path / "photos").mkdir()
    result = CliRunner().invoke(cli.main, ["build", str(tmp_path / "photos"), "--gallery", str(tmp_path / "g")])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "Input/output error" in line and layout.SUMMARY_NAME in line


# -- the writer's lock and the files' permissions (deliverable 10) ----------------------------------------


def test_a_lock_file_linked_to_another_file_is_refused_and_the_file_left_alone(gallery, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (gallery / layout.LOCK_NAME).unlink()
    (gallery / layout.LOCK_NAME).symlink_to(precious)
    with pytest.raises(GalleryError, match="symbolic link"):
        GalleryWriter(gallery, SETTINGS)
    (gallery / layout.LOCK_NAME).unlink()
    os.link(precious, gallery / layout.LOCK_NAME)  # a hard link, likewise
    with pytest.raises(GalleryError, match="link"):
        GalleryWriter(gallery, SETTINGS)
    assert precious.read_text() == "keep me"


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


@pytest.fixture
def usual_umask():  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_gallery_is_private_to_its_owner(tmp_path, usual_umask):
    photos, g = tmp_path / "photos", tmp_path / "g"
    _photo_files(photos / "Day-1", 1, 3)
    index_photos(g, [photos], EncoderSettings(), photo_root=photos, encoding=_Encoding())
    _photo_files(photos / "Day-2", 4, 1)
    index_photos(g, [photos / "Day-2"], EncoderSettings(), command="add", encoding=_Encoding())
    assert stat.S_IMODE(g.stat().st_mode) == 0o700
    modes = _modes(g)
    assert {layout.MANIFEST_NAME, layout.H5_NAME, "gallery-v2.h5", "index-v1.faiss", layout.LOCK_NAME,
            layout.SUMMARY_NAME} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


def test_an_old_gallery_s_new_files_are_private_too(gallery, usual_umask):
    for p in gallery.iterdir():
        p.chmod(0o644)
    with GalleryWriter(gallery, SETTINGS) as w:
        w.add(_photo(FACES))
        w.commit()
    modes = _modes(gallery)
    assert modes["gallery-v2.h5"] == modes[layout.MANIFEST_NAME] == 0o600


def test_a_setgid_folder_shares_the_gallery_with_its_group(tmp_path, usual_umask):
    g = tmp_path / "g"
    g.mkdir()
    g.chmod(0o2775)  # what an operator does to let workers of the folder's group read it
    _build(g)
    assert stat.S_IMODE(g.stat().st_mode) == 0o2770  # others lose their access; the group keeps its own
    assert set(_modes(g).values()) == {0o640}, _modes(g)
