"""Memory: what a process holding the gallery costs, from empty to 1M faces, and bytes per face."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT

TARGET_BYTES = 512


def probe(gallery: Path) -> dict[str, int]:
    p = subprocess.run([sys.executable, "-m", "bench.memprobe", str(gallery)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(galleries: dict[int, Path]) -> dict[str, object]:
    rows = {faces: probe(path) for faces, path in sorted(galleries.items())}
    empty = rows[min(rows)]
    out: dict[str, object] = {"processes": {str(k): v for k, v in rows.items()}}
    largest = max(rows)
    if largest > 0:
        big = rows[largest]
        per_face = (big["rss_after_open"] - empty["rss_after_open"]) / big["faces"]
        metadata = big["metadata_bytes"] / big["faces"]
        out.update({
            "largest_faces": big["faces"],
            "rss_empty_mb": round(empty["rss_after_open"] / 2**20, 1),
            "rss_largest_mb": round(big["rss_after_open"] / 2**20, 1),
            "peak_largest_mb": round(big["peak_rss"] / 2**20, 1),
            "bytes_per_face": round(per_face, 1),
            "metadata_bytes_per_face": round(metadata, 1),
            "target_bytes_per_face": round(1.2 * (TARGET_BYTES + metadata), 1),
            "over_descriptor": round(per_face / TARGET_BYTES, 3),
        })
    return out
