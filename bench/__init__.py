"""fsw's benchmarks: `python -m bench.run [--quick]` measures jobs, search, build, memory and encoder settings.

`run` (the entry point: results.json, job-latency.png and docs/performance.md), `sections` (one function
per section, called in order), `common` (configuration, timing statistics, the face set), `galleries`
(1k to 1M-face galleries of real and synthetic faces), `jobs` (a job three ways: fsw, numpy, the old
way), `worker_jobs` (jobs through a real `fsw-worker run`), `search` (search alone against the bandwidth
floor), `build` (build and `add` speed), `memory` and `memprobe` (RSS of a process holding a gallery),
`encoders` (detection settings and descriptor engines), `targets` (the targets, met or missed), `plot`
(job-latency.png), `report` (docs/performance.md from results.json; `python -m bench.report`).
"""
