"""Shared fixtures: the labelled real faces, a staged photo tree, a built gallery, a private Redis.

The face set is read in place from `FSW_FACES` (default `../shared/faces` beside the project); it is
never copied into the repository. Photos are copied into temporary folders only.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FACES = Path(os.environ.get("FSW_FACES", ROOT.parent / "shared" / "faces"))
STAGES = ("Day-1/Morning", "Day-2/Evening")


@dataclass(frozen=True)
class Labelled:
    file: str  # relative to the face set, e.g. gallery/g01.jpg
    people: frozenset[str]  # 'none' for no face, 'unknown' for an unnamed person
    split: str

    @property
    def path(self) -> Path:
        return FACES / self.file


def read_labels(faces: Path = FACES) -> list[Labelled]:
    with open(faces / "labels.csv", newline="") as f:
        return [Labelled(r["file"], frozenset(r["identity"].split(";")), r["split"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not (FACES / "labels.csv").is_file():
        pytest.fail(f"labelled faces not found at {FACES}: set FSW_FACES to a folder with labels.csv")
    return FACES


@pytest.fixture(scope="session")
def labels(faces_dir: Path) -> list[Labelled]:
    return read_labels(faces_dir)


@dataclass(frozen=True)
class PhotoTree:
    root: Path
    people: dict[str, frozenset[str]]  # photo id -> people in it
    queries: list[Labelled]

    def photos_of(self, person: str) -> set[str]:
        return {pid for pid, who in self.people.items() if person in who}


def lay_out(labels: list[Labelled], dest: Path) -> PhotoTree:
    """The gallery photos alternately in two stages, as an event's photo tree."""
    people = {}
    for i, item in enumerate(x for x in labels if x.split == "gallery"):
        stage = STAGES[i % 2]
        target = dest / stage / Path(item.file).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(item.path, target)
        people[f"{stage}/{target.name}"] = item.people
    return PhotoTree(dest, people, [x for x in labels if x.split == "query"])


