"""The contracts in `schemas`: the portal's job is accepted unchanged, bad job data gets a precise message
that never quotes the selfie, and the JSON Schema given to Node says the same as the Python models."""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import schemas
from schemas import (
    MAX_IMAGE_CHARS,
    FaceSearchJob,
    Heartbeat,
    JobDataError,
    dump_result,
    json_schemas,
    parse_job,
    stage_problem,
)
from schemas.job import STAGE_PATTERN

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg but bytes"
SECRET = base64.b64encode(b"the selfie's own bytes, never to be quoted").decode()


def portal_job(**changes: object) -> dict:
    job = {"image": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(), "uid": "student@example.edu",
           "stage": "Day-1/Morning/Batch-A", "timestamp": 1764300000000}
    job.update(changes)
    return job


def message_for(data: object) -> str:
    with pytest.raises(JobDataError) as e:
        parse_job(data).image_bytes()
    return str(e.value)


def test_portal_job_is_accepted_unchanged() -> None:
    job = parse_job(portal_job())
    assert (job.uid, job.stage, job.timestamp) == ("student@example.edu", "Day-1/Morning/Batch-A", 1764300000000)
    assert job.media_type == "image/jpeg"
    assert job.image_bytes() == JPEG
    assert (job.threshold, job.limit) == (0.5, None)


def test_bare_base64_and_wrapped_base64_are_accepted() -> None:
    text = base64.encodebytes(JPEG * 10).decode()  # wrapped at 76 columns, as some encoders do
    assert "\n" in text
    assert parse_job({"image": text}).image_bytes() == JPEG * 10
    assert parse_job({"image": base64.b64encode(JPEG).decode().rstrip("=")}).image_bytes() == JPEG


def test_unknown_fields_are_ignored_and_fsw_fields_read() -> None:
    job = parse_job(portal_job(threshold=0.6, limit=3, portal_extra={"a": 1}))
    assert (job.threshold, job.limit) == (0.6, 3)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({}, "image is missing: send the selfie as a data:image/jpeg;base64"),
        ({"image": None}, "image is missing"),
        ({"image": ""}, "image is empty"),
        ({"image": "   "}, "image is empty"),
        ({"image": 123}, "image must be text (a data:image/jpeg;base64,... URL), not a number"),
        ({"image": ["x"]}, "image must be text (a data:image/jpeg;base64,... URL), not an array"),
        ({"image": "data:text/plain;base64," + SECRET}, "image is a data URL but not data:image/...;base64,"),
        ({"image": "%%%%" + SECRET}, "image is not valid base64"),
        ({"image": "data:image/png;base64,@@" + SECRET}, "image is not valid base64"),
        ("just text", "job data must be a JSON object with an image, not str"),
        ([1, 2], "job data must be a JSON object with an image, not an array"),
        (portal_job(stage="Day-1/../x"), "stage 'Day-1/../x' must be a folder inside the gallery"),
        (portal_job(stage="/etc/passwd"), "stage '/etc/passwd' must be a folder inside the gallery"),
        (portal_job(stage=7), "stage must be text"),
        (portal_job(threshold=0.95), "threshold must be from 0.2 to 0.9"),
        (portal_job(threshold=True), "threshold must be a number, not a boolean"),
        (portal_job(limit=0), "limit must be at least 1"),
    ],
)
def test_bad_job_data_gets_a_precise_message(data: object, expected: str) -> None:
    message = message_for(data)
    assert expected in message
    assert SECRET not in message and SECRET[:20] not in message


def test_oversized_image_is_refused_before_decoding() -> None:
    huge = "data:image/jpeg;base64," + "A" * (MAX_IMAGE_CHARS + 4)
    with pytest.raises(JobDataError, match=r"image is too large: 20\.0 MB of base64, over the 20 MB limit"):
        parse_job({"image": huge})  # parse_job never decodes: the size is checked on the text


