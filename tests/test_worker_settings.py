"""The worker's configuration: the environment and `.env`, read once into one typed object; the Redis
password never shown; the Redis client name Node's getWorkers() looks for."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from worker.service import node_client_name
from worker.settings import SettingsError, WorkerSettings


def test_defaults() -> None:
    s = WorkerSettings.from_env({})
    assert (s.redis_url, s.queue, s.gallery, s.concurrency, s.gpu_index) == (
        "redis://127.0.0.1:6379", "face-search", Path("gallery"), 1, None)


def test_every_variable_is_read() -> None:
    s = WorkerSettings.from_env({"REDIS_URL": "redis://cache:6380/2", "FSW_QUEUE": "q", "FSW_GALLERY": "/srv/g",
                                 "WORKER_CONCURRENCY": "3", "GPU_INDEX": "1"})
    assert (s.queue, s.gallery, s.concurrency, s.gpu_index) == ("q", Path("/srv/g"), 3, 1)
    assert s.redis_kwargs() | {"socket_connect_timeout": 0} == {"host": "cache", "port": 6380, "db": 2,
                                                                "socket_connect_timeout": 0}


def test_flags_override_the_environment() -> None:
    s = WorkerSettings.from_env({"WORKER_CONCURRENCY": "3", "FSW_QUEUE": "q"}, concurrency=2, queue=None)
    assert (s.concurrency, s.queue) == (2, "q")


def test_host_port_password_compose_a_url_and_the_password_is_never_shown() -> None:
    s = WorkerSettings.from_env({"REDIS_HOST": "redis.internal", "REDIS_PORT": "6390", "REDIS_PASSWORD": "p@ss:w/rd"})
    kwargs = s.redis_kwargs()
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("redis.internal", 6390, "p@ss:w/rd")
    assert "p@ss" not in repr(s) and "p@ss" not in s.redis_display and "***" in s.redis_display
    assert "p%40ss" not in repr(s)


def test_rediss_url_turns_tls_on() -> None:
    s = WorkerSettings.from_env({"REDIS_URL": "rediss://:secret@redis.example.com:6380?ssl_cert_reqs=none"})
    kwargs = s.redis_kwargs(client_name="bull:x")
    assert kwargs["ssl"] is True and kwargs["ssl_cert_reqs"] == "none" and kwargs["client_name"] == "bull:x"
    assert s.redis_display == "rediss://:***@redis.example.com:6380?ssl_cert_reqs=none"
    client = redis.Redis(**kwargs)  # the kwargs are ones redis-py takes, TLS included
    assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] in ("none", ssl.CERT_NONE)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"REDIS_URL": "http://x"}, "REDIS_URL must start with redis://, rediss:// (TLS) or unix://"),
        ({"REDIS_PORT": "six"}, "REDIS_PORT must be a port number, not 'six'"),
        ({"WORKER_CONCURRENCY": "many"}, "WORKER_CONCURRENCY must be a whole number, not 'many'"),
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY must be 1 to 64, not 0"),
        ({"GPU_INDEX": "-1"}, "GPU_INDEX must be 0 or more, not -1"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as e:
        WorkerSettings.from_env(env)
    assert message in str(e.value)


def test_node_client_name_is_what_get_workers_matches() -> None:
    assert node_client_name("bull", "face-search", "host_cpu0_fr") == "bull:ZmFjZS1zZWFyY2g=:w:host_cpu0_fr"


def test_dotenv_file_configures_the_cli_without_overriding_the_environment(
    tmp_path: Path, redis_url: str, faces_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.cli import main

    (tmp_path / ".env").write_text(f"REDIS_URL={redis_url}\nFSW_QUEUE=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FSW_QUEUE", "from-environment")
    result = CliRunner().invoke(main, ["submit", str(faces_dir / "queries" / "q04.jpg"), "--no-wait"])
    assert result.exit_code == 0, result.output
    assert "added to queue 'from-environment'" in result.output

    async def waiting() -> int:
        from bullmq import Queue

        q = Queue("from-environment", {"connection": redis_url})
        try:
            return int(await q.getWaitingCount())
        finally:
            await q.obliterate(force=True)
            await q.close()

    assert asyncio.run(waiting()) == 1


def test_submit_refuses_an_unknown_redis_with_a_clear_line(tmp_path: Path, faces_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:1")
    result = CliRunner().invoke(main, ["submit", str(faces_dir / "queries" / "q04.jpg"), "--timeout", "2"])
    assert result.exit_code == 1
    assert "hunter2" not in result.output
