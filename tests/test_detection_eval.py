"""`fsw-index eval-detection`: the boxes CSV, the pure scoring (matching, buckets, false faces) and the run,
on a small boxes CSV made here over dev photos (the event set is never needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from indexer.cli import main
from indexer.detection_eval import Truth, evaluate_detection, match, parse_config, read_boxes, score
from indexer.labels import LabelsError

HEADER = "file,left,top,width,height,blur,occluded,invalid,source\n"


def _boxes_csv(folder: Path, faces_dir: Path, rows: list[str]) -> Path:
    (folder / "images").mkdir(parents=True)
    shutil.copy(faces_dir / "gallery" / "g06.jpg", folder / "images" / "g06.jpg")  # four faces about 95 px
    path = folder / "boxes.csv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def found_boxes(faces_dir: Path) -> list[tuple[float, float, float, float]]:
    """YuNet's own boxes for g06's faces: the set's "annotation", so every face has a box a detector can hit."""
    from matcher.detectors.yunet import YuNetDetector
    from matcher.images import load_image

    rows = YuNetDetector(threads=1, device="cpu").boxes(load_image(faces_dir / "gallery" / "g06.jpg"), 4000)
    return [tuple(float(v) for v in r[:4]) for r in rows]  # type: ignore[misc]


def test_match_pairs_best_overlaps_first_one_to_one() -> None:
    truth = np.asarray([[0, 0, 10, 10], [100, 100, 50, 50]], dtype=float)
    found = np.asarray([[1, 1, 10, 10], [0, 0, 9, 9], [300, 300, 20, 20]], dtype=float)
    hit, false = match(truth, found)
    assert hit.tolist() == [True, False]
    assert false.tolist() == [True, False, True]  # [0,0,9,9] overlaps best; one detection per face


def test_score_counts_valid_faces_by_width_and_false_detections() -> None:
    truth = Truth(np.asarray([[0, 0, 15, 15], [50, 0, 30, 30], [100, 0, 60, 60], [200, 0, 90, 90],
                              [400, 0, 50, 50]], dtype=float),
                  np.asarray([True, True, True, True, False]))
    found = np.asarray([[50, 0, 30, 30], [200, 0, 90, 90], [400, 0, 50, 50], [600, 0, 45, 45]], dtype=float)
    s = score("x", {}, [(truth, found)], [10.0, 30.0])
    assert s.faces == {"0-19": 1, "20-39": 1, "40-79": 1, ">=80": 1, ">=20": 3, ">=40": 2}
    assert s.found == {"0-19": 0, "20-39": 1, "40-79": 0, ">=80": 1, ">=20": 2, ">=40": 1}
    assert s.false_detections == 1 and s.false_at_least_40 == 1  # the invalid face's box is no false face
    assert s.ms_per_photo == 20.0 and s.recall(">=40") == 0.5


def test_read_boxes_finds_the_images_beside_it_and_refuses_a_bad_file(tmp_path: Path, faces_dir: Path) -> None:
    path = _boxes_csv(tmp_path / "set", faces_dir, ["g06.jpg,1,2,30,40,0,0,0,x", "g06.jpg,5,5,9,9,0,0,1,x"])
    boxes = read_boxes(path)
    t = boxes[tmp_path / "set" / "images" / "g06.jpg"]
    assert t.boxes.tolist() == [[1, 2, 30, 40], [5, 5, 9, 9]] and t.valid.tolist() == [True, False]
    (tmp_path / "bad.csv").write_text("file,left,top\nx.jpg,1,2\n")
    with pytest.raises(LabelsError, match="lacks the columns height, width"):
        read_boxes(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text(HEADER + "nope.jpg,1,2,3,4,0,0,0,x\n")
    with pytest.raises(LabelsError, match="not in"):
        read_boxes(tmp_path / "missing.csv")


def test_parse_config_reads_engine_and_settings() -> None:
    name, s = parse_config("hog:upsample=2,max_side=800")
    assert name == "hog:upsample=2,max_side=800" and (s.detector, s.upsample, s.max_side) == ("hog", 2, 800)
    assert parse_config("yunet:score=0.7")[1].detector_score == 0.7
    with pytest.raises(ValueError, match="unknown detector setting"):
        parse_config("yunet:jitters=2")


def test_both_detectors_find_every_face_of_a_group_photo_and_no_false_one(
        tmp_path: Path, faces_dir: Path, found_boxes: list[tuple[float, ...]]) -> None:
    rows = [f"g06.jpg,{x:.0f},{y:.0f},{w:.0f},{h:.0f},0,0,0,test" for x, y, w, h in found_boxes]
    path = _boxes_csv(tmp_path / "set", faces_dir, rows)
    report = evaluate_detection(path, [parse_config("yunet"), parse_config("hog")])
    assert report.photos == 1
    for s in report.scores:
        assert s.found[">=40"] == s.faces[">=40"] == 4, s.name
        assert s.false_detections == 0, s.name
    assert "| yunet | 0/0 | 0/0 | 0/0 | 4/4 | 100.0% | 100.0% | 0 (0) |" in report.table()


def test_cli_prints_the_table_and_writes_json(tmp_path: Path, faces_dir: Path,
                                              found_boxes: list[tuple[float, ...]]) -> None:
    rows = [f"g06.jpg,{x:.0f},{y:.0f},{w:.0f},{h:.0f},0,0,0,test" for x, y, w, h in found_boxes]
    path = _boxes_csv(tmp_path / "set", faces_dir, rows)
    result = CliRunner().invoke(main, ["eval-detection", str(path), "--detector", "yunet", "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| detector |" in result.output and "| yunet |" in result.output
    saved = json.loads((tmp_path / "out" / "detection.json").read_text())
    assert saved["scores"][0]["recall"][">=40"] == 1.0
    bad = CliRunner().invoke(main, ["eval-detection", str(path), "--detector", "nope"])
    assert bad.exit_code != 0 and "detector must be one of" in bad.output
