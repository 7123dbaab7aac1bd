"""`fsw-worker`: answer the portal's face-search jobs, try one end to end, print the contracts.

Each command is a thin face on the library (`worker.service`, `worker.submit`, `schemas`). Settings come
from the environment (and a `.env` file in the working directory), read once here; flags override them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from dotenv import load_dotenv

from schemas import MODELS, json_schemas

log = logging.getLogger("fsw.worker")


def _errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Configuration and library errors become one line on stderr and exit 1."""

    @wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        from redis.exceptions import RedisError

        from matcher.errors import FswError
        from worker.heartbeat import WorkerIdError
        from worker.settings import SettingsError
        from worker.supervisor import DeviceError

        try:
            return f(*args, **kwargs)
        except (SettingsError, DeviceError) as e:
            raise click.UsageError(str(e)) from None
        except (FswError, WorkerIdError, TimeoutError, OSError) as e:
            raise click.ClickException(str(e)) from None
        except RedisError as e:
            raise click.ClickException(f"Redis: {e}") from None

    return run


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s [pid %(process)d] %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fsw")
def main() -> None:
    """Answer the portal's face-search jobs (BullMQ queue face-search) from an fsw gallery."""
    load_dotenv(Path.cwd() / ".env", override=False)


@main.command()
@click.option("--concurrency", "-c", type=click.IntRange(1, 64),
              help="Jobs at once per process [env WORKER_CONCURRENCY; 1].")
@click.option("--gpus", help="'all' (one process per GPU; the CPU without one), 'cpu', or '0,1' [env GPU_INDEX; CPU].")
@click.option("--gallery", "-g", type=click.Path(file_okay=False, path_type=Path),
              help="Gallery folder [env FSW_GALLERY; ./gallery].")
@click.option("--queue", "-q", help="BullMQ queue [env FSW_QUEUE; face-search].")
@click.option("--encode-concurrency", type=click.IntRange(0, 64),
              help="Encode jobs of fsw-index --fleet at once, after the selfies [env FSW_ENCODE_CONCURRENCY; 1].")
@click.option("--no-encode", is_flag=True, help="Never encode photos for fsw-index --fleet (--encode-concurrency 0).")
@click.option("--photos", help="Where this machine sees the photo tree, for encode jobs: a folder or an http(s) "
                               "base URL [env FSW_PHOTOS; the indexer's photo root].")
@click.option("--encoder", "engine", type=click.Choice(["onnx", "dlib"]), default="onnx", show_default=True,
              help="Descriptor engine; both give the same descriptors.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
@_errors
def run(concurrency: int | None, gpus: str | None, gallery: Path | None, queue: str | None,
        encode_concurrency: int | None, no_encode: bool, photos: str | None, engine: str, log_level: str) -> None:
    """Serve jobs until SIGTERM or Ctrl-C, then finish the jobs in hand and exit 0.

    Redis from REDIS_URL (or REDIS_HOST, REDIS_PORT, REDIS_PASSWORD). The gallery is reloaded by itself
    when `fsw-index add` or `remove` commits a new version. It also encodes photos for `fsw-index build
    --fleet` (queue fsw-encode) while no selfie waits: see docs/fleet.md.

        REDIS_URL=redis://127.0.0.1:6379 fsw-worker run --gallery /srv/fsw/gallery --gpus all
    """
    from worker.heartbeat import gpu_count
    from worker.service import WorkerService
    from worker.settings import WorkerSettings
    from worker.supervisor import Supervisor, plan_devices, worker_command

    _logging(log_level)
    if no_encode:
        encode_concurrency = 0
    settings = WorkerSettings.from_env(concurrency=concurrency, gallery=gallery, queue=queue,
                                       encode_concurrency=encode_concurrency, photos=photos)
    needs_count = gpus is not None and gpus.strip().lower() not in ("", "cpu", "none")
    devices = plan_devices(gpus, gpu_count() if needs_count else 0, settings.gpu_index)
    if len(devices) > 1:
        passthrough = ["--encoder", engine, "--log-level", log_level]
        for flag, value in (("--concurrency", concurrency), ("--gallery", gallery), ("--queue", queue),
                            ("--encode-concurrency", encode_concurrency), ("--photos", photos)):
            if value is not None:
                passthrough += [flag, str(value)]
        supervisor = Supervisor([d for d in devices if d is not None], lambda gpu: worker_command(gpu, passthrough))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: supervisor.stop(signum))
        log.info("one worker process for each of GPUs %s", ", ".join(str(d) for d in devices))
        sys.exit(supervisor.run())
    device = devices[0]
    if device is not None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(device))  # before any CUDA library starts
    service = WorkerService(settings.with_gpu(device), engine=engine)
    sys.exit(asyncio.run(service.run()))


@main.command()
@click.argument("selfie", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--stage", default="", help="Only photos under this folder, e.g. Day-1/Morning.")
@click.option("--threshold", type=float, help="Similarity a match must exceed [worker default 0.5].")
@click.option("--limit", type=click.IntRange(1), help="At most this many photos.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the result and print it.")
@click.option("--timeout", type=click.FloatRange(1), default=60, show_default=True, help="Seconds to wait.")
@click.option("--queue", "-q", help="BullMQ queue [env FSW_QUEUE; face-search].")
@_errors
def submit(selfie: Path, stage: str, threshold: float | None, limit: int | None, wait: bool, timeout: float,
           queue: str | None) -> None:
    """Put one job on the queue in the portal's format and print the worker's answer (a JSON array).

    Progress goes to stderr; a failed job prints its reason and exits 1.

    \b
        fsw-worker submit me.jpg --stage Day-1/Morning
    """
    from schemas import JobDataError
    from worker.settings import WorkerSettings
    from worker.submit import job_data, submit_selfie

    settings = WorkerSettings.from_env(queue=queue)
    try:
        data = job_data(selfie, stage, threshold, limit)
    except JobDataError as e:
        raise click.UsageError(str(e)) from None
    outcome = asyncio.run(
        submit_selfie(settings, data, wait, timeout, on_progress=lambda p: click.echo(f"progress {p}", err=True))
    )
    if not wait:
        click.echo(f"job {outcome.job_id} added to queue {settings.queue!r}")
        return
    if outcome.state == "failed":
        raise click.ClickException(f"job {outcome.job_id} failed: {outcome.failed_reason}")
    click.echo(json.dumps(outcome.result))


@main.command()
@click.argument("name", required=False, type=click.Choice(sorted(MODELS)))
def schema(name: str | None) -> None:
    """Print the JSON Schema of the job data, the result and the heartbeat record (or of NAME).

    \b
        fsw-worker schema job > face-search-job.schema.json
    """
    schemas = json_schemas()
    click.echo(json.dumps(schemas[name] if name else schemas, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
