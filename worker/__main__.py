"""`python -m worker`: the same as `fsw-worker` (the supervisor starts its per-GPU children this way)."""

from worker.cli import main

main(prog_name="fsw-worker")
