"""Memory: what a process holding the gallery costs, from empty to 1M faces, bytes per face, and what
several processes on one machine cost together (they share the mapped descriptors: `matcher.gallery`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import ROOT, ratio
from bench.memprobe import smaps_rollup

TARGET_BYTES = 512
PROBE = [sys.executable, "-m", "bench.memprobe"]


def probe(gallery: Path) -> dict[str, int]:
    p = subprocess.run([*PROBE, str(gallery)], cwd=ROOT, capture_output=True, text=True, timeout=1200, check=True)
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


def per_image(workdir: Path) -> dict[str, Any]:
    """Peak RSS that one large image adds to a process: a job's 40 MP selfie (the largest a job may send) in
    a worker, and a 64 MP photo (the build's pixel limit) in an encoder process (one per core). Each in a
    fresh process that first ran a small image, so that models and buffers are counted in neither."""
    from PIL import Image

    from testkit.photos import FACES

    workdir.mkdir(parents=True, exist_ok=True)
    face = Image.open(FACES / "queries" / "q01.jpg").convert("RGB")
    face.save(workdir / "small.jpg", quality=90)
    out: dict[str, Any] = {}
    for kind, (width, height) in (("selfie", (7680, 5200)), ("photo", (9792, 6528))):
        large = workdir / f"{kind}-{width}x{height}.jpg"
        canvas = Image.new("RGB", (width, height), (90, 110, 130))
        canvas.paste(face.resize((height // 2, height // 2)), (width // 4, height // 4))
        canvas.save(large, quality=90)
        del canvas
        p = subprocess.run([*PROBE, f"--{kind}", str(workdir / "small.jpg"), str(large)], cwd=ROOT,
                           capture_output=True, text=True, timeout=1200, check=True)
        got = json.loads(p.stdout.strip().splitlines()[-1])
        out[kind] = {
            "megapixels": round(width * height / 1e6, 1),
            "peak_rss_mb": round(got["peak_rss"] / 2**20, 1),
            "added_peak_rss_mb": round((got["peak_rss"] - got["peak_rss_warm"]) / 2**20, 1),
        }
        large.unlink()
    return out


def sharing(gallery: Path, counts: tuple[int, ...] = (1, 4)) -> dict[str, Any]:
    """N processes that each open the gallery as a worker does and search it once, all alive at once:
    their RSS and PSS summed (PSS divides each shared page among the processes that map it, so the sum
    is what they cost the machine together)."""
    out: dict[str, Any] = {"gallery": gallery.name, "processes": {}}
    for n in counts:
        procs = [subprocess.Popen([*PROBE, str(gallery), "--hold"], cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(n)]
        try:
            opened = [json.loads(p.stdout.readline()) for p in procs]  # each has opened and searched
            now = [smaps_rollup(p.pid) for p in procs]  # measured while all of them hold the gallery
        finally:
            for p in procs:
                p.communicate(timeout=120)
        out["faces"] = opened[0]["faces"]
        out["mapped_descriptor_bytes"] = opened[0]["mapped_descriptor_bytes"]
        out["code_bytes"] = opened[0].get("code_bytes", 0)
        out["processes"][str(n)] = {
            "rss_mb": round(sum(m["rss"] for m in now) / 2**20, 1),
            "pss_mb": round(sum(m["pss"] for m in now) / 2**20, 1),
            "pss_anon_mb": round(sum(m["pss_anon"] for m in now) / 2**20, 1),
            "pss_file_mb": round(sum(m["pss_file"] for m in now) / 2**20, 1),
            "pss_each_mb": [round(m["pss"] / 2**20, 1) for m in now],
        }
    first, last = str(counts[0]), str(counts[-1])
    by = out["processes"]
    out[f"pss_{last}_over_{first}"] = ratio(by[last]["pss_mb"], by[first]["pss_mb"])
    out[f"rss_{last}_over_{first}"] = ratio(by[last]["rss_mb"], by[first]["rss_mb"])
    return out
