"""The Redis password is masked wherever the URL is shown, however it is given.

`redis_display` (the one form that may be logged), `repr(WorkerSettings)` and the SettingsError of an
unusable URL, for every way an operator can give a password: in the user part (`redis://:<password>@host`,
`redis://user:<password>@host`, unescaped characters included), as redis-py's `?password=` query parameter, and
as REDIS_PASSWORD. Then a real `fsw-worker run` on a password-protected Redis, given the password as
`?password=`, and `fsw-worker submit` timing out on the same URL: neither prints the password.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from schemas.connection import redis_display
from testkit.redis_server import RedisServer
from testkit.worker_process import BIN, start_worker
from worker.settings import SettingsError, WorkerSettings

PASSWORD = "test-S3cr3t-pw"


@pytest.mark.parametrize(
    "url, shown",
    [
        (f"redis://127.0.0.1:6379/0?password={PASSWORD}", "redis://127.0.0.1:6379/0?password=***"),
        (f"redis://:{PASSWORD}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (f"redis://fsw:{PASSWORD}@127.0.0.1:6379", "redis://fsw:***@127.0.0.1:6379"),
        (f"redis://{PASSWORD}@127.0.0.1:6379", "redis://***@127.0.0.1:6379"),  # a lone user part may be one
        (f"rediss://:{PASSWORD}@redis.example.com:6380/0?ssl_cert_reqs=none",
         "rediss://:***@redis.example.com:6380/0?ssl_cert_reqs=none"),
        (f"redis://127.0.0.1:6379/0?db=1&Password={PASSWORD}&socket_timeout=5",
         "redis://127.0.0.1:6379/0?db=1&Password=***&socket_timeout=5"),
        (f"unix:///run/redis.sock?db=0&password={PASSWORD}", "unix:///run/redis.sock?db=0&password=***"),
        (f"redis://:{PASSWORD}@[::1]:6379", "redis://:***@[::1]:6379"),
        ("redis://:S3cr/et?pw@127.0.0.1:6379", "redis://:***@127.0.0.1:6379"),  # unescaped / and ?
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redis_display_masks_the_password(url: str, shown: str) -> None:
    assert redis_display(url) == shown


@pytest.mark.parametrize(
    "env",
    [
        {"REDIS_URL": f"redis://127.0.0.1:6379/0?password={PASSWORD}"},
        {"REDIS_URL": f"redis://fsw:{PASSWORD}@127.0.0.1:6379"},
        {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": "6379", "REDIS_PASSWORD": PASSWORD},
        {"REDIS_HOST": "127.0.0.1", "REDIS_PASSWORD": "p@ss/w?rd#1"},  # quoted into the URL
    ],
)
def test_settings_never_show_the_password(env: dict[str, str]) -> None:
    settings = WorkerSettings.from_env(env)
    password = env.get("REDIS_PASSWORD", PASSWORD)
    for shown in (settings.redis_display, repr(settings), str(settings)):
        assert password not in shown and "***" in shown


def test_an_unusable_url_is_refused_without_showing_its_password() -> None:
    with pytest.raises(SettingsError) as refused:
        WorkerSettings.from_env({"REDIS_URL": f"redis://127.0.0.1:6379/0?password={PASSWORD}&socket_timeout=soon"})
    assert PASSWORD not in str(refused.value) and "password=***" in str(refused.value)


def test_worker_and_submit_never_print_a_password_given_as_a_query_parameter(
    private_redis: RedisServer, built_gallery: Path, faces_dir: Path, tmp_path: Path,
) -> None:
    password = private_redis.password
    assert password
    url = f"redis://127.0.0.1:{private_redis.port}/0?password={password}"
    worker = start_worker(url, built_gallery, "masked", tmp_path / "w", "--log-level", "debug")
    try:
        worker.wait_log("serving queue")
    finally:
        worker.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "FSW_"))}
    submitted = subprocess.run(  # no worker on this queue: it times out and names the Redis it used
        [str(BIN / "fsw-worker"), "submit", str(faces_dir / "queries" / "q04.jpg"), "--timeout", "1"],
        env={**env, "REDIS_URL": url, "FSW_QUEUE": "nobody-serves-this"}, capture_output=True, text=True, timeout=120,
    )
    printed = worker.log_text() + submitted.stdout + submitted.stderr
    assert f"127.0.0.1:{private_redis.port}/0?password=***" in worker.log_text()  # it did connect with it
    assert "still waiting" in printed or "is still" in printed
    assert password not in printed
