"""Run in a subprocess: open a gallery as a worker does, search it once, and print its memory, as JSON.

    python -m bench.memprobe GALLERY [--hold]
    python -m bench.memprobe --selfie SMALL LARGE     (a job's selfie path: `matcher.query.selfie_descriptor`)
    python -m bench.memprobe --photo SMALL LARGE      (an encoder process's photo: as `fsw-index build` encodes)

With --hold the process then waits until its stdin closes, so that the parent can measure several such
processes at once (`bench.memory.sharing`): what N workers on one machine cost together. --selfie and
--photo run the small image first (models loaded, buffers warm), print the peak RSS, then the large one,
and print the peak again: the large image's own cost is the difference (`bench.memory.per_image`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import psutil

from matcher.gallery import Gallery


def main(folder: str, hold: bool = False) -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    gallery = Gallery.open(folder)
    if len(gallery.vectors):
        gallery.search(np.asarray(gallery.vectors[0]), "")  # a worker serves: every page has been read
    after = process.memory_info().rss
    ids = gallery.photo_ids
    # what the gallery holds besides the descriptors: per-face arrays and the photo id strings
    metadata = (gallery.face_photo.nbytes + gallery.face_boxes.nbytes + gallery.face_live.nbytes
                + gallery.photo_live.nbytes + ids.nbytes + sum(sys.getsizeof(i) for i in ids))
    print(json.dumps({
        "faces": len(gallery.vectors),
        "photos": len(ids),
        "rss_before_open": before,
        "rss_after_open": after,
        "peak_rss": _high_water_mark(),
        "descriptor_bytes": gallery.vectors.nbytes,
        "mapped_descriptor_bytes": sum(b.nbytes for b in gallery.vectors.blocks if not b.flags.owndata),
        "code_bytes": int(getattr(getattr(gallery.scanner, "codes", None), "nbytes", 0)),
        "metadata_bytes": int(metadata),
        **smaps_rollup(),
    }), flush=True)
    if hold:
        sys.stdin.read()


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """A process's Rss and Pss (proportional set size: each shared page divided among the processes that
    map it), split into anonymous and file-backed memory, in bytes (Linux's /proc/PID/smaps_rollup)."""
    out = {}
    wanted = {"Rss": "rss", "Pss": "pss", "Pss_Anon": "pss_anon", "Pss_File": "pss_file"}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in wanted:
                out[wanted[key]] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _high_water_mark() -> int:
    """Peak RSS of this process since exec (VmHWM; ru_maxrss would count the parent's before the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def per_image(kind: str, small: str, large: str) -> None:
    """Peak RSS after a small image, then after a large one, through the selfie or the build photo path."""
    from matcher.encoder import Encoder, EncoderSettings
    from matcher.query import selfie_descriptor

    if kind == "--selfie":
        encoder = Encoder()

        def run(path: str) -> None:
            selfie_descriptor(encoder, Path(path).read_bytes())
    else:
        from indexer import encoding
        from indexer.encoding import Task

        encoding._init(EncoderSettings(threads=1))

        def run(path: str) -> None:
            result = encoding._encode(Task(Path(path), Path(path).name, "", 0, 0.0))
            assert result.error is None, result.error

    run(small)
    warm = _high_water_mark()
    run(large)
    print(json.dumps({"peak_rss_warm": warm, "peak_rss": _high_water_mark()}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] in ("--selfie", "--photo"):
        per_image(*sys.argv[1:4])
    else:
        main(sys.argv[1], "--hold" in sys.argv[2:])
