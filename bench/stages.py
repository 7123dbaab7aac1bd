"""What scanning only the job's stage changes in the answers, on the dev set laid out in stages.

A job with a stage scans only that stage's rows, query expansion included: the expansion's evidence is
the stage's photos, where it was the whole gallery's before. Without expansion the answer is exactly
the whole gallery's answer filtered to the stage (`tests/test_scan.py` checks it; counted again here).
With expansion it can differ; this section counts how, with the dev set's gallery photos laid out in
two stages, alternately (as the tests' photo tree does), and every query searched in each stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.galleries import RealFaces
from indexer.evaluate import Faces
from matcher.query import search_descriptor
from matcher.search import DEFAULT_THRESHOLD, Match

STAGES = ("Day-1/Morning", "Day-2/Evening")


def measure(real: RealFaces, people_of: dict[str, frozenset[str]], threshold: float = DEFAULT_THRESHOLD
            ) -> dict[str, Any]:
    """`people_of`: each query file -> the people in it (one, or 'none')."""
    ids, vectors, owner, truth = [], [], [], {}
    for i, (item, _, faces) in enumerate(real.photos):
        pid = f"{STAGES[i % 2]}/{Path(item.file).name}"
        ids.append(pid)
        truth[pid] = item.people
        for f in faces:
            vectors.append(f.descriptor)
            owner.append(i)
    gallery = Faces(np.asarray(vectors, np.float32), np.asarray(owner), np.asarray(ids, dtype=object)).gallery()
    counts = {k: {"found": 0, "wanted": 0, "wrong": 0} for k in ("stage_alone", "whole_filtered")}
    differ, equal_without, searches, moved = 0, 0, 0, []
    for file, q in real.queries.items():
        person = next(iter(people_of[file]))
        for stage in STAGES:
            searches += 1
            inside = {pid for pid in ids if pid.startswith(stage + "/")}
            wanted = {pid for pid in inside if person in truth[pid]}
            alone = search_descriptor(gallery, q, stage, threshold)
            filtered = _in(search_descriptor(gallery, q, "", threshold), stage)
            for name, answer in (("stage_alone", alone), ("whole_filtered", filtered)):
                got = {m.id for m in answer}
                counts[name]["found"] += len(got & wanted)
                counts[name]["wanted"] += len(wanted)
                counts[name]["wrong"] += len(got - wanted)
            differ += {m.id for m in alone} != {m.id for m in filtered}
            both = {m.id: m.similarity for m in filtered}
            moved += [abs(m.similarity - both[m.id]) for m in alone if m.id in both]
            plain = search_descriptor(gallery, q, stage, threshold, expand=False)
            equal_without += plain == _in(search_descriptor(gallery, q, "", threshold, expand=False), stage)
    return {
        "stages": list(STAGES), "photos": len(ids), "faces": len(vectors), "queries": len(real.queries),
        "threshold": threshold, "searches": searches,
        "expansion_on": {**counts, "answers_with_other_photos": differ,
                         "similarity_change_max": round(max(moved, default=0.0), 4),
                         "similarity_change_median": round(float(np.median(moved)) if moved else 0.0, 4)},
        "expansion_off": {"answers_equal_to_whole_filtered": equal_without},
    }


def _in(answer: list[Match], stage: str) -> list[Match]:
    return [m for m in answer if m.id.startswith(stage + "/")]
