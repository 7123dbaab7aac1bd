"""`python -m bench.run [--quick]`: measure fsw on this machine and write results.json, job-latency.png and the page.

The full run (about 12 minutes on 2 cores) writes bench/results.json and bench/job-latency.png, and renders
docs/performance.md from them (`bench.report`); all three are committed. `--quick` is a smoke run (small
sizes, few repeats, about 1.5 minutes) that writes the three to a temporary folder unless `--out` says
otherwise, so it never overwrites the committed results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import FACES, QUERY, ROOT, Config, log
from schemas.job import data_url

HERE = Path(__file__).resolve().parent
SECTIONS = ("jobs", "search", "worker", "memory", "stages", "old_way", "build", "encoder", "detection", "scale",
            "fleet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats")
    parser.add_argument("--out", type=Path, help="folder for results.json and job-latency.png "
                        "[bench/ for a full run, a temporary folder with --quick]")
    parser.add_argument("--encoder", choices=["onnx", "dlib", "both"], default="both",
                        help="descriptor engine(s) to measure jobs and builds with")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    engines = ("onnx", "dlib") if args.encoder == "both" else (args.encoder,)
    config = Config.smoke(engines) if args.quick else Config.full(engines)
    out = args.out or (Path(tempfile.gettempdir()) / "fsw-bench-quick" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    results = run(config, set(args.only or SECTIONS))
    from bench import plot, report

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot.draw(results, out / "job-latency.png")
    # the committed results render the committed page; any other folder gets its page beside its results
    page = report.PAGE if out.resolve() == HERE else out / "performance.md"
    report.write(report.with_side_sections(results, out), page, os.path.relpath(out / "job-latency.png", page.parent),
                 report.source_name(out))
    print(report.markdown(results, plot=None))
    log(f"wrote {out / 'results.json'}, {out / 'job-latency.png'} and {page} in {results['meta']['elapsed_s']:.0f} s")
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


def run(config: Config, sections: set[str]) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"meta": meta(config)}

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name not in sections:
            return
        log(f"[{time.perf_counter() - started:5.0f} s] {name}")
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # one broken section must not hide the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results["meta"]["section_seconds"][name] = round(time.perf_counter() - t, 1)
        gc.collect()

    from bench import detection, fleet
    from bench import sections as s

    ctx = s.Context(config, data_url((FACES / QUERY).read_bytes()))
    section("jobs", lambda: s.jobs(ctx))
    section("search", lambda: s.search(ctx))
    section("worker", lambda: s.worker(ctx))
    section("memory", lambda: s.memory(ctx))
    section("stages", lambda: s.stages(ctx))
    section("old_way", lambda: s.old_way(ctx, results.get("jobs")))
    section("build", lambda: s.build(ctx))
    section("encoder", lambda: s.encoder(ctx))
    section("detection", lambda: detection.measure(config))
    section("scale", lambda: s.scale(ctx, results.get("search")))
    section("fleet", lambda: fleet.measure(config))
    results["synthetic"] = ctx.synthetic_info()
    from bench import targets

    results["targets"] = targets.evaluate(results)
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def meta(config: Config) -> dict[str, Any]:
    import dlib
    import faiss
    import numpy
    import onnxruntime
    import psutil

    from matcher.encoder import EncoderSettings, cores

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        # what was measured is the working tree: name the code files that differ from the commit
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "matcher", "indexer", "worker", "schemas"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.splitlines()
    except OSError:
        commit, dirty = "", []
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if config.quick else "full",
        "machine": {"cpu": cpu, "cores": cores(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version(), "numpy": numpy.__version__, "faiss": faiss.__version__,
                    "onnxruntime": onnxruntime.__version__, "dlib": dlib.__version__},
        "git_commit": commit,
        "uncommitted_code": [line.strip() for line in dirty],
        "encoder_settings": EncoderSettings().as_dict(),
        "faces": os.path.relpath(FACES, ROOT),
        "query": QUERY,
        "engines": list(config.engines),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "section_seconds": {},
    }


if __name__ == "__main__":
    raise SystemExit(main())
