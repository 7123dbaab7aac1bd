"""Search at scale: stage-scoped scans, the scan split over threads, descriptors shared through a mapped file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matcher import scan
from matcher.gallery import Gallery
from matcher.query import search_descriptor
from matcher.scan import CpuScan, Descriptors
from matcher.search import exhaustive_search, range_search
from matcher.writer import GalleryWriter, PendingPhoto

SETTINGS = {"model": "m1", "landmarks": "5-point", "detector": "hog", "upsample": 1, "jitters": 1, "max_side": 1600}
STAGES = ("Day-1/Morning", "Day-1/Morning2", "Day-1/Evening", "Day-2", "Day-2/Hall-B")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 128))
    return (1.5 * v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _near(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    step = rng.normal(size=(n, 128))
    d = rng.uniform(0.1, spread, size=(n, 1))
    return (centre + d * step / np.linalg.norm(step, axis=1, keepdims=True)).astype(np.float32)


def _photos(rng: np.random.Generator, person: np.ndarray, stage: str, first: int, n: int) -> list[PendingPhoto]:
    """`n` photos of a stage, each with a stranger and, one photo in two, a face near `person`."""
    out = []
    for i in range(first, first + n):
        faces = _unit(rng, 1) if i % 2 else np.concatenate([_unit(rng, 1), _near(rng, person, 1, 0.6)])
        pid = f"{stage}/p{i:04d}.jpg"
        boxes = np.tile([10, 60, 60, 10], (len(faces), 1))
        out.append(PendingPhoto(pid, f"{abs(hash(pid)):064x}"[:64], 1000, 1.0, boxes, faces))
    return out


@pytest.fixture(scope="module")
def person() -> np.ndarray:
    return _unit(np.random.default_rng(1), 1)[0]


@pytest.fixture(scope="module")
def scattered(tmp_path_factory: pytest.TempPathFactory, person: np.ndarray) -> Path:
    """A gallery whose stages are scattered over its rows: stages indexed in turns, photos added to a
    stage later, a photo replaced, a stage's photo removed; an index file, then rows after it."""
    rng = np.random.default_rng(2)
    folder = tmp_path_factory.mktemp("scoped") / "g"
    with GalleryWriter(folder, SETTINGS, folder.parent, create=True) as w:
        for stage in STAGES:
            for p in _photos(rng, person, stage, 0, 30):
                w.add(p)
        w.commit()  # writes the index file
        for stage in STAGES[::2]:
            for p in _photos(rng, person, stage, 30, 3):
                w.add(p)
        w.add(_photos(rng, person, "Day-2", 0, 1)[0])  # a replaced photo: its new rows at the end
        w.remove(["Day-1/Morning/p0002.jpg", "Day-2/Hall-B/p0004.jpg"])
        w.commit()  # rows after the index file, read from the row files
    return folder


def _filtered(gallery: Gallery, q: np.ndarray, stage: str, threshold: float) -> list:
    return [m for m in gallery.search(q, "", threshold) if m.id.startswith(stage + "/")]


def test_a_stage_search_equals_the_whole_gallery_answer_filtered_to_the_stage(scattered, person):
    gallery = Gallery.open(scattered)
    assert gallery.manifest.index_faces < gallery.manifest.faces  # rows after the index file too
    queries = [person, *_near(np.random.default_rng(3), person, 3, 0.3)]
    for stage in ("Day-1", *STAGES):
        for q in queries:
            for t in (0.4, 0.5, 0.6):
                got = gallery.search(q, stage, t)
                assert got == _filtered(gallery, q, stage, t), (stage, t)
    assert {m.id.rpartition("/")[0] for m in gallery.search(person, "Day-1", 0.4)} >= {"Day-1/Morning"}


def test_a_stage_scans_exactly_its_live_faces(scattered):
    gallery = Gallery.open(scattered)
    owner = gallery.photo_ids[gallery.face_photo]
    for stage in ("Day-1", *STAGES):
        scope = gallery.scopes[stage]
        rows = np.concatenate([np.arange(lo, hi) for lo, hi in scope])
        want = np.flatnonzero(gallery.face_live & np.array([i.startswith(stage + "/") for i in owner]))
        assert rows.tolist() == want.tolist(), stage
        assert len(scope) <= 4  # a few ranges, not one per face
    assert len(gallery.scopes["Day-2/Hall-B"]) == 3  # cut by a removed photo's faces, and photos added later


def test_a_stage_search_without_expansion_equals_the_filtered_whole_gallery_answer(scattered, person):
    gallery = Gallery.open(scattered)
    for stage in STAGES:
        got = search_descriptor(gallery, person, stage, 0.5, expand=False)
        assert got == [m for m in search_descriptor(gallery, person, "", 0.5, expand=False)
                       if m.id.startswith(stage + "/")]


