"""The labelled dev faces and an event's photo tree laid out from them.

The faces live in the repository (tests/data/faces: labels.csv, gallery/, queries/, with their sources
and licences); `FSW_FACES` points the tests and the bench at another labelled set. The labels are read
with `indexer.labels.read_labels`, the one parser of the format.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from indexer.labels import Label, read_labels

ROOT = Path(__file__).resolve().parent.parent
FACES = Path(os.environ.get("FSW_FACES", ROOT / "tests" / "data" / "faces"))
STAGES = ("Day-1/Morning", "Day-2/Evening")


def faces_folder(faces: Path = FACES) -> Path:
    """The labelled set's folder; RuntimeError naming the fix when it holds no labels.csv."""
    if not (faces / "labels.csv").is_file():
        raise RuntimeError(f"labelled faces not found at {faces}: set FSW_FACES to a folder with labels.csv")
    return faces


def labels(faces: Path = FACES) -> list[Label]:
    """The set's labels, in file order (each with its image's `path`)."""
    return read_labels(faces_folder(faces) / "labels.csv")


@dataclass(frozen=True)
class PhotoTree:
    root: Path
    people: dict[str, frozenset[str]]  # photo id -> people in it
    queries: list[Label]

    def photos_of(self, person: str) -> set[str]:
        return {pid for pid, who in self.people.items() if person in who}


def lay_out(labels: list[Label], dest: Path) -> PhotoTree:
    """The gallery photos alternately in two stages, as an event's photo tree (copies, under `dest`)."""
    people = {}
    for i, item in enumerate(x for x in labels if x.split == "gallery"):
        stage = STAGES[i % 2]
        target = dest / stage / Path(item.file).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(item.path, target)
        people[f"{stage}/{target.name}"] = item.people
    return PhotoTree(dest, people, [x for x in labels if x.split == "query"])
