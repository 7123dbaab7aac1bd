"""Accuracy: the eval's counts on hand-made cases, query expansion's guards, and the dev set at the defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.defaults import EVAL_THRESHOLDS as THRESHOLDS
from indexer.evaluate import Faces, QueryInput, answers, evaluate, score
from indexer.labels import LabelsError, read_labels
from matcher.encoder import EncoderSettings, Face
from matcher.errors import SettingsMismatchError
from matcher.expansion import MARGIN, refine
from matcher.gallery import Gallery
from matcher.query import search_descriptor
from matcher.writer import GalleryWriter, PendingPhoto

BIN = Path(sys.executable).parent
SETTINGS = {"model": "m1", "landmarks": "5-point", "detector": "hog", "upsample": 1, "jitters": 1, "max_side": 1600}


def e(i: int, length: float = 1.0) -> np.ndarray:
    """`length` along axis i of descriptor space: sums of these have distances we can work out by hand."""
    v = np.zeros(128)
    v[i] = length
    return v


def sim(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def hand_made_set() -> tuple[Faces, dict[str, frozenset[str]], list[QueryInput]]:
    """Six labelled photos, one unlabelled; queries A, B, C, a stranger S and one without a face.

    Similarities to each query (faces along their own axes, so they only see their query):
    A: p1 0.80, p2 0.56, p3 0.38, p4 0.42 (B's photo: wrong below 0.42), p7 0.62 (unlabelled)
    B: p2 0.72 (B's face in p4 is far away: never found); C: p6 0.90; S: p3 0.33 (an unknown face)
    """
    qa, qb, qc, qs = e(0, 0.0), e(100, 5.0), e(90, 5.0), e(50, 5.0)
    faces = [
        ("p1", qa + e(1, 0.20)),
        ("p2", qa + e(2, 0.44)),
        ("p2", qb + e(101, 0.28)),
        ("p3", qa + e(3, 0.62)),
        ("p3", qs + e(51, 0.67)),
        ("p4", qa + e(4, 0.58)),
        ("p6", qc + e(91, 0.10)),
        ("p7", qa + e(7, 0.38)),
    ]
    ids = np.array(["p1", "p2", "p3", "p4", "p5", "p6", "p7"], dtype=object)
    index = {pid: i for i, pid in enumerate(ids)}
    table = Faces(np.array([v for _, v in faces], np.float32), np.array([index[p] for p, _ in faces]), ids)
    truth = {
        "p1": frozenset({"A"}), "p2": frozenset({"A", "B"}), "p3": frozenset({"A", "unknown"}),
        "p4": frozenset({"B"}), "p5": frozenset({"none"}), "p6": frozenset({"C"}),
    }
    queries = [QueryInput("qa", "A", qa), QueryInput("qb", "B", qb), QueryInput("qc", "C", qc),
               QueryInput("qs", "S", qs), QueryInput("qn", "none", None)]
    return table, truth, queries


def test_counts_at_each_threshold_on_a_hand_made_set():
    faces, truth, queries = hand_made_set()
    rows, per_query = score(faces, truth, queries, THRESHOLDS, expand=False)
    assert [r.threshold for r in rows] == [0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70]
    #            0.30 0.35 0.40 0.45 0.50 0.55 0.60 0.65 0.70
    found = [5, 5, 4, 4, 4, 4, 3, 3, 3]
    wrong = [2, 1, 1, 0, 0, 0, 0, 0, 0]
    strangers_ok = [0, 1, 1, 1, 1, 1, 1, 1, 1]
    unlabelled = [1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert [r.found for r in rows] == found
    assert all(r.wanted == 6 for r in rows)  # A 3, B 2, C 1
    assert [r.wrong for r in rows] == wrong
    assert all(r.negatives == 3 + 4 + 5 + 6 for r in rows)  # of 6 labelled photos: A 3, B 4, C 5, S all
    assert rows[0].wrong_rate == pytest.approx(2 / 18) and rows[0].recall == pytest.approx(5 / 6)
    assert all(r.perfect == 1 and r.person_queries == 3 for r in rows)  # only C: A has p4 or misses p3, B misses p4
    assert [r.strangers_ok for r in rows] == strangers_ok and all(r.strangers == 1 for r in rows)
    assert all(r.no_face_ok == 1 and r.no_face == 1 for r in rows)
    assert [r.unlabelled for r in rows] == unlabelled
    assert all(r.expanded == 0 for r in rows)
    assert per_query["qa"][0.40].photos.keys() == {"p1", "p2", "p4", "p7"}
    assert per_query["qa"][0.40].photos["p2"] == pytest.approx(0.56, abs=1e-6)


def test_a_faceless_query_that_finds_a_face_and_photos_is_counted_as_failed():
    faces, truth, queries = hand_made_set()
    found_a_face = [QueryInput("qn", "none", e(0, 0.0) + e(30, 0.3))]  # sees A's photos p1 and p2
    rows, _ = score(faces, truth, found_a_face, (0.5, 0.7), expand=False)
    assert (rows[0].no_face_ok, rows[0].no_face) == (0, 1)
    assert (rows[1].no_face_ok, rows[1].wrong, rows[1].found) == (1, 0, 0)


def _gallery(folder: Path, photos: dict[str, list[np.ndarray]]) -> Gallery:
    with GalleryWriter(folder, SETTINGS, folder.parent, create=True) as w:
        for i, (pid, vectors) in enumerate(photos.items()):
            faces = [Face((10, 60, 60, 10), np.asarray(v, np.float32)) for v in vectors]
            w.add(PendingPhoto.from_faces(pid, f"{i:064x}", 1000, 1.0, faces))
        w.commit()
    return Gallery.open(folder)


def clustered_gallery(folder: Path, seed: int) -> tuple[Gallery, list[np.ndarray]]:
    """People whose photos sit around their centre, and selfies off-centre: expansion finds more of them."""
    rng = np.random.default_rng(seed)

    def step(length: float) -> np.ndarray:
        v = rng.normal(size=128)
        return v * length / np.linalg.norm(v)

    centres = [step(1.5) for _ in range(6)]
    photos: dict[str, list[np.ndarray]] = {}
    for n in range(40):
        people = rng.choice(6, size=int(rng.integers(1, 4)), replace=False)
        photos[f"s{n % 2}/p{n:02d}.jpg"] = [centres[p] + step(rng.uniform(0.25, 0.42)) for p in people]
    return _gallery(folder, photos), [c + step(0.33) for c in centres]


@pytest.mark.parametrize("seed", [3, 4])
def test_expanded_answers_are_the_job_search_at_every_threshold(tmp_path, seed):
    gallery, selfies = clustered_gallery(tmp_path / "g", seed)
    faces = Faces.of(gallery)
    changed = 0
    for q in selfies:
        derived = answers(faces, q, THRESHOLDS, expand=True)
        plain = answers(faces, q, THRESHOLDS, expand=False)
        for t in THRESHOLDS:
            job = {m.id: m.similarity for m in search_descriptor(gallery, q, "", t)}
            assert job.keys() == derived[t].photos.keys(), (t, sorted(job), sorted(derived[t].photos))
            assert all(job[k] == pytest.approx(derived[t].photos[k], abs=1e-9) for k in job)
            changed += derived[t].photos.keys() != plain[t].photos.keys()
    assert changed >= 5  # expansion did change answers, at thresholds of its own: the derivation was exercised


def look_alike_case() -> dict[str, np.ndarray]:
    """A selfie `q`, two photos of its person (T1, T2: close to each other) and a look-alike L matching `q`
    well above the threshold but far from T1 and T2; L2 is another photo of the look-alike."""
    return {
        "q": e(0, 0.0),
        "T1": e(1, 0.38) + e(2, 0.10),  # similarity to q 0.607
        "T2": e(1, 0.38) - e(2, 0.10),
        "L": e(3, 0.42),  # similarity to q 0.58, to T1 0.43
        "L2": e(3, 0.42) + e(5, 0.30),  # similarity to q 0.484: not matched by the selfie alone
    }


def test_a_look_alike_that_disagrees_with_the_other_matches_does_not_pull_the_query(tmp_path):
    c = look_alike_case()
    assert sim(c["q"], c["L"]) > 0.5 + MARGIN and sim(c["q"], c["T1"]) > 0.5 + MARGIN
    result = refine(c["q"], np.stack([c["T1"], c["T2"], c["L"]]), 0.5)
    assert sorted(result.used.tolist()) == [0, 1] and result.rejected == 1
    assert sim(result.descriptor, c["L"]) < sim(c["q"], c["L"])
    naive = (c["q"] + c["T1"] + c["T2"] + c["L"]) / 4
    assert sim(naive, c["L2"]) > 0.5  # averaging every confident match would bring in the look-alike's photo

    gallery = _gallery(tmp_path / "g", {f"e/{k}.jpg": [v] for k, v in c.items() if k != "q"})
    got = [m.id for m in search_descriptor(gallery, c["q"].astype(np.float32), "", 0.5)]
    assert set(got) == {"e/T1.jpg", "e/T2.jpg", "e/L.jpg"}  # L itself was matched by the selfie; L2 is not


def test_no_expansion_from_fewer_confident_matches_than_required():
    q = e(0, 0.0)
    one = np.stack([e(1, 0.40)])  # similarity 0.60: confident at 0.5
    assert not refine(q, one, 0.5, min_matches=2).expanded
    assert np.array_equal(refine(q, one, 0.5, min_matches=2).descriptor, q)
    assert refine(q, one, 0.5, min_matches=1).expanded
    barely = np.stack([e(1, 0.5 - MARGIN / 2), e(2, 0.5 - MARGIN / 2)])  # matched, but not well above 0.5
    assert not refine(q, barely, 0.5).expanded
    assert refine(q, barely, 0.4).expanded  # at a lower threshold the same faces are confident


def test_expanded_query_is_the_mean_of_the_selfie_and_its_confident_matches():
    q = e(0, 0.0) + e(9, 0.05)
    faces = np.stack([e(1, 0.40), e(1, 0.35) + e(2, 0.1), e(3, 0.47), e(4, 0.9)])  # 0.47 and 0.9: not confident
    result = refine(q, faces, 0.5)
    assert sorted(result.used.tolist()) == [0, 1]
    assert np.allclose(result.descriptor, (q + faces[0] + faces[1]) / 3, atol=1e-7)
    assert result.descriptor.dtype == np.float32
    shuffled = refine(q, faces[[3, 1, 2, 0]], 0.5)  # another gallery's row order: the very same query
    assert shuffled.descriptor.tobytes() == result.descriptor.tobytes()


def test_expansion_is_one_round(tmp_path):
    """F2 becomes confident only for the expanded query, and F3 would match only after a second round."""
    q = e(0, 0.0)
    f1 = e(1, 0.40)
    f2 = e(1, 0.20) + e(2, 0.42)
    f3 = e(1, 0.20) + e(2, 0.14) + e(3, 0.49)
    q1 = (q + f1) / 2
    assert sim(q, f2) < 0.5 + MARGIN < sim(q1, f2)
    assert sim(q1, f3) < 0.5 < sim((q + f1 + f2) / 3, f3)
    gallery = _gallery(tmp_path / "g", {"x/f1.jpg": [f1], "x/f2.jpg": [f2], "x/f3.jpg": [f3]})
    got = {m.id: m.similarity for m in search_descriptor(gallery, q.astype(np.float32), "", 0.5)}
    assert set(got) == {"x/f1.jpg", "x/f2.jpg"}
    assert got["x/f1.jpg"] == pytest.approx(sim(q1, f1), abs=1e-6)  # similarity to the expanded query


def test_exclusions_filter_the_expanded_answer_and_a_stage_expands_on_its_own_photos(tmp_path):
    q = e(0, 0.0)
    photos = {"a/f1.jpg": [e(1, 0.40)], "b/f2.jpg": [e(1, 0.40) + e(2, 0.2)], "a/f3.jpg": [e(1, 0.52) + e(3, 0.28)]}
    gallery = _gallery(tmp_path / "g", photos)
    assert sim(q, photos["a/f3.jpg"][0]) < 0.5  # found only by the expanded query
    everywhere = {m.id: m.similarity for m in search_descriptor(gallery, q.astype(np.float32), "", 0.5)}
    assert set(everywhere) == {"a/f1.jpg", "b/f2.jpg", "a/f3.jpg"}
    exclude = frozenset({"a/f1.jpg", "b/f2.jpg"})
    got = {m.id: m.similarity for m in search_descriptor(gallery, q.astype(np.float32), "", 0.5, exclude=exclude)}
    assert got == {k: v for k, v in everywhere.items() if k not in exclude}
    # a stage is searched as if it were the whole gallery: its expansion draws on its own photos only
    stage_a = _gallery(tmp_path / "a", {k: v for k, v in photos.items() if k.startswith("a/")})
    alone = {m.id: m.similarity for m in search_descriptor(stage_a, q.astype(np.float32), "", 0.5)}
    assert alone["a/f3.jpg"] != everywhere["a/f3.jpg"]  # b/f2.jpg pulled the whole gallery's query
    got = {m.id: m.similarity for m in search_descriptor(gallery, q.astype(np.float32), "a", 0.5,
                                                          exclude=frozenset({"a/f1.jpg"}))}
    assert got == {k: v for k, v in alone.items() if k != "a/f1.jpg"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,who\ngallery/g01.jpg,x\n", "needs a header line 'file,identity,split'"),
        ("file,identity,split\ngallery/g01.jpg,rose_leslie,train\n", "split must be 'gallery' or 'query'"),
        ("file,identity,split\nqueries/q01.jpg,biden;obama,query\n", "a query names one person"),
        ("file,identity,split\ngallery/g04.jpg,none;obama,gallery\n", "'none' means no face"),
        ("file,identity,split\ngallery/nope.jpg,obama,gallery\n", "does not exist"),
        ("file,identity,split\ngallery/g01.jpg,rose_leslie,gallery\n", "needs gallery rows and query rows"),
    ],
)
def test_labels_mistakes_are_named(faces_dir, tmp_path, text, message):
    (tmp_path / "gallery").symlink_to(faces_dir / "gallery")
    (tmp_path / "queries").symlink_to(faces_dir / "queries")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(LabelsError, match=message):
        read_labels(tmp_path / "labels.csv")


# -- the dev set ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_report(built_gallery, faces_dir):
    return evaluate(faces_dir / "labels.csv", gallery=built_gallery)


def test_defaults_find_nine_photos_in_ten_with_no_wrong_photo_stranger_or_false_face(dev_report):
    """The staged copies in `built_gallery` are found by content hash; the job path is checked inside."""
    row = dev_report.row(0.5)
    assert row.wanted >= 40 and row.found >= 0.9 * row.wanted, f"found {row.found}/{row.wanted}"
    assert row.wrong == 0 and row.unlabelled == 0
    assert row.strangers >= 3 and row.strangers_ok == row.strangers
    assert row.no_face >= 2 and row.no_face_ok == row.no_face
    assert all(not q["face_found"] for q in dev_report.queries if q["kind"] == "no face")
    for q in dev_report.queries:
        assert q["wrong"] == {}, q
        if q["kind"] == "stranger":
            assert q["found"] == {} and q["expanded_with"] == 0, q
    checks = dev_report.gallery_checks
    assert checks["false_faces_in_faceless_photos"] == {}
    # YuNet finds an unlabelled face at the edge of g08 and a raised hand in g02 (docs/accuracy.md)
    assert 0 <= checks["faces_found"] - checks["faces_labelled"] <= 2
    assert sum(len(q["found"]) for q in dev_report.queries) == row.found
    recalls = [r.recall for r in dev_report.rows]
    assert recalls == sorted(recalls, reverse=True)


def test_mirror_and_expansion_each_find_more_than_plain_settings(dev_report, built_gallery, faces_dir):
    found = {}
    for mirror, expansion in ((False, False), (True, False), (False, True)):
        settings = EncoderSettings(selfie_mirror=mirror, selfie_expansion=expansion)
        report = evaluate(faces_dir / "labels.csv", gallery=built_gallery, settings=settings, thresholds=(0.5,))
        found[mirror, expansion] = report.row(0.5).found
        assert report.row(0.5).wrong == 0
    found[True, True] = dev_report.row(0.5).found
    assert found[False, False] < found[True, False] < found[True, True]
    assert found[False, False] < found[False, True] < found[True, True]


def test_a_gallery_built_otherwise_is_refused(built_gallery, faces_dir):
    with pytest.raises(SettingsMismatchError, match="was built with upsample=1"):
        evaluate(faces_dir / "labels.csv", gallery=built_gallery, settings=EncoderSettings(upsample=2))


def test_cli_prints_the_table_and_writes_json_and_png(built_gallery, faces_dir, tmp_path):
    p = subprocess.run(
        [BIN / "fsw-index", "eval", faces_dir / "labels.csv", "--gallery", built_gallery, "--out", tmp_path / "out"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    marked = [line for line in p.stdout.splitlines() if line.startswith("*") and "0.50" in line]
    assert len(marked) == 1 and "wrong rate" in p.stdout
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["threshold"] for r in report["rows"]] == list(THRESHOLDS)
    assert report["default_threshold"] == 0.5 and report["settings"]["selfie_expansion"] is True
    assert (tmp_path / "out" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([BIN / "fsw-index", "eval", faces_dir / "gallery" / "g01.jpg"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "cannot read labels" in bad.stderr, bad.stderr
