"""Forgotten faces: people who asked not to be found, and the gallery faces that their request hides.

An entry (`Forgotten`) holds one descriptor, a person's selfie's as `matcher.query.selfie_descriptor`
makes it for a search, and a threshold: every gallery face whose similarity to that descriptor exceeds
the threshold is hidden from every search, face by face, so a group photo still comes back for the
others in it. The descriptor is kept, not the selfie (a later `add` brings new photos of the person,
which must be hidden too); nothing else about the person is: no name, no file name, no user id.

Entries live in the gallery (`forgotten-v<N>.json`, named and hashed by the manifest, written by
`matcher.writer`, read here) and, for forgets sent by the portal, in Redis until `fsw-index forget
--from-redis` moves them into the gallery (`worker.forget`). `Gallery` turns them into its hidden face
rows at load (`hidden_mask`). The file: docs/gallery-format.md; what is stored and why: docs/security.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matcher import layout
from matcher.defaults import FORGET_THRESHOLD
from matcher.errors import GalleryError
from matcher.scan import DIM, Descriptors, Scanner
from matcher.search import check_threshold, range_search

FILE_FORMAT = 1  # of the JSON file (its "format" key)
SOURCES = ("selfie", "folder", "portal")  # how the entry came: `fsw-index forget` of a file, of a folder; a job
_NAME = re.compile(r"forgotten-v[0-9]+\.json")
_ID = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class Forgotten:
    """One forgotten face: the faces within `threshold` (similarity) of `descriptor` are hidden."""

    id: str  # 12 hex digits, random: names the entry for `--undo`, says nothing about the person
    descriptor: np.ndarray = field(repr=False)  # float32[128]
    threshold: float = FORGET_THRESHOLD
    created_at: float = 0.0  # epoch seconds
    source: str = "selfie"
    version: int = 0  # the gallery version that first held it; 0 while it is only in Redis

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.id):
            raise ValueError(f"forgotten entry id {self.id!r} is not 12 hex digits")
        d = np.asarray(self.descriptor, dtype=np.float32).reshape(-1)
        if d.size != DIM or not np.isfinite(d).all():
            raise ValueError(f"forgotten entry {self.id}: descriptor must be {DIM} finite numbers")
        object.__setattr__(self, "descriptor", d)
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        if self.source not in SOURCES:
            raise ValueError(f"forgotten entry {self.id}: source must be one of {', '.join(SOURCES)}")

    def to_dict(self) -> dict[str, Any]:
        """As JSON values; the descriptor's float32 values are exact as JSON numbers."""
        return {"id": self.id, "created_at": self.created_at, "source": self.source, "threshold": self.threshold,
                "version": self.version, "descriptor": [float(v) for v in self.descriptor]}

    @classmethod
    def from_dict(cls, raw: Any) -> Forgotten:
        """An entry from its JSON values; ValueError naming what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("a forgotten entry must be a JSON object")
        try:
            numbers = [raw.get("threshold"), raw.get("created_at", 0.0), *raw.get("descriptor", [])]
            if any(isinstance(v, bool) or not isinstance(v, int | float) for v in numbers):
                raise TypeError
            if not isinstance(raw.get("version", 0), int) or not isinstance(raw.get("id"), str):
                raise TypeError
            return cls(raw["id"], np.asarray(raw["descriptor"], np.float32), float(raw["threshold"]),
                       float(raw.get("created_at", 0.0)), str(raw.get("source", "selfie")), raw.get("version", 0))
        except (KeyError, TypeError):
            raise ValueError("a forgotten entry needs an id, a descriptor of numbers and a threshold") from None


def make(descriptor: np.ndarray, threshold: float = FORGET_THRESHOLD, source: str = "selfie") -> Forgotten:
    """A new entry for a selfie's descriptor, with a fresh random id."""
    return Forgotten(secrets.token_hex(6), descriptor, threshold, time.time(), source)


def dumps(entries: Iterable[Forgotten]) -> bytes:
    """A gallery's forgotten file: `{"format": 1, "forgotten": [entry, ...]}`, in the order given, one
    entry a line."""
    lines = ",\n".join(json.dumps(e.to_dict(), sort_keys=True) for e in entries)
    return f'{{"format": {FILE_FORMAT}, "forgotten": [\n{lines}\n]}}\n'.encode()


def loads(data: bytes, name: str = "forgotten file") -> list[Forgotten]:
    """The entries of a forgotten file; GalleryError naming the file when it is not one."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT or not isinstance(doc.get("forgotten"), list):
            raise ValueError(f"not a format {FILE_FORMAT} forgotten file")
        return [Forgotten.from_dict(raw) for raw in doc["forgotten"]]
    except ValueError as e:
        raise GalleryError(f"{name} is not a forgotten faces file ({e}): restore it from a backup") from None


def file_name(version: int) -> str:
    return f"forgotten-v{version}.json"


def read(folder: Path, m: layout.Manifest) -> list[Forgotten]:
    """The entries the manifest names, checked against its sha256 ([] when it names none).

    GalleryError when the file does not match its hash or is not one (a tampered or damaged file hides
    nothing that can be trusted: refused, never half-used); OSError when it is missing (a reader racing a
    commit retries).
    """
    if not m.forgotten:
        return []
    if not _NAME.fullmatch(m.forgotten):
        raise GalleryError(f"manifest names {m.forgotten!r} as the forgotten file: not a forgotten-v<N>.json name")
    data = (folder / m.forgotten).read_bytes()
    if hashlib.sha256(data).hexdigest() != m.forgotten_sha256:
        raise GalleryError(
            f"{folder / m.forgotten} does not match the sha256 the manifest records: the forgotten faces "
            "cannot be trusted; restore the file from a backup"
        )
    return loads(data, str(folder / m.forgotten))


def write(folder: Path, version: int, entries: Sequence[Forgotten]) -> tuple[str, str]:
    """Write the entries as `forgotten-v<version>.json`, readable by its owner only (0600, or 0640 in a
    gallery shared with its group, as every gallery file: `layout.file_mode`), atomically.
    Returns (name, sha256)."""
    name, data = file_name(version), dumps(entries)
    layout.atomic_write(folder / name, data)
    return name, hashlib.sha256(data).hexdigest()


def hidden_rows(scanner: Scanner, vectors: Descriptors | np.ndarray, entry: Forgotten) -> np.ndarray:
    """The face rows `entry` hides: every row (live or not) with similarity above its threshold."""
    rows, _ = range_search(scanner, vectors, entry.descriptor, entry.threshold)
    return rows


def hidden_mask(scanner: Scanner, vectors: Descriptors | np.ndarray, entries: Iterable[Forgotten]) -> np.ndarray:
    """One bool per face row: hidden by any of `entries` (one scan of the whole gallery per entry)."""
    mask = np.zeros(len(vectors), bool)
    for entry in entries:
        mask[hidden_rows(scanner, vectors, entry)] = True
    return mask

