"""Fixtures over `testkit`: the labelled faces, a staged photo tree, a built gallery, a private Redis.

The faces are read in place from tests/data/faces (`FSW_FACES` overrides); photos are copied into
temporary folders only. What a test needs beyond fixtures (starting a worker, sending jobs, bad images)
it imports from `testkit`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.labels import Label
from testkit import photos
from testkit.photos import PhotoTree, lay_out
from testkit.redis_server import RedisServer


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    try:
        return photos.faces_folder()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def labels(faces_dir: Path) -> list[Label]:
    return photos.labels(faces_dir)


@pytest.fixture(scope="session")
def photo_tree(labels: list[Label], tmp_path_factory: pytest.TempPathFactory) -> PhotoTree:
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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A password-protected Redis of the test's own, for tests that stop and restart it."""
    server = RedisServer(tmp_path, password="fsw-test-secret")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def big_selfie(faces_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real selfie (obama, queries/q04.jpg) enlarged to about 19 MP: a large upload, like a phone's own."""
    from PIL import Image

    with Image.open(faces_dir / "queries" / "q04.jpg") as im:
        big = im.convert("RGB").resize((im.width * 5, im.height * 5), Image.Resampling.BILINEAR)
    path = tmp_path_factory.mktemp("big") / "big-selfie.jpg"
    big.save(path, "JPEG", quality=85)
    return path
