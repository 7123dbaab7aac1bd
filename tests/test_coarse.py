"""The whole-gallery scan on 8-bit codes (`matcher.coarse`): the same answers as the float32 scan."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pytest

from matcher import coarse, layout
from matcher.gallery import Gallery
from matcher.scan import CpuScan, Descriptors
from matcher.search import exhaustive_search, range_search
from matcher.verify import check_gallery as verify
from matcher.writer import GalleryWriter, PendingPhoto

SETTINGS = {"model": "m1", "landmarks": "5-point", "detector": "hog", "upsample": 1, "jitters": 1, "max_side": 1600}


def _faces(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 128))
    return (1.4 * v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _around(rng: np.random.Generator, centre: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Faces at exactly these distances from `centre` (in float64; float32 rounds them by ~1e-7)."""
    step = rng.normal(size=(len(distances), 128))
    step /= np.linalg.norm(step, axis=1, keepdims=True)
    return (centre.astype(np.float64) + distances[:, None] * step).astype(np.float32)


def _codes_and_scan(vectors: np.ndarray, tmp_path: Path, threads: int = 2, tail: np.ndarray | None = None):
    entry = coarse.write(tmp_path, 1, vectors)
    m = layout.Manifest(index="index-v1.faiss", index_faces=len(vectors), coarse=entry)
    assert coarse.problem(tmp_path, m) is None
    codes = coarse.read(tmp_path / entry["file"], len(vectors))
    blocks = [vectors] + ([tail] if tail is not None else [])
    described = Descriptors(blocks)
    return entry, coarse.CoarseScan(codes, entry["error"], described, threads=threads), described


@pytest.fixture(scope="module")
def crowd() -> tuple[np.ndarray, np.ndarray]:
    """A query and 200k faces: strangers, and 300 faces at distances 0.40 to 0.60 of it, some within a
    hair of the 0.5 threshold on either side."""
    rng = np.random.default_rng(7)
    query = _faces(rng, 1)[0]
    near = np.concatenate([np.linspace(0.40, 0.60, 290), 0.5 + np.array([-2, -1, 1, 2, 3, -3, 5, -5, 8, -8]) * 1e-6])
    vectors = np.concatenate([_faces(rng, 200_000), _around(rng, query, near)])
    return query, vectors[rng.permutation(len(vectors))]


def test_the_codes_error_bounds_every_rows_distance_to_its_code(tmp_path, crowd):
    _, vectors = crowd
    entry, scan, _ = _codes_and_scan(vectors, tmp_path)
    codes = scan.codes
    assert codes.index.d == coarse.COARSE_DIMS and codes.nbytes == len(vectors) * coarse.COARSE_DIMS
    projected = codes.project(vectors).astype(np.float64)
    worst = np.sqrt(((codes.decoded(0, codes.rows) - projected) ** 2).sum(axis=1)).max()
    assert worst <= entry["error"] * (1 + 1e-5) + 1e-6 and 0.0 < entry["error"] < 0.05  # float32 rounding apart


