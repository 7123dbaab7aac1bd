"""Markdown tables of a results.json, printed at the end of a run (and the README's source)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ms(st: dict[str, Any] | None, digits: int = 0) -> str:
    if not st:
        return "-"
    return f"{st['median_ms']:.{digits}f} ({st['p25_ms']:.{digits}f}-{st['p75_ms']:.{digits}f})"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(r: dict[str, Any]) -> str:
    out: list[str] = []
    meta = r.get("meta", {})
    m = meta.get("machine", {})
    out.append(f"fsw benchmarks ({meta.get('mode')} run), {meta.get('date')}, {m.get('cpu')}, {m.get('cores')} cores, "
               f"{m.get('ram_gb')} GB; load average {meta.get('load_average_start')} at start, "
               f"{meta.get('load_average_end')} at end; {meta.get('elapsed_s')} s")
    for name, value in r.items():
        if isinstance(value, dict) and "error" in value:
            out.append(f"\n**{name}: failed**: {value['error']}")

    jobs = r.get("jobs", {})
    if "fsw" in jobs:
        worker = r.get("worker", {}).get("sizes", {})
        out.append("\nPer-job latency, ms: median (p25-p75)\n")
        rows = []
        for size in jobs["sizes"]:
            s = str(size)
            rows.append([f"{size:,}", _ms(jobs["fsw"].get("onnx", {}).get(s)), _ms(jobs["fsw"].get("dlib", {}).get(s)),
                         _ms(worker.get(s, {}).get("latency")) if worker else "not measured",
                         _ms(jobs["numpy"].get(s))])
        out.append(_table(["faces", "fsw, ONNX engine", "fsw, dlib engine", "fsw-worker via Redis",
                           "numpy exhaustive"], rows))
    old = r.get("old_way", {})
    if old.get("measured"):
        out.append("\nThe old way (every photo detected and encoded per job, 4 jitters, 68-point model)\n")
        ratios = old.get("ratios", {})
        key = next((k for k in ratios if "_onnx_" in k), None)
        rows = [[row["photos"], f"{row['latency']['median_ms'] / 1000:.2f} ({row['latency']['n']} runs)",
                 ratios.get(key, {}).get(str(row["photos"]), "-") if key else "-"] for row in old["measured"]]
        ext = old.get("extrapolated_1000", {})
        rows.append(["1,000 (extrapolated)", f"{ext.get('median_ms', 0) / 1000:.0f}",
                     ratios.get(key, {}).get("1000 (extrapolated)", "-") if key else "-"])
        out.append(_table(["photos in the stage", "old way, s", "old way / fsw (ONNX, smallest gallery)"], rows))

    search = r.get("search", {})
    if search.get("sizes"):
        bw = search["bandwidth"]["gb_per_s"]
        out.append(f"\nSearch alone, ms: median (p25-p75); floor = bytes / {bw} GB/s (numpy copy, read + write)\n")
        by_size = sorted(search["sizes"].items(), key=lambda x: int(x[0]))
        rows = [[f"{int(k):,}", _ms(v["fsw"], 2), _ms(v["faiss_range"], 2), _ms(v.get("faiss_split_threads"), 2),
                 _ms(v["numpy_matmul"], 2), f"{v['floor_ms']:.2f}", v["fsw_over_floor"]] for k, v in by_size]
        out.append(_table(["faces", "fsw Gallery.search", "FAISS range search", "FAISS, rows split over the cores",
                           "numpy matmul", "floor", "fsw / floor"], rows))

    b = r.get("build", {})
    if b.get("tree_builds"):
        out.append(f"\nGallery build, {b['tree_photos']} photos (ONNX engine)\n")
        rows = [[f"fsw, {x['jobs']} process(es)", f"{x['photos_per_s']:.2f}", f"{x['faces_per_s']:.2f}",
                 f"{x['seconds']:.1f}"] for x in b["tree_builds"]]
        raw = b["raw_onnx"]
        rows.append(["raw dlib calls + ONNX, one loop", f"{raw['floor_photos_per_s']:.2f}",
                     f"{raw['faces'] / sum(raw['seconds'].values()):.2f}", f"{sum(raw['seconds'].values()):.1f}"])
        out.append(_table(["", "photos/s", "faces/s", "s"], rows))
        out.append(f"\n2 processes / 1: {b.get('speedup_2_over_1')}x; overhead of fsw (1 process) over the raw loop: "
                   f"{100 * b.get('overhead_over_raw', 0):.1f}%\n")
        out.append("Where a photo's time goes, ms per photo: " + ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in b["per_photo_ms"].items()))
        dev = b.get("dev_gallery", {})
        rates = {e: dev[e]["photos_per_s"] for e in ("onnx", "dlib") if e in dev}
        rows = [[e, x["median"], f"{x['min']}-{x['max']}"] for e, x in rates.items()]
        if rows:
            out.append(f"\nBuild of the dev gallery ({dev[rows[0][0]]['photos']} photos, {dev[rows[0][0]]['jobs']} "
                       "processes), photos/s\n")
            out.append(_table(["engine", "median", "min-max"], rows))
            out.append(f"\nraw per-photo ms on the dev gallery: {dev.get('raw_per_photo_ms')}")
        if b.get("add"):
            out.append("\n`add` of new photos, s: median (p25-p75)\n")
            out.append(_table(["gallery photos", "photos added", "add, s"],
                              [[a["base_photos"], a["added_photos"],
                                f"{a['latency']['median_ms'] / 1000:.2f} ({a['latency']['p25_ms'] / 1000:.2f}-"
                                f"{a['latency']['p75_ms'] / 1000:.2f})"] for a in b["add"]]))

    mem = r.get("memory", {})
    if "processes" in mem:
        out.append("\nMemory of a process holding the gallery (Gallery.open), MB\n")
        rows = [[f"{int(k):,}", f"{v['rss_after_open'] / 2**20:.0f}", f"{v['peak_rss'] / 2**20:.0f}"]
                for k, v in sorted(mem["processes"].items(), key=lambda x: int(x[0]))]
        worker = r.get("worker", {}).get("sizes", {})
        for k, v in sorted(worker.items(), key=lambda x: int(x[0])):
            rows.append([f"{int(k):,} (fsw-worker)", f"{v['rss_bytes'] / 2**20:.0f}", "-"])
        out.append(_table(["faces", "RSS", "peak RSS"], rows))
        if "bytes_per_face" in mem:
            out.append(f"\n{mem['bytes_per_face']} bytes per face (512 descriptor + {mem['metadata_bytes_per_face']} "
                       f"metadata; target {mem['target_bytes_per_face']})")

    enc = r.get("encoder", {})
    if enc.get("descriptor_engines"):
        d = enc["descriptor_engines"]
        out.append("\nDescriptor engines, ms per face: median (p25-p75)\n")
        out.append(_table(["engine", "batch 1", "batch 16"],
                          [[e, _ms(d[e]["batch_1_ms_per_face"], 2), _ms(d[e]["batch_16_ms_per_face"], 2)]
                           for e in ("dlib", "onnx", "onnx_1_thread")
                           if e in d]))
        out.append(f"\ndlib / ONNX: {d['dlib_over_onnx']}; "
                   f"dlib batched / one by one: {d['dlib_batched_over_per_face']}; the network is "
                   f"{d['network_gflop_per_face']} GFLOP a face; GFLOP/s at batch 16: {d['achieved_gflop_per_s']}")
    if enc.get("detection_grid"):
        out.append(f"\nDetection settings on {enc['detection_grid'][0]['photos']} dev gallery photos (default "
                   f"{enc['default']['max_side']} px, upsample {enc['default']['upsample']})\n")
        rows = [[g["max_side"], g["upsample"], g["mean_ms_per_photo"], g["detect_per_photo"]["median_ms"],
                 f"{g['faces_found']}/{g['faces_expected']}", g["faces_missed"], g["faces_extra"], g["photos_exact"]]
                for g in enc["detection_grid"]]
        out.append(_table(["max side", "upsample", "ms/photo (mean)", "detect ms (median)", "found/listed",
                           "missed", "extra", "photos exact"], rows))

    if r.get("targets"):
        out.append("\nTargets\n")
        out.append(_table(["target", "wanted", "measured", "met"],
                          [[t["name"], t["target"], t["value"], {True: "yes", False: "**no**", None: "-"}[t["met"]]]
                           for t in r["targets"]]))
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json").read_text())))
