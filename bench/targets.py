"""The issues' targets, checked against one run's numbers: met or missed, and by how much."""

from __future__ import annotations

from typing import Any


def _target(name: str, value: float | None, limit: float, higher_is_better: bool, unit: str = "x") -> dict[str, Any]:
    if value is None:
        return {"name": name, "target": limit, "value": None, "met": None, "margin": None}
    met = value >= limit if higher_is_better else value <= limit
    return {"name": name, "target": f"{'>=' if higher_is_better else '<='} {limit}{unit}", "value": value,
            "met": met, "margin": round(value / limit, 3)}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    jobs = r.get("jobs", {})
    interleaved = _get(jobs, "interleaved", "largest_over_smallest")  # runs before it measured the sizes apart
    out.append(_target("job latency, largest gallery / smallest (fsw, onnx)",  # issue 13: 1M faces / 1k
                       interleaved if interleaved is not None else _get(jobs, "largest_over_smallest", "onnx"),
                       1.25, False))
    out.append(_target("a staged job at 10M faces / the same job at 1k", _get(r, "scale", "stage_10m_over_1k"),
                       1.1, False))
    w = _get(r, "worker", "sizes")
    if w:
        sizes = sorted(w, key=int)
        out.append(_target("job latency through the worker, largest / smallest",
                           round(w[sizes[-1]]["latency"]["median_ms"] / w[sizes[0]]["latency"]["median_ms"], 3),
                           1.5, False))
    s = _get(r, "search", "sizes")
    if s:
        largest = s[max(s, key=int)]
        out.append(_target(f"search alone at {int(largest['faces']):,} faces / memory-bandwidth floor",
                           largest["fsw_over_floor"], 1.3, False))
    ratios = _get(r, "old_way", "ratios")
    if ratios:
        key = next((k for k in ratios if "_onnx_" in k), next(iter(ratios)))
        out.append(_target("old way / fsw at 1,000 photos (extrapolated)", ratios[key].get("1000 (extrapolated)"),
                           1000, True))
    b = r.get("build", {})
    out.append(_target("build, 2 processes / 1 process", b.get("speedup_2_over_1"), 1.7, True))
    out.append(_target("build overhead over raw dlib calls (1 process)", b.get("overhead_over_raw"), 0.15, False,
                       unit=""))
    out.append(_target("add: cost at the largest base / smallest", b.get("add_largest_over_smallest"), 1.2, False))
    m = r.get("memory", {})
    out.append(_target("PSS of 4 processes holding the largest gallery / 1", _get(m, "sharing", "pss_4_over_1"),
                       1.5, False))
    if "bytes_per_face" in m:
        out.append(_target("worker bytes per face / (1.2 x (512 + metadata))",
                           round(m["bytes_per_face"] / m["target_bytes_per_face"], 3), 1.0, False))
    e = _get(r, "encoder", "descriptor_engines", "dlib_over_onnx")
    if e:
        out.append(_target("ONNX descriptor speed-up over dlib, batch 1", e["batch_1_ms_per_face"], 20, True))
        out.append(_target("ONNX descriptor speed-up over dlib, batch 16", e["batch_16_ms_per_face"], 20, True))
    o = _get(jobs, "onnx_over_dlib")
    if o:
        out.append(_target("job latency, onnx engine / dlib engine (smallest gallery)", o[min(o, key=int)], 0.6,
                           False))
    out.append(_target("build of the dev gallery, onnx photos/s / dlib photos/s",
                       _get(b, "dev_gallery", "onnx_over_dlib"), 2.0, True))
    f = r.get("fleet", {})  # issue 14's targets (bench/fleet.py)
    out.append(_target("fleet build photos/s, 2 workers / 1 worker", f.get("fleet_2_over_1"), 1.8, True))
    out.append(_target("fleet queue overhead per photo / a photo's encode time", _get(f, "queue_overhead", "share"),
                       0.05, False, unit=""))
    d = r.get("detection", {})  # issue 11's targets for the default detector (bench/detection.py)
    for at_least, limit in ((">=20", 0.85), (">=40", 0.95)):
        out.append(_target(f"event set: share of faces {at_least} px the default detector finds",
                           _get(d, "events", "scores", "yunet", "recall", at_least), limit, True, unit=""))
    out.append(_target("build photos/s, yunet / hog (same tree)", _get(d, "yunet_over_hog", "build_photos_per_s"),
                       3.0, True))
    out.append(_target("job p50, yunet / hog (dev selfies)", _get(d, "yunet_over_hog", "job_p50"), 0.5, False))
    return out