def test_the_projection_never_lengthens_a_difference(tmp_path, crowd):
    query, vectors = crowd
    _, scan, _ = _codes_and_scan(vectors, tmp_path)
    a = faiss.vector_to_array(scan.codes.projection.A).reshape(coarse.COARSE_DIMS, 128).astype(np.float64)
    assert np.allclose(a @ a.T, np.eye(coarse.COARSE_DIMS), atol=1e-6)  # orthonormal directions
    differences = (vectors[:5000] - query).astype(np.float64)
    shrunk = np.linalg.norm(differences @ a.T, axis=1) / np.linalg.norm(differences, axis=1)
    assert shrunk.max() <= 1 + 1e-6


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("threshold", [0.45, 0.5, 0.55])
def test_a_search_on_the_codes_answers_exactly_as_the_exhaustive_search(tmp_path, crowd, threads, threshold):
    query, vectors = crowd
    _, scan, described = _codes_and_scan(vectors, tmp_path, threads)
    assert len(scan.parts) == min(threads, len(vectors) // (1 << 16))
    rows, distances = range_search(scan, described, query, threshold)
    want_rows, want_distances = exhaustive_search(vectors, query, threshold)
    assert len(want_rows) > 50
    order = np.argsort(rows)
    assert rows[order].tolist() == want_rows.tolist()
    assert np.array_equal(distances[order], want_distances)


def test_rows_after_the_coded_ones_and_a_stage_are_scanned_on_the_floats(tmp_path, crowd):
    query, vectors = crowd
    rng = np.random.default_rng(8)
    tail = np.concatenate([_faces(rng, 5000), _around(rng, query, np.linspace(0.3, 0.49, 20))])
    _, scan, described = _codes_and_scan(vectors, tmp_path, 2, tail)
    every = np.concatenate([vectors, tail])
    rows, _ = range_search(scan, described, query, 0.5)
    assert sorted(rows.tolist()) == exhaustive_search(every, query, 0.5)[0].tolist()
    scope = np.asarray([[1000, 90_000], [len(vectors) + 10, len(every)]], np.int64)
    got = sorted(range_search(scan, described, query, 0.5, scope)[0].tolist())
    want = [r for r in exhaustive_search(every, query, 0.5)[0].tolist() if any(lo <= r < hi for lo, hi in scope)]
    assert got == want


def test_more_rows_near_the_query_than_k_nn_can_fetch_fall_back_to_the_float_scan(tmp_path, monkeypatch, crowd):
    query, vectors = crowd
    _, scan, described = _codes_and_scan(vectors, tmp_path, 2)
    monkeypatch.setattr(coarse, "COARSE_FIRST_K", 8)
    monkeypatch.setattr(coarse, "COARSE_MAX_K", 16)
    calls = []
    real = CpuScan.candidates
    monkeypatch.setattr(CpuScan, "candidates", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    rows, _ = range_search(scan, described, query, 0.5)
    assert calls, "the float scan was not asked"
    assert sorted(rows.tolist()) == exhaustive_search(vectors, query, 0.5)[0].tolist()


def _gallery(folder: Path, rng: np.random.Generator, photos: int = 300) -> None:
    with GalleryWriter(folder, SETTINGS, folder.parent, create=True) as w:
        for i in range(photos):
            faces = _faces(rng, 3)
            pid = f"Day-{i % 3}/p{i:04d}.jpg"
            w.add(PendingPhoto(pid, f"{i:064x}", 1000, 1.0, np.tile([10, 60, 60, 10], (3, 1)), faces))
        w.commit()


def test_the_writer_records_the_codes_and_a_gallery_searches_on_them(tmp_path):
    folder = tmp_path / "g"
    _gallery(folder, np.random.default_rng(3))
    m = layout.read_manifest(folder)
    assert m.coarse["file"] == f"index-v{m.version}-sq8.faiss" and (folder / m.coarse["file"]).is_file()
    assert (folder / m.coarse["file"]).stat().st_mode & 0o007 == 0
    g = Gallery.open(folder)
    assert isinstance(g.scanner, coarse.CoarseScan)
    vectors = np.asarray(g.vectors)
    for q in vectors[:: len(vectors) // 7]:
        assert sorted(g.scan(q, 0.5)[0].tolist()) == exhaustive_search(vectors, q, 0.5)[0].tolist()
    assert verify(folder).ok


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_a_codes_file_that_is_not_the_recorded_one_is_not_read_and_answers_stay_exact(tmp_path, caplog, damage):
    folder = tmp_path / "g"
    _gallery(folder, np.random.default_rng(4))
    m = layout.read_manifest(folder)
    path = folder / m.coarse["file"]
    if damage == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fsw.gallery"):
        g = Gallery.open(folder)
    assert isinstance(g.scanner, CpuScan)
    assert m.coarse["file"] in caplog.text and "float32" in caplog.text
    vectors = np.asarray(g.vectors)
    assert sorted(g.scan(vectors[5], 0.5)[0].tolist()) == exhaustive_search(vectors, vectors[5], 0.5)[0].tolist()
    report = verify(folder)
    assert not report.ok and any(m.coarse["file"] in p for p in report.problems)


def test_a_manifest_naming_codes_without_an_index_file_is_refused(tmp_path):
    folder = tmp_path / "g"
    _gallery(folder, np.random.default_rng(5))
    raw = json.loads((folder / layout.MANIFEST_NAME).read_text())
    raw["index"], raw["index_faces"], raw["index_sha256"] = None, 0, None
    (folder / layout.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(layout.ManifestError, match="coarse"):
        layout.read_manifest(folder)


def test_rows_that_cannot_be_coded_get_no_codes_file(tmp_path):
    rows = _faces(np.random.default_rng(6), 100)
    rows[7, 3] = np.nan
    assert coarse.write(tmp_path, 1, rows) is None
    assert coarse.write(tmp_path, 1, np.ones((5, 128), np.float32)) is None  # no spread to code
    assert not list(tmp_path.iterdir())
