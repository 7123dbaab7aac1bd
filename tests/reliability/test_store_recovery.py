"""What the gallery store leaves at each step of a commit, and how the next writer recovers from it.

The random kills of test_commit_kill.py land where they land; these tests stop a commit at each of its
renames in turn (the steps that publish something), deterministically, and check the same promises:
the last committed version loads and answers as before, `verify_gallery` finds nothing wrong, and the
next writer commits the same changes to the same result. They also pin the store's costs: a small
`add` writes a small file and leaves the big ones alone, and the number of files stays logarithmic.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from matcher import layout
from matcher.encoder import Face
from matcher.errors import GalleryError
from matcher.gallery import Gallery
from matcher.verify import verify_gallery
from matcher.writer import GalleryWriter, PendingPhoto

from .writer_loop import SETTINGS, changes_at, content_hash, expected


class Crash(Exception):
    """Stands for a SIGKILL at a chosen point: nothing after it runs."""


def _commit_version(w: GalleryWriter, v: int, batch: int) -> None:
    c = changes_at(v, batch)
    w.remove(c.removed)
    for pid, faces in c.added.items():
        w.add(PendingPhoto.from_faces(pid, content_hash(pid, faces), 100, 1.0, [Face((1, 2, 3, 4), d) for d in faces]))
    w.commit(final=c.final)


def _build(folder: Path, versions: int, batch: int) -> None:
    with GalleryWriter(folder, SETTINGS, folder.parent, create=True) as w:
        for v in range(1, versions + 1):
            _commit_version(w, v, batch)


def _state(folder: Path) -> tuple[int, dict[str, list[tuple[float, ...]]]]:
    """The version and, per live photo, its descriptors as loaded and as found by search."""
    g = Gallery.open(folder, attempts=1)
    faces: dict[str, list[tuple[float, ...]]] = {}
    for r in np.flatnonzero(g.face_live):
        faces.setdefault(str(g.photo_ids[g.face_photo[r]]), []).append(tuple(g.vectors[r].tolist()))
    for pid, vectors in list(faces.items())[:20]:
        assert g.search(np.asarray(vectors[0], np.float32))[0].id == pid
    live = {str(p) for p in g.photo_ids[g.photo_live]}
    return g.version, {p: faces.get(p, []) for p in sorted(live)}


def _expected_state(version: int, batch: int) -> dict[str, list[tuple[float, ...]]]:
    return {p: [tuple(d.tolist()) for d in faces] for p, faces in sorted(expected(version, batch).items())}


def _renames_in_a_commit(tmp_path: Path, versions: int, batch: int) -> int:
    folder = tmp_path / "count"
    _build(folder, versions - 1, batch)
    calls = 0
    real = os.replace

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, GalleryWriter(folder, SETTINGS) as w:
        mp.setattr(os, "replace", counting)
        _commit_version(w, versions, batch)
    return calls


def _crashing_replace(stop: int):  # type: ignore[no-untyped-def]
    """os.replace that raises Crash at its `stop`-th call instead of renaming."""
    real, calls = os.replace, 0

    def crashing(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == stop:
            raise Crash
        return real(*args, **kwargs)

    return crashing


# Versions 1..7 of writer_loop's content: version 8 merges down to gallery.h5 with batch 40 (checked
# below), version 9 adds a small segment, version 6 rewrites the index and removes a stage.
@pytest.mark.parametrize("version", [6, 8, 9])
def test_a_commit_stopped_at_each_rename_keeps_the_last_version(tmp_path, version):
    batch = 40
    renames = _renames_in_a_commit(tmp_path, version, batch)
    assert renames >= 2  # a row file and the manifest at least
    for stop in range(1, renames + 1):
        folder = tmp_path / f"stop{stop}"
        _build(folder, version - 1, batch)
        before = _state(folder)
        with pytest.MonkeyPatch.context() as mp, GalleryWriter(folder, SETTINGS) as w:
            mp.setattr(os, "replace", _crashing_replace(stop))
            with pytest.raises(Crash):
                _commit_version(w, version, batch)
        assert verify_gallery(folder) == [], f"stopped at rename {stop}"
        assert _state(folder) == before, f"stopped at rename {stop}"
        with GalleryWriter(folder, SETTINGS) as w:
            _commit_version(w, version, batch)
        assert verify_gallery(folder) == []
        assert _state(folder) == (version, _expected_state(version, batch)), f"stopped at rename {stop}"
        assert {p.name for p in folder.iterdir() if p.name.endswith(".tmp")} == set()


def test_a_merge_down_to_the_base_is_among_the_cases(tmp_path):
    folder = tmp_path / "g"
    _build(folder, 7, 40)
    before = layout.read_manifest(folder)
    with GalleryWriter(folder, SETTINGS) as w:
        _commit_version(w, 8, 40)
    assert before.segments and layout.read_manifest(folder).segments == []


def test_a_small_add_writes_a_small_file_and_files_stay_few(tmp_path):
    folder = tmp_path / "g"
    _build(folder, 4, 500)
    base = folder / layout.H5_NAME
    stamp = (base.stat().st_ino, base.stat().st_mtime_ns)
    rng = np.random.default_rng(1)
    with GalleryWriter(folder, SETTINGS) as w:
        for i in range(60):
            w.add(PendingPhoto.from_faces(f"small/{i}.jpg", f"{i:064x}", 1, 1.0,
                                          [Face((1, 2, 3, 4), rng.normal(size=128))]))
            w.commit()
            m = w.manifest
            assert len(m.segments) <= int(np.log2(m.photos + m.faces)) + 1
    assert (base.stat().st_ino, base.stat().st_mtime_ns) == stamp, "small adds rewrote gallery.h5"
    sizes = sorted(p.stat().st_size for p in folder.glob("gallery-v*.h5"))
    assert sizes[0] < base.stat().st_size / 20
    assert verify_gallery(folder) == []
    assert len(Gallery.open(folder).search(rng.normal(size=128), threshold=0.2)) <= 1


def test_a_build_killed_while_creating_the_gallery_can_be_run_again(tmp_path):
    folder = tmp_path / "g"
    _build(folder, 0, 1)  # what creation writes: gallery.h5 and a manifest
    shutil.copy(folder / layout.H5_NAME, tmp_path / "empty.h5")
    (folder / layout.MANIFEST_NAME).unlink()  # killed after renaming gallery.h5, before the manifest
    (folder / f".{layout.H5_NAME}.tmp").write_bytes(b"half a file")
    _build(folder, 2, 10)
    assert _state(folder) == (2, _expected_state(2, 10))
    other = tmp_path / "other"  # a gallery.h5 with rows and no manifest is not ours to replace
    _build(other, 1, 10)
    (other / layout.MANIFEST_NAME).unlink()
    with pytest.raises(GalleryError, match="not empty and not an fsw gallery"):
        _build(other, 1, 10)


def test_a_run_committed_at_checkpoints_still_gets_its_index(tmp_path):
    folder = tmp_path / "g"
    with GalleryWriter(folder, SETTINGS, tmp_path, create=True) as w:
        for v in range(1, 4):
            c = changes_at(v, 20)
            for pid, faces in c.added.items():
                w.add(PendingPhoto.from_faces(pid, content_hash(pid, faces), 1, 1.0,
                                              [Face((1, 2, 3, 4), d) for d in faces]))
            w.commit(final=False)
        version = w.manifest.version
        w.commit(final=True)  # what index_photos does at the end, with nothing left to add
    m = layout.read_manifest(folder)
    assert m.index == f"index-v{version}.faiss" and m.index_faces == m.faces and m.version == version
    assert verify_gallery(folder) == []
