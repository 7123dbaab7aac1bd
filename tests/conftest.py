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
