"""Scoring a labelled set's answers: pure functions from similarities to counts per threshold.

In the manner of FAISS `contrib/evaluation.py`: no searching, no files, no plotting. The inputs are
each query's answer at each threshold (photo id -> similarity, as a job returns it) and the truth
(labelled photo id -> the people in it, from `indexer.labels`); the same functions score any run.

Counts, per threshold: photos found of those that hold the query's person (recall); wrong photos
(returned but not holding the person) and their rate over the (query, photo) pairs where the photo does
not hold the person; queries answered perfectly (exactly their person's photos); strangers given no
photo; faceless queries refused (no face found) or given no photo. Photos returned that carry no label
(an event gallery's other photos) are counted apart, neither right nor wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from indexer.labels import NOT_PEOPLE, expected_faces

Truth = Mapping[str, frozenset[str]]  # labelled photo id -> the people in it


@dataclass(frozen=True)
class Answer:
    """What a query's job returns at one threshold: {photo id: similarity}, and faces averaged in."""

    photos: dict[str, float]
    expanded_with: int = 0


NO_ANSWER = Answer({})


@dataclass(frozen=True)
class Outcome:
    """One query and what it got: its answer at each threshold (none when no face was found in it)."""

    file: str
    person: str  # a name, or 'none'
    face_found: bool
    answers: Mapping[float, Answer]


@dataclass
class Row:
    """The counts at one threshold."""

    threshold: float
    found: int = 0
    wanted: int = 0
    wrong: int = 0
    negatives: int = 0  # (query, photo) pairs where the photo does not hold the query's person
    perfect: int = 0
    person_queries: int = 0
    strangers_ok: int = 0
    strangers: int = 0
    no_face_ok: int = 0
    no_face: int = 0
    expanded: int = 0
    unlabelled: int = 0  # photos returned that carry no label (an event gallery's other photos)

    @property
    def recall(self) -> float:
        return self.found / self.wanted if self.wanted else 0.0

    @property
    def wrong_rate(self) -> float:
        return self.wrong / self.negatives if self.negatives else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recall": round(self.recall, 4), "wrong_rate": round(self.wrong_rate, 5)}


def above(similarities: Mapping[str, float], threshold: float) -> dict[str, float]:
    """The photos a search at `threshold` returns, from a search at a lower one (a match is `> threshold`)."""
    return {pid: s for pid, s in similarities.items() if s > threshold}


def wanted(truth: Truth, person: str) -> set[str]:
    """The labelled photos that hold `person` (none for a query without a face)."""
    return set() if person == "none" else {pid for pid, people in truth.items() if person in people}


def kind(truth: Truth, person: str) -> str:
    """'no face', 'person' (someone in the labelled photos) or 'stranger'."""
    if person == "none":
        return "no face"
    return "person" if person in set().union(*truth.values()) - NOT_PEOPLE else "stranger"


def count(truth: Truth, outcomes: Sequence[Outcome], thresholds: Sequence[float]) -> list[Row]:
    """The counts at each threshold, in the order given."""
    rows = {t: Row(t) for t in thresholds}
    for q in outcomes:
        want, what = wanted(truth, q.person), kind(truth, q.person)
        for t, row in rows.items():
            answer = q.answers.get(t, NO_ANSWER)
            returned = set(answer.photos)
            labelled = returned & truth.keys()
            row.unlabelled += len(returned - labelled)
            row.expanded += answer.expanded_with > 0
            if what == "no face":
                row.no_face += 1
                row.no_face_ok += not returned
                continue
            row.found += len(labelled & want)
            row.wanted += len(want)
            row.wrong += len(labelled - want)
            row.negatives += len(truth) - len(want)
            if what == "person":
                row.person_queries += 1
                row.perfect += labelled == want
            else:
                row.strangers += 1
                row.strangers_ok += not labelled
    return [rows[t] for t in thresholds]


def details(truth: Truth, outcomes: Sequence[Outcome], threshold: float) -> list[dict[str, Any]]:
    """Each query's outcome at `threshold`: photos found, missed and wrong, with similarities."""
    out = []
    for q in outcomes:
        answer = q.answers.get(threshold, NO_ANSWER)
        want = wanted(truth, q.person)
        out.append({
            "file": q.file,
            "person": q.person,
            "kind": kind(truth, q.person),
            "face_found": q.face_found,
            "expanded_with": answer.expanded_with,
            "found": {p: round(s, 4) for p, s in sorted(answer.photos.items()) if p in want},
            "missed": sorted(want - set(answer.photos)),
            "wrong": {p: round(s, 4) for p, s in sorted(answer.photos.items()) if p in truth and p not in want},
        })
    return out


def face_checks(truth: Truth, found: Mapping[str, int]) -> dict[str, Any]:
    """Faces found (per labelled photo id) against faces labelled: false faces, faces missed or extra."""
    labelled = {pid: expected_faces(people) for pid, people in truth.items()}
    return {
        "faces_found": sum(found[p] for p in truth),
        "faces_labelled": sum(labelled.values()),
        "false_faces_in_faceless_photos": {p: found[p] for p in truth if labelled[p] == 0 and found[p]},
        "photos_with_fewer_faces_than_labelled": {p: [found[p], labelled[p]] for p in truth
                                                  if found[p] < labelled[p]},
        "photos_with_more_faces_than_labelled": {p: [found[p], labelled[p]] for p in truth
                                                 if labelled[p] and found[p] > labelled[p]},
    }
