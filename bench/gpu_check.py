"""`make gpu-check` (`python -m bench.gpu_check`): FAISS on a GPU, checked and timed, in under 5 minutes.

For a GPU owner, after `make install-gpu`: runs the GPU tests (`tests/test_gpu.py`, whose GPU tests skip
anywhere else), then times one query's search on the GPU (`matcher.gpu.GpuScan`) against the CPU scan
(`matcher.scan.CpuScan`, every core) at 1M and 10M faces, checks that both give the same rows and distances,
and writes bench/gpu-results.json (`--out` to write elsewhere). The faces are random descriptors at real
norms, with a query's neighbours planted at distances 0.1-0.7: the search's cost does not depend on what
the descriptors show. 10M faces take 5 GB of RAM and of GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.common import ROOT, log, ratio, timed_together
from matcher.gpu import GpuScan, has_gpu
from matcher.scan import CpuScan, Descriptors
from matcher.search import DEFAULT_THRESHOLD, range_search

OUT = ROOT / "bench" / "gpu-results.json"
SIZES = (1_000_000, 10_000_000)
NEAR = 200  # planted neighbours of each query
QUERIES = 5
REPEATS = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the results [bench/gpu-results.json]")
    parser.add_argument("--device", type=int, default=0, help="CUDA device [0]")
    args = parser.parse_args(argv)
    if not has_gpu(args.device):
        print(f"no GPU {args.device} for FAISS here (faiss {faiss.__version__}, "
              f"{'with' if hasattr(faiss, 'StandardGpuResources') else 'without'} GPU support): run `make install-gpu` "
              "on a machine with an NVIDIA GPU", file=sys.stderr)
        return 1
    started = time.perf_counter()
    log("GPU tests (tests/test_gpu.py)")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py"], cwd=ROOT, timeout=180)
    results: dict[str, Any] = {"meta": _meta(args.device), "tests_passed": tests.returncode == 0, "sizes": {}}
    for n in SIZES:
        results["sizes"][str(n)] = measure(n, args.device)
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for n, row in results["sizes"].items():
        print(f"{int(n):>12,} faces: GPU {row['gpu']['median_ms']:8.2f} ms, CPU {row['cpu']['median_ms']:8.2f} ms "
              f"({row['cpu_threads']} threads), CPU / GPU {row['cpu_over_gpu']}, same answers: {row['same_answers']}")
    log(f"wrote {args.out} in {results['meta']['elapsed_s']} s")
    ok = results["tests_passed"] and all(r["same_answers"] and r["gpu_fallbacks"] == 0
                                         for r in results["sizes"].values())
    return 0 if ok else 1


def measure(n: int, device: int) -> dict[str, Any]:
    log(f"{n:,} faces")
    data, queries = _faces(n)
    vectors = Descriptors([data])
    cpu = CpuScan(vectors)
    t = time.perf_counter()
    gpu = GpuScan(vectors, device)
    to_device_s = time.perf_counter() - t
    same = all(_answer(gpu, vectors, q) == _answer(cpu, vectors, q) for q in queries)
    q = queries[0]
    runs = timed_together({"gpu": lambda: range_search(gpu, vectors, q, DEFAULT_THRESHOLD),
                           "cpu": lambda: range_search(cpu, vectors, q, DEFAULT_THRESHOLD)}, REPEATS, warmup=2)
    out = {"faces": n, "to_device_s": round(to_device_s, 2), "gpu": runs["gpu"][0], "cpu": runs["cpu"][0],
           "cpu_threads": cpu.threads, "matches": len(runs["gpu"][1][0]), "same_answers": same,
           "gpu_fallbacks": gpu.fallbacks}
    out["cpu_over_gpu"] = ratio(out["cpu"]["median_ms"], out["gpu"]["median_ms"])
    return out


def _answer(scanner: Any, vectors: Descriptors, q: np.ndarray) -> list[tuple[int, float]]:
    rows, d = range_search(scanner, vectors, q, DEFAULT_THRESHOLD)
    return sorted(zip(rows.tolist(), d.tolist(), strict=True))


def _faces(n: int, seed: int = 13) -> tuple[np.ndarray, list[np.ndarray]]:
    """`n` random descriptors of norm 1.45 (a real descriptor's), and queries with `NEAR` neighbours each."""
    rng = np.random.default_rng(seed)
    data = np.empty((n, 128), np.float32)
    for lo in range(0, n, 1 << 20):
        block = rng.standard_normal((min(1 << 20, n - lo), 128), dtype=np.float32)
        data[lo : lo + len(block)] = 1.45 * block / np.linalg.norm(block, axis=1, keepdims=True)
    queries = []
    for i in range(QUERIES):
        q = data[i].copy()
        rows = rng.choice(np.arange(QUERIES, n), NEAR, replace=False)
        step = rng.standard_normal((NEAR, 128)).astype(np.float32)
        data[rows] = q + rng.uniform(0.1, 0.7, (NEAR, 1)).astype(np.float32) * step / np.linalg.norm(
            step, axis=1, keepdims=True)
        queries.append(q)
    return data, queries


def _meta(device: int) -> dict[str, Any]:
    name = "?"
    with contextlib.suppress(OSError):
        name = subprocess.run(["nvidia-smi", f"--id={device}", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or name
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "gpu": name, "device": device,
            "faiss": faiss.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu": platform.processor(), "threshold": DEFAULT_THRESHOLD}


if __name__ == "__main__":
    raise SystemExit(main())
