"""A gallery that was tampered with, damaged or written on a full disk: what readers and the writer do.

Issue 12: the FAISS file is checked against its recorded sha256 (and its size) before FAISS reads it, and
rebuilt from the row files when it fails; a manifest is validated field by field, its file names kept
inside the gallery folder; a failed write leaves no temporary file and is not tried twice; the writer's
lock is never followed through a link; the files are private to their owner unless the folder is shared
with a group (setgid).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from matcher import layout
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


