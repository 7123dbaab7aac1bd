"""fsw's benchmarks: `python -m bench.run [--quick]` measures jobs, search, build, memory and encoder settings."""
