"""The matching rule and the search from one descriptor to photos.

`similarity = 1 - d`, d the Euclidean distance between 128-d descriptors; a match has
`similarity > threshold`. FAISS IndexFlatL2 reports squared distances, so the range-search radius is
`(1 - threshold) ** 2`. The radius is widened by a hair and every candidate's distance recomputed in
float64, so the answer is exactly that of `exhaustive_search`, whatever order FAISS sums in and however
the rows were split (`matcher.scan`) or searched (a GPU's k-NN, `matcher.gpu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from matcher.defaults import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD  # the matching rule's default, here too
from matcher.defaults import MAX_THRESHOLD, MIN_THRESHOLD
from matcher.scan import Descriptors, Ranges, Scanner

_WIDEN = 1e-4  # relative: far above float32 rounding (~1e-6), far below any real margin


@dataclass(frozen=True)
class Match:
    """One photo in a result: its id, the similarity of its best face, and that face's box.

    `schemas.dump_result` turns a list of them into the result a job returns (the contract's one serialiser).
    """

    id: str
    similarity: float
    box: tuple[int, int, int, int]


def radius_for(threshold: float) -> float:
    """The squared-L2 range-search radius of a similarity threshold."""
    return (1.0 - threshold) ** 2


def similarity_from_squared(d2: float | np.ndarray) -> float | np.ndarray:
    """Similarity from a squared L2 distance, as FAISS reports them."""
    return 1.0 - np.sqrt(np.maximum(d2, 0.0))


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, int | float) and math.isfinite(threshold)):
        raise ValueError("threshold must be a number")
    if not MIN_THRESHOLD <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"threshold {threshold} is outside {MIN_THRESHOLD}..{MAX_THRESHOLD}")
    return float(threshold)


def range_search(
    index: Scanner | faiss.Index,
    vectors: np.ndarray | Descriptors,
    query: np.ndarray,
    threshold: float,
    scope: Ranges | None = None,
):
    """Rows of `vectors` within the threshold, with exact distances; only rows in `scope` when given.

    `index` finds the candidates: a `matcher.scan.Scanner` over `vectors` (a gallery's), or any FAISS index
    holding `vectors` (whole scope only). Returns (rows int64, distances float64), unordered.
    """
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    if len(vectors) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    radius = radius_for(threshold) * (1 + _WIDEN) + 1e-9
    if isinstance(index, faiss.Index):
        if scope is not None:
            raise ValueError("a scoped search needs a matcher.scan scanner, not a FAISS index")
        lims, _, found = index.range_search(q, radius)
        rows = found[lims[0] : lims[1]].astype(np.int64)
    else:
        rows = index.candidates(q, radius, scope)
    d = exact_distances(vectors[rows], query)
    keep = d < 1.0 - threshold
    return rows[keep], d[keep]


def exhaustive_search(vectors: np.ndarray, query: np.ndarray, threshold: float):
    """The reference answer: every row's exact distance, no index. Same return as `range_search`."""
    d = exact_distances(vectors, query)
    rows = np.flatnonzero(d < 1.0 - threshold)
    return rows.astype(np.int64), d[rows]


def exact_distances(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    diff = np.asarray(vectors, dtype=np.float64) - np.asarray(query, dtype=np.float64).reshape(1, -1)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def best_per_photo(
    rows: np.ndarray,
    distances: np.ndarray,
    face_photo: np.ndarray,
    photo_ids: np.ndarray,
    boxes: np.ndarray,
    limit: int | None = None,
) -> list[Match]:
    """One Match per photo (its closest face), best first; ties broken by id for a stable order."""
    out = []
    for i in _closest_per_photo(rows, distances, face_photo):
        row = rows[i]
        top, right, bottom, left = (int(v) for v in boxes[row])
        out.append(Match(str(photo_ids[face_photo[row]]), float(1.0 - distances[i]), (top, right, bottom, left)))
    out.sort(key=lambda m: (-m.similarity, m.id))
    return out if limit is None else out[:limit]


def best_face_per_photo(rows: np.ndarray, distances: np.ndarray, face_photo: np.ndarray) -> np.ndarray:
    """Of `rows` (faces, with their distances), the closest face of each photo, in ascending row order."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    return np.sort(rows[_closest_per_photo(rows, distances, face_photo)])


def _closest_per_photo(rows: np.ndarray, distances: np.ndarray, face_photo: np.ndarray) -> np.ndarray:
    """Positions in `rows` of each photo's closest face; of equally close faces, the lowest row (a person
    is in a photo once, so a photo counts by its best face)."""
    order = np.lexsort((rows, distances))
    _, first = np.unique(face_photo[rows[order]], return_index=True)
    return order[first]
