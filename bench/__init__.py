"""fsw's benchmarks: `python -m bench.run [--quick]` measures jobs, search, build, memory and encoder settings.

`run` (the entry point: results.json, job-latency.png and docs/performance.md), `sections` (one function
per section, called in order), `common` (configuration, timing statistics, the face set), `galleries`
(1k to 1M-face galleries of real and synthetic faces), `jobs` (a job three ways: fsw, numpy, the old
way), `worker_jobs` (jobs through a real `fsw-worker run`), `search` (search alone against the bandwidth
floor), `build` (build and `add` speed), `memory` and `memprobe` (RSS of a process holding a gallery),
`encoders` (detection settings and descriptor engines), `stages` (what scanning only a job's stage
changes in the answers), `scale` (the 10M-face gallery), `detection` (YuNet against HOG: event-set recall,
build photos/s, job latency; bench/detection.json), `fleet` (fleet builds with 1 and 2 workers against a
local build; bench/fleet.json), `targets` (the targets, met or missed), `plot` (job-latency.png),
`report` (docs/performance.md from results.json; `python -m bench.report`), `gpu_check` (`make
gpu-check`: FAISS on a GPU, bench/gpu-results.json).
"""
