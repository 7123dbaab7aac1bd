"""The gallery on disk: versions, the writer's lock, settings, removal, crash leftovers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import h5py
import numpy as np
import pytest

from matcher import layout
from matcher.encoder import Face
from matcher.errors import GalleryError, GalleryLockedError, SettingsMismatchError, StageError
from matcher.gallery import Gallery
from matcher.writer import GalleryWriter, PendingPhoto

SETTINGS = {"model": "m1", "landmarks": "5-point", "detector": "hog", "upsample": 1, "jitters": 1, "max_side": 1600}


def _face(rng: np.random.Generator, near: np.ndarray | None = None, d: float = 0.0) -> Face:
    if near is None:
        v = rng.normal(size=128)
        v *= 1.5 / np.linalg.norm(v)
    else:
        step = rng.normal(size=128)
        v = near + d * step / np.linalg.norm(step)
    return Face((10, 60, 60, 10), v.astype(np.float32))


def _photo(pid: str, faces: list[Face]) -> PendingPhoto:
    return PendingPhoto.from_faces(pid, f"{abs(hash(pid)):064x}"[:64], 1000, 1.0, faces)


@pytest.fixture
def person() -> np.ndarray:
    return _face(np.random.default_rng(1)).descriptor


def _build(folder: Path, photos: list[PendingPhoto]) -> None:
    with GalleryWriter(folder, SETTINGS, folder.parent, create=True) as w:
        for p in photos:
            w.add(p)
        w.commit()


def test_search_covers_a_stage_at_folder_boundaries_only(tmp_path, person):
    rng = np.random.default_rng(2)
    g = tmp_path / "g"
    _build(g, [
        _photo("Day-1/Morning/a.jpg", [_face(rng, person, 0.2), _face(rng)]),
        _photo("Day-1/Morning2/b.jpg", [_face(rng, person, 0.3)]),
        _photo("Day-2/c.jpg", [_face(rng, person, 0.6)]),
        _photo("Day-2/d.jpg", [_face(rng)]),
    ])
    gallery = Gallery.open(g)
    assert [m.id for m in gallery.search(person)] == ["Day-1/Morning/a.jpg", "Day-1/Morning2/b.jpg"]
    assert [m.id for m in gallery.search(person, stage="Day-1/Morning")] == ["Day-1/Morning/a.jpg"]
    assert [m.id for m in gallery.search(person, stage="Day-1")] == ["Day-1/Morning/a.jpg", "Day-1/Morning2/b.jpg"]
    assert [m.id for m in gallery.search(person, stage="Day-2", threshold=0.35)] == ["Day-2/c.jpg"]
    assert gallery.search(person, exclude={"Day-1/Morning/a.jpg"})[0].id == "Day-1/Morning2/b.jpg"
    assert [m.id for m in gallery.search(person, limit=1)] == ["Day-1/Morning/a.jpg"]


@pytest.mark.parametrize("stage", ["../etc", "Day-1/../Day-2", "/abs/path", "Day-1/./x", "a\x00b"])
def test_stage_outside_the_gallery_is_refused(tmp_path, person, stage):
    _build(tmp_path / "g", [_photo("Day-1/a.jpg", [Face((0, 1, 1, 0), person)])])
    with pytest.raises(StageError, match="must be a folder inside the gallery"):
        Gallery.open(tmp_path / "g").search(person, stage=stage)


def test_unknown_stage_is_named_in_the_error(tmp_path, person):
    _build(tmp_path / "g", [_photo("Day-1/a.jpg", [Face((0, 1, 1, 0), person)])])
    with pytest.raises(StageError, match="unknown stage 'Day-9'"):
        Gallery.open(tmp_path / "g").search(person, stage="Day-9")


def test_each_commit_is_a_new_version_and_removal_hides_photos(tmp_path, person):
    rng = np.random.default_rng(3)
    g = tmp_path / "g"
    _build(g, [_photo("s/a.jpg", [_face(rng, person, 0.1)])])
    with GalleryWriter(g, SETTINGS) as w:
        w.add(_photo("s/b.jpg", [_face(rng, person, 0.2)]))
        assert w.commit().version == 2
    assert [m.id for m in Gallery.open(g).search(person)] == ["s/a.jpg", "s/b.jpg"]
    with GalleryWriter(g, SETTINGS) as w:
        assert w.remove(["s/a.jpg"]) == ["s/a.jpg"]
        w.commit()
    gallery = Gallery.open(g)
    assert gallery.version == 3 and gallery.photo_count == 1
    assert [m.id for m in gallery.search(person)] == ["s/b.jpg"]
    with GalleryWriter(g, SETTINGS) as w:
        assert w.remove(["s"]) == ["s/b.jpg"]
        w.commit()
    assert Gallery.open(g).search(person) == []


def test_small_add_reuses_the_index_file_and_readers_add_the_tail(tmp_path, person):
    rng = np.random.default_rng(4)
    g = tmp_path / "g"
    _build(g, [_photo(f"s/{i}.jpg", [_face(rng)]) for i in range(40)])
    first = layout.read_manifest(g)
    with GalleryWriter(g, SETTINGS) as w:
        w.add(_photo("s/new.jpg", [_face(rng, person, 0.1)]))
        w.commit()
    m = layout.read_manifest(g)
    assert m.index == first.index and m.index_faces == 40 and m.faces == 41
    assert [x.id for x in Gallery.open(g).search(person)] == ["s/new.jpg"]


def test_settings_that_differ_from_the_gallery_are_refused(tmp_path, person):
    _build(tmp_path / "g", [_photo("a.jpg", [Face((0, 1, 1, 0), person)])])
    with pytest.raises(SettingsMismatchError, match="upsample: gallery 1, asked 2"):
        GalleryWriter(tmp_path / "g", {**SETTINGS, "upsample": 2})


def _hold_lock(folder: str, ready, release) -> None:  # type: ignore[no-untyped-def]
    w = GalleryWriter(folder, SETTINGS, command="fsw-index add")
    ready.set()
    release.wait(30)
    w.close()


def _holder(tmp_path: Path, person: np.ndarray):  # type: ignore[no-untyped-def]
    """A gallery, and another process that holds its writer's lock until `release` is set."""
    g = tmp_path / "g"
    _build(g, [_photo("a.jpg", [Face((0, 1, 1, 0), person)])])
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(g), ready, release))
    holder.start()
    assert ready.wait(30)
    return g, holder, release