@pytest.fixture(scope="session")
def photo_tree(labels: list[Labelled], tmp_path_factory: pytest.TempPathFactory) -> PhotoTree:
    return lay_out(labels, tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def built_gallery(photo_tree: PhotoTree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gallery of the staged tree, built once per session with the default settings. Read only."""
    from indexer.pipeline import index_photos
    from matcher.encoder import EncoderSettings

    gallery = tmp_path_factory.mktemp("gallery") / "g"
    index_photos(gallery, [photo_tree.root], EncoderSettings(), photo_root=photo_tree.root, jobs=1)
    return gallery


@pytest.fixture(scope="session")
def encoder():  # type: ignore[no-untyped-def]
    from matcher.encoder import Encoder

    return Encoder()


# -- Redis ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, in a temporary folder; restartable for fault tests."""

    def __init__(self, workdir: Path, password: str | None = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server not found: install it (apt-get install redis-server) or set FSW_TEST_REDIS_URL")
        self.port = free_port()
        self.dir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [self.binary or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    """A private server unless FSW_TEST_REDIS_URL names one (then None: use `redis_url`)."""
    if os.environ.get("FSW_TEST_REDIS_URL"):
        yield None
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> str:
    return os.environ["FSW_TEST_REDIS_URL"] if redis_server is None else redis_server.url


# -- fsw-worker (appended for the worker tests) ------------------------------------------------------

VENV_BIN = ROOT / ".venv" / "bin"
NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A password-protected Redis of the test's own, for tests that stop and restart it."""
    server = RedisServer(tmp_path, password="fsw-test-secret")
    yield server
    server.stop()


@dataclass
class WorkerProcess:
    """A real `fsw-worker run` subprocess, and what it wrote to the `workers` hash."""

    proc: subprocess.Popen[bytes]
    log: Path
    redis_url: str
    queue: str

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)

    def record(self) -> dict | None:
        """This process's heartbeat record (found by pid), or None."""
        import json

        try:
            with self.client() as r:
                records = [json.loads(v) for v in r.hgetall("workers").values()]
        except Exception:
            return None
        mine = [x for x in records if x.get("pid") == self.proc.pid]
        return max(mine, key=lambda x: x.get("last_heartbeat", 0)) if mine else None

    def wait_record(self, check=lambda rec: True, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"fsw-worker exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            rec = self.record()
            if rec is not None and check(rec):
                return rec
            time.sleep(0.1)
        last = self.record()
        pytest.fail(f"no matching heartbeat record within {timeout} s; last: {last}\n{self.log_text()[-3000:]}")

    @property
    def id(self) -> str:
        return str(self.wait_record(lambda rec: rec["status"] != "starting")["id"])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"fsw-worker still running {timeout} s after SIGTERM:\n{self.log_text()[-3000:]}")


def start_worker(redis_url: str, gallery: Path, queue: str, workdir: Path, *args: str, wait: bool = True,
                 **env: str) -> WorkerProcess:
    """Start `fsw-worker run` configured by the environment, as an operator would; wait until it serves."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"worker-{queue}-{time.monotonic_ns()}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FSW_", "GPU_", "WORKER_"))}
    full_env.update({"REDIS_URL": redis_url, "FSW_GALLERY": str(gallery), "FSW_QUEUE": queue})
    full_env.update(env)  # may replace REDIS_URL, e.g. with REDIS_HOST/PORT/PASSWORD
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "fsw-worker"), "run", *args], env=full_env, cwd=workdir,
                                stdout=out, stderr=subprocess.STDOUT)
    worker = WorkerProcess(proc, log, redis_url, queue)
    if wait:
        worker.wait_record(lambda rec: rec["status"] not in ("starting",), timeout=90)
    return worker


@dataclass
class JobOutcome:
    id: str
    state: str  # completed, failed, or where it was when the wait ran out
    returnvalue: object = None
    failed_reason: str | None = None

    @property
    def photo_ids(self) -> list[str]:
        assert self.state == "completed", f"job {self.id} {self.state}: {self.failed_reason}"
        return [entry["id"] for entry in self.returnvalue]  # type: ignore[union-attr]


def run_jobs(redis_url: str, queue: str, datas: list[dict], timeout: float = 60, wait: bool = True) -> list[JobOutcome]:
    """Add `process-face` jobs with the Python bullmq Queue (the portal's options) and wait for them."""
    import asyncio

    from bullmq import Job, Queue

    async def go() -> list[JobOutcome]:
        q = Queue(queue, {"connection": redis_url})
        try:
            jobs = [await q.add("process-face", data, {"attempts": 1}) for data in datas]
            outcomes = {}
            deadline = time.monotonic() + timeout
            while wait and len(outcomes) < len(jobs) and time.monotonic() < deadline:
                for job in jobs:
                    if job.id in outcomes:
                        continue
                    state = await q.getJobState(job.id)
                    if state in ("completed", "failed"):
                        done = await Job.fromId(q, job.id)
                        outcomes[job.id] = JobOutcome(job.id, state, done.returnvalue, done.failedReason or None)
                await asyncio.sleep(0.05)
            return [outcomes.get(job.id) or JobOutcome(job.id, await q.getJobState(job.id)) for job in jobs]
        finally:
            await q.close()

    return asyncio.run(go())


def selfie_job(path: Path, stage: str = "", **extra: object) -> dict:
    """The portal's job data for a selfie file: a data URL, uid, stage, timestamp."""
    import base64

    kind = path.suffix.lower().lstrip(".").replace("jpg", "jpeg")
    image = f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
    return {"image": image, "uid": "graduate@example.edu", "stage": stage, "timestamp": int(time.time() * 1000),
            **extra}


@pytest.fixture(scope="session")
def slow_selfie(faces_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real selfie (obama, queries/q04.jpg) enlarged to about 19 MP: a job that takes over a second."""
    from PIL import Image

    with Image.open(faces_dir / "queries" / "q04.jpg") as im:
        big = im.convert("RGB").resize((im.width * 5, im.height * 5), Image.Resampling.BILINEAR)
    path = tmp_path_factory.mktemp("slow") / "big-selfie.jpg"
    big.save(path, "JPEG", quality=85)
    return path
