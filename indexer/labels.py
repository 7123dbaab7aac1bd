"""The labelled set: the one parser of a labels CSV file, used by `fsw-index eval`, the bench and the tests.

The file has a header and one row per image:

    file,identity,split
    gallery/g02.jpg,obama;biden;unknown,gallery
    gallery/g04.jpg,none,gallery
    queries/q01.jpg,biden,query
    queries/q06.jpg,none,query

- `file`: the image's path relative to the CSV file's folder (or absolute).
- `split`: `gallery` for an event photo, `query` for a selfie.
- `identity`: who is in the image. A gallery photo lists every person in it, separated by `;`, with
  `unknown` for each person without a name (it counts toward the faces the photo should yield) and
  `none` alone for a photo without a face. A query names one person: someone in gallery photos, a
  stranger (a name in no gallery row), or `none` for an image without a face.
An event team can label a sample of its own photos this way (a few dozen photos, a selfie or two for
each of a dozen people, some strangers and a faceless image) and check a threshold before a convocation.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from matcher.errors import FswError

NOT_PEOPLE = frozenset({"unknown", "none"})


class LabelsError(FswError):
    """A labels file that cannot be evaluated as written."""


@dataclass(frozen=True)
class Label:
    file: str  # as written in the CSV file, e.g. gallery/g01.jpg
    people: frozenset[str]
    split: str  # 'gallery' or 'query'
    path: Path

    @property
    def person(self) -> str:
        """A query's one person ('none' for an image without a face)."""
        return next(iter(self.people))

    @property
    def expected_faces(self) -> int:
        return expected_faces(self.people)


def expected_faces(people: frozenset[str]) -> int:
    """The faces a gallery photo should yield: one per person listed, none for 'none'."""
    return 0 if people == {"none"} else len(people)


def read_labels(csv_path: str | Path) -> list[Label]:
    """The rows of a labels file (see the module's docstring), checked, in file order. Raises LabelsError."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LabelsError(f"cannot read labels {csv_path}: {e}") from None
    if not {"file", "identity", "split"} <= header:
        raise LabelsError(f"{csv_path} needs a header line 'file,identity,split' and at least one row")
    out: list[Label] = []
    seen: set[str] = set()
    for n, row in enumerate(rows, start=2):
        where = f"{csv_path}, line {n}"
        file, split = (row["file"] or "").strip(), (row["split"] or "").strip()
        people = frozenset(p.strip() for p in (row["identity"] or "").split(";") if p.strip())
        if split not in ("gallery", "query"):
            raise LabelsError(f"{where}: split must be 'gallery' or 'query', not {split!r}")
        if not file or not people:
            raise LabelsError(f"{where}: a row needs a file and an identity")
        if "none" in people and len(people) > 1:
            raise LabelsError(f"{where}: 'none' means no face, so it stands alone")
        if split == "query" and (len(people) > 1 or people == {"unknown"}):
            raise LabelsError(f"{where}: a query names one person (a name, or 'none' for no face)")
        if file in seen:
            raise LabelsError(f"{where}: {file} is listed twice")
        seen.add(file)
        path = csv_path.parent / file
        if not path.is_file():
            raise LabelsError(f"{where}: {path} does not exist")
        out.append(Label(file, people, split, path))
    if not any(x.split == "gallery" for x in out) or not any(x.split == "query" for x in out):
        raise LabelsError(f"{csv_path} needs gallery rows and query rows")
    return out