def test_a_stage_with_photos_but_no_faces_answers_nothing(tmp_path, person):
    folder = tmp_path / "g"
    with GalleryWriter(folder, SETTINGS, folder.parent, create=True) as w:
        w.add(PendingPhoto("empty/a.jpg", "a" * 64, 1000, 1.0))
        w.add(_photos(np.random.default_rng(4), person, "full", 0, 2)[0])
        w.commit()
    gallery = Gallery.open(folder)
    assert gallery.search(person, "empty", 0.3) == []
    assert [m.id for m in gallery.search(person, "full", 0.3)] == ["full/p0000.jpg"]


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_a_scan_split_over_threads_finds_the_rows_of_one_scan(monkeypatch, threads):
    monkeypatch.setattr(scan, "SCAN_MIN_ROWS_PER_THREAD", 100)
    monkeypatch.setattr(scan, "SCAN_GATHER_ROWS", 50)
    rng = np.random.default_rng(5)
    q = _unit(rng, 1)[0]
    data = np.concatenate([_unit(rng, 2000), _near(rng, q, 300, 0.7)])[rng.permutation(2300)]
    vectors = Descriptors([data[:1234], data[1234:1240], data[1240:]])  # a mapped file, then rows after it
    one, split = CpuScan(vectors, threads=1), CpuScan(vectors, threads=threads)
    scopes = [None, np.asarray([[0, 2300]]), np.asarray([[5, 40], [90, 1236], [1238, 1500], [2000, 2299]])]
    for scope in scopes:
        for t in (0.45, 0.5, 0.6):
            ref_rows, ref_d = exhaustive_search(data, q, t)
            if scope is not None:
                inside = np.zeros(len(data), bool)
                for lo, hi in scope:
                    inside[lo:hi] = True
                ref_rows, ref_d = ref_rows[inside[ref_rows]], ref_d[inside[ref_rows]]
            for scanner in (one, split):
                rows, d = range_search(scanner, vectors, q, t, scope)
                got = sorted(zip(rows.tolist(), d.tolist(), strict=True))
                assert got == sorted(zip(ref_rows.tolist(), ref_d.tolist(), strict=True))


def test_a_split_scope_covers_every_row_once():
    scope = np.asarray([[0, 10], [20, 25], [30, 100]])
    for parts in (1, 2, 3, 4, 85):
        pieces = scan.split_scope(scope, parts, 1)
        covered = np.concatenate([np.arange(lo, hi) for p in pieces for lo, hi in p])
        assert covered.tolist() == [*range(10), *range(20, 25), *range(30, 100)]
        assert len(pieces) == min(parts, 85)


def test_descriptors_read_rows_across_blocks_like_one_array():
    rng = np.random.default_rng(6)
    data = _unit(rng, 10)
    vectors = Descriptors([data[:4], data[4:4], data[4:]])
    assert len(vectors) == 10 and vectors.shape == (10, 128)
    assert np.array_equal(vectors[np.array([9, 0, 4, 3])], data[[9, 0, 4, 3]])
    assert np.array_equal(vectors[5], data[5]) and np.array_equal(vectors[-1], data[-1])
    assert np.array_equal(np.asarray(vectors), data)


def test_the_index_files_descriptors_are_mapped_read_only_and_shared(scattered):
    gallery = Gallery.open(scattered)
    mapped = gallery.vectors.blocks[0]
    assert len(mapped) == gallery.manifest.index_faces and not mapped.flags.writeable
    index_file = str((scattered / gallery.manifest.index).resolve())
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(index_file)]
    assert maps and all(m[1] == "r--s" for m in maps)  # read-only, shared with every process mapping it
    assert len(gallery.vectors.blocks) == 2 and gallery.vectors.blocks[1].flags.owndata  # rows after it: our own


def test_a_job_scans_once_unless_its_query_is_expanded_and_answers_as_expansion_then_search(scattered, person):
    from matcher.expansion import expand_query

    gallery = Gallery.open(scattered)
    calls = []
    candidates = gallery.scanner.candidates
    gallery.scanner.candidates = lambda *a, **k: calls.append(1) or candidates(*a, **k)
    stranger = np.random.default_rng(9).normal(size=128).astype(np.float32)
    for q, scans in ((person, 2), (stranger, 1)):
        calls.clear()
        got = search_descriptor(gallery, q, "", 0.5)
        assert len(calls) == scans
        expansion = expand_query(gallery, q, 0.5)
        assert expansion.expanded == (scans == 2)
        assert got == gallery.search(expansion.descriptor, "", 0.5)
    assert search_descriptor(gallery, person, "", 0.5)  # the person is found
