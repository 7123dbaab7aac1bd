"""bench/job-latency.png: per-job latency against gallery size (log-log), and search alone next to its floor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _line(ax: Any, by_size: dict[str, dict[str, float]], label: str, style: str, color: str | None = None) -> None:
    xs = sorted(by_size, key=int)
    x = [int(s) for s in xs]
    y = [by_size[s]["median_ms"] for s in xs]
    lo = [by_size[s]["median_ms"] - by_size[s]["p25_ms"] for s in xs]
    hi = [by_size[s]["p75_ms"] - by_size[s]["median_ms"] for s in xs]
    ax.errorbar(x, y, yerr=[lo, hi], fmt=style, label=label, capsize=3, markersize=5, color=color)


def draw(results: dict[str, Any], path: Path) -> None:
    fig, (jobs_ax, search_ax) = plt.subplots(1, 2, figsize=(13, 5.2))
    jobs = results.get("jobs", {})
    names = {"onnx": "fsw (matcher, ONNX engine)", "dlib": "fsw (matcher, dlib engine)"}
    for engine, by_size in jobs.get("fsw", {}).items():
        _line(jobs_ax, by_size, names.get(engine, engine), "o-" if engine == "onnx" else "s-",
              "tab:blue" if engine == "onnx" else "tab:orange")
    worker = results.get("worker", {})
    if worker.get("sizes"):
        _line(jobs_ax, {k: v["latency"] for k, v in worker["sizes"].items()}, "fsw-worker via Redis (ONNX)", "D-",
              "tab:green")
    if jobs.get("numpy"):
        _line(jobs_ax, jobs["numpy"], "numpy exhaustive (same descriptors)", "^-", "tab:purple")
    old = results.get("old_way", {})
    if old.get("measured"):
        per_photo = _faces_per_photo(results)
        x = [row["photos"] * per_photo for row in old["measured"]]
        y = [row["latency"]["median_ms"] for row in old["measured"]]
        jobs_ax.plot(x, y, "v-", color="tab:red", label="old way: encode every photo per job")
        ext = old.get("extrapolated_1000")
        if ext:
            jobs_ax.plot([x[-1], 1000 * per_photo], [y[-1], ext["median_ms"]], "v--", color="tab:red",
                         markerfacecolor="none", label="old way, 1,000 photos (extrapolated)")
    jobs_ax.set_xscale("log")
    jobs_ax.set_yscale("log")
    jobs_ax.set_xlabel("faces searched (old way: faces in the stage's photos)")
    jobs_ax.set_ylabel("per-job latency, ms (median, bars p25-p75)")
    jobs_ax.set_title("One portal job: data-URL selfie in, JSON result out")
    jobs_ax.grid(True, which="both", alpha=0.3)
    jobs_ax.legend(fontsize=8)

    search = results.get("search", {}).get("sizes", {})
    if search:
        for key, label, style in (("fsw", "fsw Gallery.search (split over the cores)", "o-"),
                                  ("fsw_one_core", "fsw's scan on one core", "x-"),
                                  ("fsw_stage", "fsw, a stage of 4,000 faces", "D-"),
                                  ("faiss_range", "FAISS flat range search", "s-"),
                                  ("numpy_matmul", "numpy matmul, precomputed norms", "^-")):
            if all(key in v for v in search.values()):
                _line(search_ax, {k: v[key] for k, v in search.items()}, label, style)
        xs = sorted(search, key=int)
        search_ax.plot([int(s) for s in xs], [search[s]["floor_ms"] for s in xs], "k--",
                       label="memory-bandwidth floor")
    search_ax.set_xscale("log")
    search_ax.set_yscale("log")
    search_ax.set_xlabel("faces in the gallery")
    search_ax.set_ylabel("search alone, ms (median, bars p25-p75)")
    search_ax.set_title("Search alone: one descriptor against the gallery")
    search_ax.grid(True, which="both", alpha=0.3)
    search_ax.legend(fontsize=8)

    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    fig.suptitle(f"fsw benchmarks, {meta.get('date', '')}, {machine.get('cpu', '')}, {machine.get('cores', '?')} cores"
                 f"{' (quick run)' if meta.get('mode') == 'quick' else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _faces_per_photo(results: dict[str, Any]) -> float:
    raw = results.get("build", {}).get("raw_onnx", {})
    if raw.get("photos"):
        return raw["faces"] / raw["photos"]
    return 40 / 19  # the dev gallery: 40 faces in 19 photos
