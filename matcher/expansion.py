"""Query expansion: refine a selfie's descriptor with the gallery faces it matched with high confidence.

A selfie is one view of a face; the event photos hold others. Averaging the selfie's descriptor with
those of its surest matches moves the query toward the person's centre in descriptor space, so a second
search under the same rule finds photos that the selfie alone misses (average query expansion).

The rule, for a search at `threshold`:
1. Candidates: for each live photo of the job's stage (the whole gallery without one; exclusions only
   filter the results), its face closest to the selfie's descriptor `q` (a person is in a photo once);
   the confident ones have `similarity(q, f) > threshold + MARGIN`.
2. Agreement: a confident face `f` is kept when `similarity(f, m) > threshold + MARGIN`, where `m` is the
   mean of `q` and the other confident faces. A look-alike that matched the selfie but not the person's
   other photos is dropped, so it cannot pull the query. With one confident face, `m` is `q` itself.
3. Fewer than MIN_MATCHES faces kept: no expansion, `q` is the query.
4. Otherwise the query is `q' = (q + sum of the kept faces) / (1 + their number)`, float32, and the
   search runs once more with `q'` (one round, never iterated). Every result's similarity is
   `1 - |q' - f|`, so the matching rule keeps its form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from matcher.defaults import EXPANSION_MARGIN as MARGIN
from matcher.defaults import EXPANSION_MIN_MATCHES as MIN_MATCHES
from matcher.gallery import Gallery
from matcher.search import best_face_per_photo, check_threshold, exact_distances


@dataclass(frozen=True)
class Expansion:
    """The query to search with, and which candidates were averaged into it."""

    descriptor: np.ndarray  # float32[128], or the selfie's own as given when `used` is empty
    used: np.ndarray  # from `refine`: indices into its candidates; from `expand_query`: gallery face rows
    rejected: int  # confident candidates that failed the agreement check

    @property
    def expanded(self) -> bool:
        return len(self.used) > 0


def refine(
    query: np.ndarray,
    faces: np.ndarray,
    threshold: float,
    margin: float = MARGIN,
    min_matches: int = MIN_MATCHES,
) -> Expansion:
    """The expanded query from `faces`, the candidates of step 1 (one per photo, any similarity).

    The faces are summed closest first, so the same matches give the same float32 descriptor in any
    gallery row order. `used` lists the faces averaged in, in that order.
    """
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    faces = np.asarray(faces, dtype=np.float64).reshape(-1, q.size)
    bar = threshold + margin
    distances = exact_distances(faces, q)
    by_distance = np.lexsort((np.arange(len(faces)), distances))
    confident = by_distance[1.0 - distances[by_distance] > bar]
    unchanged = np.asarray(query).reshape(-1)
    if len(confident) < max(min_matches, 1):
        return Expansion(unchanged, np.zeros(0, np.int64), 0)
    c = faces[confident]
    # the mean of q and the others: (q + sum of all - f) / n, for each f among n confident faces
    others = (q + c.sum(axis=0) - c) / len(c)
    agree = 1.0 - np.sqrt(np.einsum("ij,ij->i", c - others, c - others)) > bar
    used = confident[agree]
    rejected = len(confident) - len(used)
    if len(used) < min_matches:
        return Expansion(unchanged, np.zeros(0, np.int64), rejected)
    refined = (q + faces[used].sum(axis=0)) / (1 + len(used))
    return Expansion(refined.astype(np.float32), used.astype(np.int64), rejected)


def expand_query(
    gallery: Gallery,
    descriptor: np.ndarray,
    threshold: float = 0.5,
    margin: float = MARGIN,
    min_matches: int = MIN_MATCHES,
    stage: str | None = "",
) -> Expansion:
    """The expanded query for a search of `gallery`'s `stage` at `threshold` (see the module's rule).

    The evidence is every live photo of the stage, the rows the search itself scans (`Gallery.scan`), so a
    job costs what its stage holds. Exclusions only filter what is returned: a photo excluded after the
    search (as the worker does) gives the same answer as one excluded in it. Costs one scan at `threshold`
    (`matcher.query.search_descriptor` makes it the answer when the query is not expanded).
    """
    threshold = check_threshold(threshold)
    rows, distances = gallery.scan(descriptor, threshold, gallery.check_stage(stage))
    return expand_from(gallery, descriptor, rows, distances, threshold, margin, min_matches)


def expand_from(
    gallery: Gallery,
    descriptor: np.ndarray,
    rows: np.ndarray,
    distances: np.ndarray,
    threshold: float,
    margin: float = MARGIN,
    min_matches: int = MIN_MATCHES,
) -> Expansion:
    """`expand_query` from the hits of a scan at `threshold` (`Gallery.scan`: visible rows, exact distances):
    its confident ones, those within `threshold + margin`, are the evidence of step 1."""
    confident = distances < 1.0 - min(threshold + margin, 1.0)
    rows, distances = rows[confident], distances[confident]
    best = best_face_per_photo(rows, distances, gallery.face_photo)
    expansion = refine(descriptor, gallery.vectors[best], threshold, margin, min_matches)
    return replace(expansion, used=best[expansion.used])
