"""`python -m testkit.gated_worker GATE_FOLDER run [fsw-worker options]`: fsw-worker with a gate on its engine.

The worker runs exactly as `fsw-worker` does (the same CLI, settings from the environment, the same
process, so its heartbeat record carries this pid); its descriptor engines wait at the gate in
GATE_FOLDER while the gate is closed (see `testkit.gate`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from testkit.gate import Gate, install


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m testkit.gated_worker GATE_FOLDER run [fsw-worker options]")
    install(Gate(Path(argv[0])))
    from worker.cli import main as fsw_worker

    fsw_worker(args=argv[1:], prog_name="fsw-worker")


if __name__ == "__main__":
    main(sys.argv[1:])
