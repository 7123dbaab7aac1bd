"""The matching rule and the range search, against an exhaustive comparison."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from matcher.search import (
    best_per_photo,
    check_threshold,
    exact_distances,
    exhaustive_search,
    radius_for,
    range_search,
    similarity_from_squared,
)


def test_radius_is_the_squared_distance_of_the_threshold():
    assert radius_for(0.5) == pytest.approx(0.25)
    assert radius_for(0.6) == pytest.approx(0.16)


def test_similarity_from_squared_distance_inverts_the_radius():
    for t in (0.3, 0.5, 0.6, 0.75):
        assert similarity_from_squared(radius_for(t)) == pytest.approx(t)
    assert similarity_from_squared(0.0) == 1.0
    assert similarity_from_squared(np.array([0.04, 0.36])) == pytest.approx([0.8, 0.4])


@pytest.mark.parametrize("bad", [0.0, 0.1, 0.95, 1.5, float("nan"), float("inf")])
def test_threshold_outside_the_sane_range_is_refused(bad):
    with pytest.raises(ValueError):
        check_threshold(bad)


def _planted(rng: np.random.Generator, n: int = 20000):
    """Descriptor-like rows (norm ~1.5) with neighbours planted just inside and outside d = 0.5."""
    base = rng.normal(size=(n, 128)).astype(np.float32)
    base *= 1.5 / np.linalg.norm(base, axis=1, keepdims=True)
    query = base[0].copy()
    direction = rng.normal(size=128)
    direction /= np.linalg.norm(direction)
    planted = {}
    for row, d in zip(range(1, 9), (0.1, 0.3, 0.49, 0.4999, 0.5001, 0.51, 0.7, 0.49999), strict=True):
        base[row] = (query + d * direction).astype(np.float32)
        planted[row] = float(exact_distances(base[row : row + 1], query)[0])
    return base, query, planted


def test_range_search_equals_exhaustive_comparison_at_the_boundary():
    rng = np.random.default_rng(7)
    vectors, query, planted = _planted(rng)
    index = faiss.IndexFlatL2(128)
    index.add(vectors)
    for t in (0.5, 0.45, 0.6):
        rows, d = range_search(index, vectors, query, t)
        ref_rows, ref_d = exhaustive_search(vectors, query, t)
        assert sorted(rows.tolist()) == sorted(ref_rows.tolist())
        got = dict(zip(rows.tolist(), d.tolist(), strict=True))
        assert got == dict(zip(ref_rows.tolist(), ref_d.tolist(), strict=True))
    rows, _ = range_search(index, vectors, query, 0.5)
    found = set(rows.tolist())
    for row, d in planted.items():
        assert (row in found) == (d < 0.5), f"row {row} at distance {d}"
    assert {3, 4, 8} <= found and not {5, 6, 7} & found


def test_best_per_photo_keeps_each_photos_closest_face_best_first():
    face_photo = np.array([0, 0, 1, 2, 2])
    ids = np.array(["a.jpg", "b.jpg", "c.jpg"], dtype=object)
    boxes = np.arange(20).reshape(5, 4)
    rows = np.array([0, 1, 2, 3, 4])
    d = np.array([0.40, 0.20, 0.30, 0.45, 0.35])
    out = best_per_photo(rows, d, face_photo, ids, boxes)
    assert [m.id for m in out] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [round(m.similarity, 6) for m in out] == [0.8, 0.7, 0.65]
    assert out[0].box == (4, 5, 6, 7)
    assert [m.id for m in best_per_photo(rows, d, face_photo, ids, boxes, limit=2)] == ["a.jpg", "b.jpg"]
