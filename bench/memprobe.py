"""Run in a subprocess: open a gallery as a worker does and print its RSS, as JSON.

    python -m bench.memprobe GALLERY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil

from matcher.gallery import Gallery


def main(folder: str) -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    gallery = Gallery.open(folder)
    after = process.memory_info().rss
    ids = gallery.photo_ids
    # what the gallery holds besides the descriptors: per-face arrays and the photo id strings
    metadata = (gallery.face_photo.nbytes + gallery.face_boxes.nbytes + gallery.face_live.nbytes
                + gallery.photo_live.nbytes + ids.nbytes + sum(sys.getsizeof(i) for i in ids))
    print(json.dumps({
        "faces": int(gallery.index.ntotal),
        "photos": len(ids),
        "rss_before_open": before,
        "rss_after_open": after,
        "peak_rss": _high_water_mark(),
        "descriptor_bytes": int(gallery.index.ntotal) * 512,
        "metadata_bytes": int(metadata),
    }))


def _high_water_mark() -> int:
    """Peak RSS of this process since exec (VmHWM; ru_maxrss would count the parent's before the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main(sys.argv[1])