def test_errors_name_every_bad_field_without_quoting_the_input() -> None:
    message = message_for({"image": 5, "stage": "../" + SECRET, "limit": -1})
    assert len(message.split("; ")) == 3 and "image" in message and "limit" in message
    assert "stage '../" in message  # the stage is quoted: it is short and not personal


@pytest.mark.parametrize("stage", ["", "Day-1", "Day-1/Morning", "Day-1/Morning/Batch A", "a.b/c..d"])
def test_folder_stages_are_accepted(stage: str) -> None:
    assert parse_job(portal_job(stage=stage)).stage == stage
    if stage:
        assert parse_job(portal_job(stage=f" {stage}/ ")).stage == stage


@given(st.text(alphabet="ab./\\\x00-", max_size=12))
def test_node_stage_pattern_agrees_with_the_python_check(stage: str) -> None:
    assert (re.fullmatch(STAGE_PATTERN, stage) is None) == (stage_problem(stage) is not None)


def test_threshold_bounds_are_the_matching_rules() -> None:
    from matcher import search

    assert (schemas.MIN_THRESHOLD, schemas.MAX_THRESHOLD) == (search.MIN_THRESHOLD, search.MAX_THRESHOLD)
    assert schemas.DEFAULT_THRESHOLD == search.DEFAULT_THRESHOLD


def test_result_is_the_array_the_portal_reads() -> None:
    from matcher.search import Match

    match = Match("Day-1/Morning/IMG_0001.jpg", 0.8312, (10, 60, 70, 5))
    result = dump_result([match])
    assert result == [{"id": "Day-1/Morning/IMG_0001.jpg", "similarity": 0.8312, "box": [10, 60, 70, 5]}]
    assert json.loads(json.dumps(result)) == result


def test_heartbeat_has_every_dashboard_field() -> None:
    dashboard = {"id", "hostname", "status", "gpu_index", "gpu_name", "use_cpu", "concurrency", "engine",
                 "start_time", "uptime", "last_heartbeat", "jobs_processed", "jobs_failed", "current_job",
                 "cpu_percent", "ram_percent", "ram_available_gb", "gpu_utilization", "gpu_memory_used_mb",
                 "gpu_temperature"}
    schema = Heartbeat.model_json_schema()
    assert dashboard <= set(schema["properties"])
    assert dashboard - {"engine"} <= set(schema["required"])
    assert schema["properties"]["engine"]["default"] == "face_recognition"


def test_json_schemas_describe_the_three_contracts() -> None:
    all_schemas = json_schemas()
    assert set(all_schemas) == {"job", "result", "heartbeat"}
    assert all_schemas["job"]["required"] == ["image"]
    assert all_schemas["job"]["properties"]["image"]["maxLength"] == MAX_IMAGE_CHARS
    assert all_schemas["job"]["properties"]["stage"]["pattern"] == STAGE_PATTERN
    assert all_schemas["result"]["type"] == "array"
    assert set(all_schemas["result"]["$defs"]["MatchEntry"]["required"]) == {"id", "similarity", "box"}


def test_fsw_worker_schema_prints_them() -> None:
    from worker.cli import main

    everything = CliRunner().invoke(main, ["schema"])
    assert everything.exit_code == 0, everything.output
    assert json.loads(everything.output) == json_schemas()
    job = CliRunner().invoke(main, ["schema", "job"])
    assert json.loads(job.output) == FaceSearchJob.model_json_schema()


def test_for_image_builds_the_portals_data_url() -> None:
    job = FaceSearchJob.for_image(JPEG, "image/png", uid="u", stage="Day-1")
    assert job.image.startswith("data:image/png;base64,") and job.image_bytes() == JPEG
    assert job.model_dump(exclude_unset=True).keys() == {"image", "uid", "stage"}


def test_schemas_imports_nothing_of_the_project() -> None:
    project = {"matcher", "indexer", "worker", "bench"}
    for path in Path(schemas.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in project for n in names), f"{path.name} imports {names}"
