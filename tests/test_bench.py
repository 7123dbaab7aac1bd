"""The benchmark's smoke run: `python -m bench.run --quick` runs end to end and writes what the README reads.

Times are never asserted (this machine is shared); the structure of results.json, the plot, and the
outcomes that do not depend on time are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "n"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    p = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"bench.run --quick exited {p.returncode}:\n{p.stderr[-4000:]}"
    return json.loads((out / "results.json").read_text()), out, p.stdout


def _timing(st: dict) -> None:
    assert set(st) == TIMING_KEYS
    assert st["n"] >= 1
    assert st["min_ms"] <= st["p25_ms"] <= st["median_ms"] <= st["p75_ms"] <= st["max_ms"]


def test_quick_run_measures_every_section(quick_run):
    results, _, _ = quick_run
    for section in ("meta", "jobs", "search", "worker", "memory", "stages", "old_way", "build", "encoder",
                    "detection", "scale", "synthetic", "targets"):
        assert section in results, section
        assert "error" not in results[section], results[section]
    assert results["meta"]["mode"] == "quick"


def test_job_latency_has_a_median_and_spread_per_method_and_size(quick_run):
    jobs = quick_run[0]["jobs"]
    for engine in ("onnx", "dlib"):
        assert set(jobs["fsw"][engine]) == {str(s) for s in jobs["sizes"]}
        for st in jobs["fsw"][engine].values():
            _timing(st)
    for st in jobs["numpy"].values():
        _timing(st)
    paired = jobs["interleaved"]  # the smallest and largest galleries, paired round by round: the target's ratio
    assert set(paired["sizes"]) == {str(jobs["sizes"][0]), str(jobs["sizes"][-1])}
    for st in (*paired["sizes"].values(), *paired["after_pause"]["sizes"].values()):
        _timing(st)
        assert st["n"] == paired["rounds"]
    low, high = paired["ratio_p25_p75"]
    assert low <= paired["largest_over_smallest"] <= high


def test_synthetic_faces_leave_the_selfies_results_unchanged(quick_run):
    results = quick_run[0]
    assert results["jobs"]["expected_matches"], "the query should find its real photos"
    assert results["jobs"]["all_results_real"] is True
    assert results["synthetic"]["synthetic_to_queries_distance_min"] >= 0.5


def test_worker_answers_jobs_from_the_queue(quick_run):
    worker = quick_run[0]["worker"]
    assert worker["available"] is True
    for row in worker["sizes"].values():
        _timing(row["latency"])
        assert row["matches"] == len(quick_run[0]["jobs"]["expected_matches"])
        assert row["rss_bytes"] > 0


def test_search_alone_is_compared_with_the_bandwidth_floor(quick_run):
    search = quick_run[0]["search"]
    assert search["bandwidth"]["gb_per_s"] > 0
    for row in search["sizes"].values():
        for method in ("fsw", "fsw_one_core", "fsw_stage", "faiss_range", "numpy_matmul"):
            _timing(row[method])
        assert row["floor_ms"] > 0
        assert row["faces_found"]["faiss"] == row["faces_found"]["fsw_one_core"] == row["faces_found"]["numpy"]
        assert row["faces_found"]["fsw_stage_photos"] == row["faces_found"]["fsw_photos"]  # the query's own stage


def test_scale_sections_say_what_they_measured(quick_run):
    r = quick_run[0]
    sharing = r["memory"]["sharing"]
    assert set(sharing["processes"]) == {"1", "4"} and sharing["pss_4_over_1"] > 0
    assert len(sharing["processes"]["4"]["pss_each_mb"]) == 4
    stages = r["stages"]
    assert stages["expansion_off"]["answers_equal_to_whole_filtered"] == stages["searches"]
    assert stages["expansion_on"]["stage_alone"]["wanted"] == stages["expansion_on"]["whole_filtered"]["wanted"] > 0
    assert "skipped" in r["scale"]  # 10M faces: the full run only


def test_build_old_way_memory_and_encoder_sections_have_their_figures(quick_run):
    r = quick_run[0]
    b = r["build"]
    assert [x["jobs"] for x in b["tree_builds"]][0] == 1
    assert all(x["photos"] == b["tree_photos"] and x["skipped"] == 0 for x in b["tree_builds"])
    assert set(b["per_photo_ms"]) >= {"decode", "detect", "landmarks_chip", "descriptor_onnx", "hash", "write"}
    assert all(a["added_photos"] > 0 for a in b["add"])
    assert r["old_way"]["measured"] and r["old_way"]["extrapolated_1000"]["photos"] == 1000
    assert r["memory"]["processes"]["0"]["faces"] == 0
    grid = r["encoder"]["detection_grid"]
    assert grid and all(g["faces_expected"] > 0 for g in grid)
    assert set(r["encoder"]["descriptor_engines"]) >= {"dlib", "onnx", "dlib_over_onnx"}
    assert all({"name", "target", "value", "met"} <= set(t) for t in r["targets"])


def test_plot_and_table_are_written(quick_run):
    _, out, stdout = quick_run
    assert (out / "job-latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Per-job latency" in stdout and "Targets" in stdout
    assert (out / "performance.md").read_text().startswith("# Performance\n")


def _st(median: float, p25: float, p75: float, n: int = 3) -> dict:
    return {"median_ms": median, "p25_ms": p25, "p75_ms": p75, "min_ms": p25, "max_ms": p75, "n": n}


def test_the_performance_page_is_rendered_from_results_json_alone(tmp_path):
    results = {
        "meta": {"mode": "full", "date": "2026-01-01 00:00 UTC", "machine": {"cpu": "Test CPU", "cores": 2},
                 "git_commit": "abc1234", "faces": "tests/data/faces"},
        "jobs": {"sizes": [1000, 10000], "largest_over_smallest": {"onnx": 1.2},
                 "fsw": {"onnx": {"1000": _st(148, 125, 167), "10000": _st(141, 130, 148)},
                         "dlib": {"1000": _st(335, 318, 357), "10000": _st(316, 303, 335)}},
                 "numpy": {"1000": _st(115, 113, 133), "10000": _st(153, 135, 164)}},
        "old_way": {"jitters": 4, "model": "large", "max_side": 640,
                    "measured": [{"photos": 10, "latency": _st(6500, 6400, 6600), "per_photo_ms_mean": 600.0}],
                    "extrapolated_1000": {"photos": 1000, "median_ms": 600900.0},
                    "ratios": {"old_over_fsw_onnx_at_1000_faces": {"10": 43.9, "1000 (extrapolated)": 4060.1}}},
        "targets": [{"name": "job latency, largest gallery / smallest", "target": "<= 1.5x", "value": 1.2,
                     "met": True}],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = tmp_path / "performance.md"
    p = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path / "results.json"), "-o", str(page)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    text = page.read_text()
    assert text.startswith("# Performance\n")
    assert "\n".join([
        "| faces in the gallery | fsw, ONNX engine (default) | fsw, dlib engine | fsw-worker via Redis (ONNX) "
        "| numpy exhaustive |",
        "|---|---|---|---|---|",
        "| 1,000 | 148 (125-167) | 335 (318-357) | not measured | 115 (113-133) |",
        "| 10,000 | 141 (130-148) | 316 (303-335) | not measured | 153 (135-164) |",
    ]) in text
    assert "Source: `jobs.fsw.onnx`, `jobs.fsw.dlib`, `worker.sizes.*.latency`, `jobs.numpy`." in text
    assert "| 10 | 6.5 s (3 runs) | 0.60 s | 44x | - |" in text
    assert "| 1,000 (extrapolated) | 601 s | - | 4,060x | - |" in text
    assert "scaled each photo to at most 640 px" in text
    assert "| job latency, largest gallery / smallest | <= 1.5x | 1.2 | met |" in text
    assert "dev faces: `tests/data/faces`" in text
    for absent in ("## Search alone", "## Gallery build", "## Memory", "failed"):
        assert absent not in text  # sections the run did not measure are left out, not shown empty


def test_the_targets_of_sections_kept_in_their_own_files_are_listed_from_them(tmp_path):
    results = {"meta": {"mode": "full", "date": "2026-01-01 00:00 UTC", "machine": {"cpu": "Test CPU", "cores": 2},
                        "git_commit": "abc1234"},
               "targets": [{"name": "fleet build photos/s, 2 workers / 1 worker", "target": 1.8, "value": None,
                            "met": None}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "fleet.json").write_text(json.dumps({"fleet": {"fleet_2_over_1": 1.9}}))
    p = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path / "results.json"), "-o", "-"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "| fleet build photos/s, 2 workers / 1 worker | >= 1.8x | 1.9 | met |" in p.stdout
    assert "evaluated from `bench/fleet.json`" in p.stdout
