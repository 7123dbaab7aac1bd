"""The FAISS index file of a gallery version: checked before FAISS may read it, then read memory-mapped.

`index-v<N>.faiss` caches the first `index_faces` descriptors of the row files (docs/gallery-format.md).
FAISS believes what a file says: one swapped vector is searched as it is (a selfie then found another
person's photo at similarity 1.0), and an altered 8-byte length made a load allocate 4 GiB. So a reader
(`Gallery.open`, `fsw-index verify`) hands FAISS only a file that is what the writer recorded (`problem`):
a plain file with the manifest's sha256, of the size `index_faces` vectors make, with the header FAISS
writes for them, so that what FAISS reads is bounded by the file and the file by the manifest. A file
that is not is never read: `Gallery` reads those descriptors from the row files instead (the index is a
cache of them) and logs why; `fsw-index verify` reports it.

The hash costs one read of the file (about 1 s a GB here) in each process at its first load; a reload
whose manifest names the same unchanged file skips it.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from matcher import layout
from matcher.errors import GalleryError

DIM = 128  # floats in a descriptor


def problem(folder: Path, m: layout.Manifest) -> str | None:
    """Why the index file `m` names must not be read (one line, naming the file), or None when it is the
    one the writer recorded. `m.index` must be set."""
    assert m.index is not None
    path = folder / m.index
    return recorded_file_problem(path, m.index_sha256, "index_sha256", lambda st: _flat_problem(path, m, st))


def _flat_problem(path: Path, m: layout.Manifest, st: os.stat_result) -> str | None:
    """The hash matched, so whoever changed the file recorded its hash too: the size and header still bound
    what FAISS would read to what `index_faces` vectors take."""
    header = expected_header(m.index_faces)
    if header is None:
        return f"{m.index}: this FAISS ({faiss.__version__}) writes flat indexes in a layout fsw does not know"
    size = len(header) + m.index_faces * DIM * 4
    if st.st_size != size:
        return f"{m.index}: {st.st_size} bytes, where {m.index_faces} vectors take {size}"
    with path.open("rb") as f:
        if f.read(len(header)) != header:
            return f"{m.index}: its header is not that of a flat index of {m.index_faces} vectors of {DIM}"
    return None


def recorded_file_problem(
    path: Path, sha256: str | None, field: str, contents: Callable[[os.stat_result], str | None]
) -> str | None:
    """Why a FAISS file a manifest names is not the one its writer recorded: missing, not a plain file, a
    sha256 other than the manifest's `field`, or what `contents` finds wrong once the hash matched (its size,
    its header); None when it is the one. For the index file and the codes file (`matcher.coarse`) alike."""
    name = path.name
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{name}: named by the manifest but missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{name}: not a plain file (a link, a folder, a device): the writer writes plain files only"
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if _checked.get((str(path), sha256)) == identity:
        return None  # this process checked this very file (a reload after an add that kept the index)
    sha = layout.file_sha256(path)
    if sha != sha256:
        return (f"{name}: sha256 {sha[:12]}... differs from the manifest's {field} "
                f"{str(sha256)[:12]}...; the file is damaged or was replaced")
    why = contents(st)
    if why is None:
        _checked[(str(path), sha256)] = identity
    return why


# Files this process found sound, by path and recorded hash, with the identity they had then: a file
# changed since has another ctime (any write sets it, and no one can set it back but the clock's owner),
# so a reload whose manifest names the same unchanged file does not read 5 GB again at 10M faces.
_checked: dict[tuple[str, str | None], tuple[int, ...]] = {}


def expected_header(faces: int) -> bytes | None:
    """The bytes before the vectors in FAISS's file of an IndexFlatL2 of `faces` vectors: 'IxF2', d (int32),
    ntotal (int64), two unused int64, is_trained (uint8), metric (int32), the vectors' length in floats
    (uint64). None when this FAISS writes another layout (checked once against its own output)."""
    empty = _empty_file()
    if empty is None:
        return None
    header = bytearray(empty)
    header[8:16] = struct.pack("<q", faces)
    header[-8:] = struct.pack("<Q", faces * DIM)
    return bytes(header)


@functools.cache
def _empty_file() -> bytes | None:
    """FAISS's file of an empty IndexFlatL2, when its layout is the one `expected_header` describes."""
    empty = faiss.serialize_index(faiss.IndexFlatL2(DIM)).tobytes()
    two = faiss.IndexFlatL2(DIM)
    vectors = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM)
    two.add(vectors)
    header = bytearray(empty)
    header[8:16] = struct.pack("<q", 2)
    header[-8:] = struct.pack("<Q", 2 * DIM)
    known = faiss.serialize_index(two).tobytes() == bytes(header) + vectors.tobytes()
    return empty if known else None


def read(path: Path) -> faiss.IndexFlat:
    """A FAISS flat index file (one `problem` passed), its rows memory-mapped read-only and shared
    (MAP_SHARED, PROT_READ): every process that maps the same file reads the same pages of the page cache."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:  # a FAISS without mapping on this system: a private copy, as before
        index = faiss.read_index(str(path))
    if not isinstance(index, faiss.IndexFlat):
        raise GalleryError(f"{path.name} is not a flat FAISS index: rebuild it with `fsw-index build`")
    return index
