"""GPUs to worker processes: which devices `--gpus` means, and one child process per GPU that gets its
GPU in its environment, is restarted when it dies, and is stopped with the signal the supervisor got."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from worker.supervisor import DeviceError, Supervisor, plan_devices, worker_command


@pytest.mark.parametrize(
    "spec, count, env_gpu, devices",
    [
        ("all", 0, None, [None]),  # no GPU: one CPU process
        ("all", 2, None, [0, 1]),
        ("ALL", 3, 1, [0, 1, 2]),
        ("cpu", 4, 2, [None]),
        ("1,0,1", 2, None, [1, 0]),
        (None, 2, None, [None]),
        (None, 2, 1, [1]),  # GPU_INDEX
        ("", 0, None, [None]),
    ],
)
def test_plan_devices(spec: str | None, count: int, env_gpu: int | None, devices: list[int | None]) -> None:
    assert plan_devices(spec, count, env_gpu) == devices


@pytest.mark.parametrize(
    "spec, count, message",
    [
        ("0", 0, "--gpus names GPU 0, but NVML sees no GPU"),
        ("0,3", 2, "--gpus names GPU 3, but NVML sees GPUs 0 to 1"),
        ("first", 2, "--gpus must be 'all', 'cpu' or GPU numbers like '0,1', not 'first'"),
    ],
)
def test_plan_devices_refuses_what_is_not_there(spec: str, count: int, message: str) -> None:
    with pytest.raises(DeviceError) as e:
        plan_devices(spec, count)
    assert str(e.value) == message


def test_run_names_a_missing_gpu_on_this_machine() -> None:
    from worker.cli import main
    from worker.heartbeat import gpu_count

    gpus = gpu_count()  # the first GPU this machine does not have, with a GPU or without
    result = CliRunner().invoke(main, ["run", "--gpus", str(gpus)])
    assert result.exit_code == 2
    seen = f"GPUs 0 to {gpus - 1}" if gpus else "no GPU"
    assert f"--gpus names GPU {gpus}, but NVML sees {seen}" in result.output


CHILD = """
import json, os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
gpu = os.environ["GPU_INDEX"]
crash = out / f"crashed-{gpu}"
if gpu == "1" and not crash.exists():  # GPU 1's first process dies at once
    crash.write_text("")
    sys.exit(3)
def stop(signum, frame):
    (out / f"stopped-{gpu}").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
(out / f"started-{gpu}").write_text(json.dumps({k: os.environ[k] for k in ("GPU_INDEX", "CUDA_VISIBLE_DEVICES")}))
while True:
    time.sleep(0.05)
"""


def wait_for(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)
    return path.read_text()


def test_one_process_per_gpu_restarted_when_it_dies_and_stopped_by_the_signal(tmp_path: Path) -> None:
    supervisor = Supervisor([0, 1], lambda gpu: [sys.executable, "-c", CHILD, str(tmp_path)], poll_s=0.05)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("code", supervisor.run()))
    runner.start()
    try:
        assert json.loads(wait_for(tmp_path / "started-0")) == {"GPU_INDEX": "0", "CUDA_VISIBLE_DEVICES": "0"}
        assert (tmp_path / "crashed-1").exists() or wait_for(tmp_path / "crashed-1") == ""
        assert json.loads(wait_for(tmp_path / "started-1")) == {"GPU_INDEX": "1", "CUDA_VISIBLE_DEVICES": "1"}
    finally:
        supervisor.stop(signal.SIGINT)
        runner.join(timeout=30)
    assert outcome["code"] == 0
    assert wait_for(tmp_path / "stopped-0") == wait_for(tmp_path / "stopped-1") == "SIGINT"


def test_supervisor_reports_a_child_that_did_not_stop_cleanly(tmp_path: Path) -> None:
    script = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(5))\ntime.sleep(60)"
    supervisor = Supervisor([0], lambda gpu: [sys.executable, "-c", script], poll_s=0.05)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("code", supervisor.run()))
    runner.start()
    time.sleep(1)
    supervisor.stop()
    runner.join(timeout=30)
    assert outcome["code"] == 1


def test_gpus_all_on_a_multi_gpu_machine_starts_the_supervisor(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    import worker.heartbeat
    import worker.supervisor
    from worker.cli import main

    started: dict[str, Any] = {}

    class Recording(Supervisor):
        def run(self) -> int:
            started["gpus"] = self.gpus
            started["commands"] = [self.command(gpu) for gpu in self.gpus]
            return 0

    handlers: dict[int, Any] = {}
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.setdefault(signum, handler))
    monkeypatch.setattr(worker.heartbeat, "gpu_count", lambda: 2)
    monkeypatch.setattr(worker.supervisor, "Supervisor", Recording)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--gpus", "all", "--queue", "q2", "-c", "2"])
    assert result.exit_code == 0, result.output
    assert started["gpus"] == [0, 1]
    assert started["commands"][1] == worker_command(1, ["--encoder", "onnx", "--log-level", "info",
                                                        "--concurrency", "2", "--queue", "q2"])
    assert set(handlers) == {signal.SIGTERM, signal.SIGINT}  # passed on to the children


def test_children_run_as_python_m_worker() -> None:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "worker", "schema", "job"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["title"] == "FaceSearchJob"