def test_second_writer_is_told_who_holds_the_lock(tmp_path, person):
    g, holder, release = _holder(tmp_path, person)
    try:
        with pytest.raises(GalleryLockedError, match=rf"locked by pid {holder.pid} \(fsw-index add\)"):
            GalleryWriter(g, SETTINGS)
    finally:
        release.set()
        holder.join(30)
    GalleryWriter(g, SETTINGS).close()  # free again once the holder is gone


def test_the_lock_of_a_killed_writer_is_free_again(tmp_path, person):
    g, holder, _ = _holder(tmp_path, person)
    holder.kill()  # SIGKILL: no release runs; the OS drops the lock with the process
    holder.join(30)
    GalleryWriter(g, SETTINGS, command="fsw-index add").close()


def test_rows_past_the_manifest_are_ignored_then_cut(tmp_path, person):
    rng = np.random.default_rng(5)
    g = tmp_path / "g"
    _build(g, [_photo("a.jpg", [_face(rng, person, 0.1)])])
    with h5py.File(g / layout.H5_NAME, "r+") as h5:  # what a writer killed before its manifest leaves
        for name in ("photo", "box", "descriptor"):
            ds = h5["faces"][name]
            ds.resize(2, axis=0)
        h5["faces/descriptor"][1] = person
        h5["faces/photo"][1] = 0
        h5["photos/removed_at"][0] = 2
    gallery = Gallery.open(g)
    assert gallery.face_count == 1 and [m.id for m in gallery.search(person)] == ["a.jpg"]
    GalleryWriter(g, SETTINGS).close()
    with h5py.File(g / layout.H5_NAME, "r") as h5:
        assert h5["faces/descriptor"].shape[0] == 1 and h5["photos/removed_at"][0] == 0


def test_a_folder_that_is_not_a_gallery_gets_a_clear_error(tmp_path):
    with pytest.raises(GalleryError, match="no gallery at"):
        Gallery.open(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(GalleryError, match="is not an fsw gallery"):
        Gallery.open(tmp_path / "junk")
    with pytest.raises(GalleryError, match="not empty and not an fsw gallery"):
        GalleryWriter(tmp_path / "junk", SETTINGS, tmp_path, create=True)


def test_manifest_names_counts_and_settings(tmp_path, person):
    _build(tmp_path / "g", [_photo("a.jpg", [Face((0, 1, 1, 0), person)]), _photo("b.jpg", [])])
    raw = json.loads((tmp_path / "g" / layout.MANIFEST_NAME).read_text())
    assert raw["version"] == 1 and raw["photos"] == 2 and raw["faces"] == 1
    assert raw["settings"] == SETTINGS and raw["index"] == "index-v1.faiss"
    assert Gallery.open(tmp_path / "g").stats().photos_without_faces == 1
