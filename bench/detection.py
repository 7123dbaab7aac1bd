"""Face detection, per detector: recall on the event set, build photos/s and job latency on the dev faces.

`python -m bench.detection [--quick]` writes bench/detection.json (committed; `--out` elsewhere), and
`bench.run` runs it as its "detection" section. Compared: YuNet (the default) and HOG (the first
galleries' detector, "today's" in issue 11), each with its default settings. The CPU is shared, so the
compared detectors run interleaved (photo by photo, build by build, job by job) and the report gives
medians and ratios.

- recall: `fsw-index eval-detection` on the event set (`FSW_EVENTS`, default ../shared/events/boxes.csv,
  read in place; skipped with a message when it is not there, and in a quick run), one core;
- build: `index_photos` of the bench's photo tree (copies of the dev gallery photos) into a fresh gallery,
  with every core;
- jobs: a job's path (decode, the selfie's face with its mirror view, search) for every dev selfie with a
  face, against the dev gallery built with the same detector. The ratio is taken over the selfies larger
  than 640 px (phone photos, like the bench's standard query q04); 11 of the 23 dev selfies are 150 px
  crops, where detection is a small part of either detector's job, and are reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import build as build_mod
from bench.common import ROOT, Config, labels, log, ratio, stats
from bench.jobs import fsw_job, job_payload
from indexer.detection_eval import evaluate_detection
from indexer.pipeline import index_photos
from matcher.encoder import Encoder, EncoderSettings, cores
from matcher.gallery import Gallery
from matcher.images import load_image
from schemas.job import data_url

DETECTORS = ("hog", "yunet")  # today's, then the default
EVENTS = Path(os.environ.get("FSW_EVENTS", ROOT.parent / "shared" / "events" / "boxes.csv"))


def measure(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"detectors": {d: _settings(d) for d in DETECTORS}}
    out["events"] = {"skipped": "quick run"} if config.quick else event_recall()
    out["build"] = builds(config)
    out["jobs"] = jobs(config)
    b, j = out["build"], out["jobs"]
    out["yunet_over_hog"] = {
        "build_photos_per_s": ratio(b["yunet"]["photos_per_s"]["median"], b["hog"]["photos_per_s"]["median"]),
        "job_p50": ratio(j["yunet"]["large"]["median_ms"], j["hog"]["large"]["median_ms"]),
        "job_p50_all_selfies": ratio(j["yunet"]["all"]["median_ms"], j["hog"]["all"]["median_ms"]),
    }
    return out


def _settings(detector: str) -> dict[str, Any]:
    s = EncoderSettings(detector=detector)  # type: ignore[arg-type]
    return {k: v for k, v in s.recorded().items() if k not in ("model", "landmarks", "detector_model")}


def event_recall() -> dict[str, Any]:
    if not EVENTS.is_file():
        log(f"  detection: no event set at {EVENTS} (set FSW_EVENTS): recall skipped")
        return {"skipped": f"no event set at {EVENTS}"}
    report = evaluate_detection(EVENTS, [(d, EncoderSettings(detector=d)) for d in DETECTORS],  # type: ignore[arg-type]
                                threads=1)
    for s in report.scores:
        log(f"  detection, {s.name}: {s.recall('>=20'):.1%} of faces >= 20 px, {s.recall('>=40'):.1%} >= 40 px, "
            f"{s.ms_per_photo:.0f} ms a photo")
    return {"boxes": os.path.relpath(EVENTS, ROOT), "photos": report.photos, "min_iou": report.min_iou,
            "threads": 1, "scores": {s.name: s.to_dict() for s in report.scores}, "table": report.table()}


def builds(config: Config) -> dict[str, Any]:
    tree = build_mod.photo_tree(config.tree_photos)
    jobs = config.pool_jobs or cores()
    rates: dict[str, list[float]] = {d: [] for d in DETECTORS}
    faces: dict[str, int] = {}
    for _ in range(config.build_repeats):
        for detector in DETECTORS:
            with tempfile.TemporaryDirectory(prefix="fsw-bench-detect-") as tmp:
                started = time.perf_counter()
                summary = index_photos(Path(tmp) / "g", [tree], EncoderSettings(detector=detector),  # type: ignore[arg-type]
                                       photo_root=tree, jobs=jobs)
                rates[detector].append(summary.photos_indexed / (time.perf_counter() - started))
                faces[detector] = summary.faces
            log(f"  build, {detector}: {rates[detector][-1]:.2f} photos/s")
    return {d: {"photos_per_s": build_mod.rate_stats(rates[d]), "photos": config.tree_photos, "faces": faces[d],
                "jobs": jobs} for d in DETECTORS}


def jobs(config: Config) -> dict[str, Any]:
    selfies = [x for x in labels() if x.split == "query" and x.people != {"none"}]
    payloads = [job_payload(data_url(x.path.read_bytes())) for x in selfies]
    large = [max(load_image(x.path).shape[:2]) > 640 for x in selfies]
    dev = build_mod.dev_gallery_tree(config.dev_photos)
    times: dict[str, list[tuple[bool, float]]] = {d: [] for d in DETECTORS}
    with tempfile.TemporaryDirectory(prefix="fsw-bench-detect-") as tmp:
        galleries, encoders = {}, {}
        for detector in DETECTORS:
            settings = EncoderSettings(detector=detector)  # type: ignore[arg-type]
            index_photos(Path(tmp) / detector, [dev], settings, photo_root=dev, jobs=config.pool_jobs or cores())
            galleries[detector] = Gallery.open(Path(tmp) / detector)
            encoders[detector] = Encoder(settings)
        for detector in DETECTORS:  # warm-up: first calls load models and plan ONNX Runtime's sessions
            fsw_job(galleries[detector], encoders[detector], payloads[0])
        for _ in range(max(1, config.job_repeats // 3)):
            for payload, big in zip(payloads, large, strict=True):
                for detector in DETECTORS:
                    started = time.perf_counter()
                    fsw_job(galleries[detector], encoders[detector], payload)
                    times[detector].append((big, time.perf_counter() - started))
    out: dict[str, Any] = {}
    for d in DETECTORS:
        groups = {"all": [t for _, t in times[d]], "large": [t for b, t in times[d] if b],
                  "crops_150px": [t for b, t in times[d] if not b]}
        out[d] = {name: stats(ts) for name, ts in groups.items() if ts}
        out[d]["selfies"] = {"all": len(selfies), "large": sum(large)}
        log(f"  jobs, {d}: p50 {statistics.median(groups['large']) * 1000:.0f} ms (selfies over 640 px), "
            f"{statistics.median(groups['all']) * 1000:.0f} ms (all {len(selfies)})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.detection", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small tree, one repeat")
    parser.add_argument("--out", type=Path, help="output file [bench/detection.json; a temporary file with --quick]")
    args = parser.parse_args(argv)
    config = Config.smoke(("onnx",)) if args.quick else Config.full(("onnx",))
    out = args.out or (Path(tempfile.gettempdir()) / "fsw-detection-quick.json" if args.quick
                       else Path(__file__).resolve().parent / "detection.json")
    started = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick, "cores": cores(),
              "load_average_start": [round(x, 2) for x in os.getloadavg()], **measure(config)}
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}: yunet/hog build photos/s {result['yunet_over_hog']['build_photos_per_s']}, "
        f"job p50 {result['yunet_over_hog']['job_p50']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
