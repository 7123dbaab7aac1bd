"""A gallery writer that commits synthetic photos in a loop, to be killed at random points.

Run as a script: `python writer_loop.py GALLERY [--batch B] [--commits N]`. Version v of the gallery always holds the
same content whatever kills happened before (it is a function of v alone, see `changes_at`), so the
test that kills this process can say exactly what each committed version must answer. The loop does
nothing but prepare rows and commit, so a kill almost always lands inside the store's own work:
opening the writer (clean-up of a dead writer's leftovers), writing row files, merging them, writing
the FAISS index, writing the manifest, deleting old files.

Prints `phase <what>` before each step of the store's work (by wrapping the store's functions, so that
the killer knows where each kill landed: the last phase printed), `open` once its writer holds the
gallery, and `committed <v>` after each commit.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SETTINGS = {"model": "synthetic", "landmarks": "5-point", "detector": "hog", "upsample": 0, "jitters": 1,
            "max_side": 1600}
BATCH = 600  # photos per version, about: commits big enough that kills land inside HDF5 writes


@dataclass
class Changes:
    """What version v changes: photos added (id -> descriptors), ids or stages removed."""

    added: dict[str, np.ndarray] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    final: bool = False  # commit with final=True (may rewrite the FAISS index)


def changes_at(v: int, batch: int = BATCH) -> Changes:
    rng = np.random.default_rng(v)
    out = Changes(final=v % 3 == 0)
    for i in range(int(rng.integers(batch // 4, 2 * batch))):
        faces = rng.normal(size=(int(rng.integers(0, 4)), 128))
        faces *= 1.5 / np.linalg.norm(faces, axis=1, keepdims=True)
        out.added[f"v{v}/p{i}.jpg"] = faces.astype(np.float32)
    if v % 4 == 0 and v > 2:
        out.removed.append(f"v{v - 2}/p0.jpg")  # one photo
    if v % 5 == 0 and v > 3:
        out.removed.append(f"v{v - 3}")  # a whole stage
    if v % 7 == 0 and v > 1:  # the same id again with new content replaces the old photo
        out.added[f"v{v - 1}/p1.jpg"] = np.full((1, 128), 0.1 * (v % 11), np.float32)
    return out


def expected(version: int, batch: int = BATCH) -> dict[str, np.ndarray]:
    """The live photos of `version` and their descriptors."""
    live: dict[str, np.ndarray] = {}
    for v in range(1, version + 1):
        c = changes_at(v, batch)
        for target in c.removed:
            for pid in [p for p in live if p == target or p.startswith(target + "/")]:
                del live[pid]
        live.update(c.added)
    return live


def content_hash(pid: str, faces: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(pid.encode() + faces.tobytes()).hexdigest()


def _print_phases() -> None:
    from matcher import layout, rows, writer

    def marked(phase: str, fn):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            print(f"phase {phase}", flush=True)  # one string, one write: see "committed" below
            return fn(*args, **kwargs)

        return run

    rows.read_file = marked("reading row files (to merge them, or on opening)", rows.read_file)
    writer._write_file = marked("writing a row file", writer._write_file)
    writer.GalleryWriter._write_index = marked("writing the FAISS index", writer.GalleryWriter._write_index)
    layout.write_manifest = marked("writing the manifest", layout.write_manifest)


def main() -> None:
    from matcher.encoder import Face
    from matcher.writer import GalleryWriter, PendingPhoto

    _print_phases()

    ap = argparse.ArgumentParser()
    ap.add_argument("gallery", type=Path)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--commits", type=int, default=10**9)
    args = ap.parse_args()
    print("phase opening the gallery (clean-up of leftovers)", flush=True)
    with GalleryWriter(args.gallery, SETTINGS, args.gallery.parent, command="writer_loop", create=True) as w:
        print("open", flush=True)
        for _ in range(args.commits):
            print("phase preparing rows in memory (the loop's, then the commit's)", flush=True)
            v = w.manifest.version + 1
            c = changes_at(v, args.batch)
            w.remove(c.removed)
            for pid, faces in c.added.items():
                w.add(PendingPhoto.from_faces(pid, content_hash(pid, faces), 100, 1.0,
                                              [Face((1, 2, 3, 4), d) for d in faces]))
            w.commit(final=c.final)
            # One string: under PYTHONUNBUFFERED print writes each argument apart, and a kill between them
            # left a bare "committed" line that the test could not read.
            print(f"committed {w.manifest.version}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
