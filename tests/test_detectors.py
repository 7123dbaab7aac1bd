"""Face detector engines (matcher.detectors): the faces they find, YuNet's passes, box remap, model check,
and the CPU fallback on a GPU that fails (simulated: no test needs a GPU)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dlib
import numpy as np
import pytest

from indexer.labels import Label
from matcher.detectors import make_detector, scaled
from matcher.detectors import yunet as yn
from matcher.detectors.hog import HogDetector
from matcher.detectors.yunet import YuNetDetector, hog_like, load_model, merge
from matcher.encoder import EncoderSettings
from matcher.errors import ModelError
from matcher.images import load_image
from matcher.onnx_session import CPU, CUDA, make_session


@pytest.fixture(scope="module")
def yunet() -> YuNetDetector:
    return YuNetDetector(threads=1, device="cpu")


def _row(x: float, y: float, w: float, h: float, score: float = 0.9) -> np.ndarray:
    return np.asarray([x, y, w, h, *([0.0] * 10), score], dtype=np.float32)


def test_yunet_finds_every_labelled_face_and_none_in_a_faceless_photo(yunet: YuNetDetector,
                                                                       labels: list[Label]) -> None:
    for item in [x for x in labels if x.split == "gallery"]:
        found = yunet.photo(load_image(item.path))
        if item.expected_faces == 0:
            assert found == [], item.file
        else:  # a photo may hold an unlabelled face in the background: at least the labelled ones
            assert len(found) >= item.expected_faces, item.file


def test_yunet_finds_each_selfie_face_and_none_where_there_is_none(yunet: YuNetDetector,
                                                                    labels: list[Label]) -> None:
    for item in [x for x in labels if x.split == "query"]:
        found = yunet.selfie(load_image(item.path))
        assert (len(found) > 0) == (item.people != {"none"}), item.file


def test_a_close_up_is_one_whole_face(yunet: YuNetDetector, faces_dir: Path) -> None:
    # g12: a face about 650 px wide in a 1400 px photo. At full size YuNet cuts it into partial boxes;
    # the 640 px pass finds it whole, and the merge keeps that one.
    image = load_image(faces_dir / "gallery" / "g12.jpg")
    full = yunet.boxes(image, 10_000)
    found = yunet.photo(image)
    assert len(found) == 1
    assert found[0].width() > 500
    assert len(full) >= 1 and max(float(b[2]) for b in full) < found[0].width()


def test_boxes_are_in_the_original_pixels_at_any_detection_size(yunet: YuNetDetector, faces_dir: Path) -> None:
    image = load_image(faces_dir / "gallery" / "g06.jpg")  # 1366 px, four faces about 95 px wide
    full, half = yunet.boxes(image, 10_000), yunet.boxes(image, 683)
    assert len(full) == len(half) == 4
    for row in full:
        nearest = np.abs(half[:, :2] - row[:2]).sum(axis=1).min()
        assert nearest < 0.15 * row[2]


def test_merge_keeps_the_whole_face_over_its_parts_and_separate_faces_apart() -> None:
    whole = _row(100, 100, 600, 800, 0.93)
    part = _row(150, 300, 400, 400, 0.8)  # inside the whole face, IoU about 0.33
    other = _row(900, 100, 100, 120, 0.7)
    kept = merge([np.stack([part, other]), np.stack([whole])])
    assert {tuple(r[:4]) for r in kept} == {tuple(whole[:4]), tuple(other[:4])}


def test_hog_like_moves_the_centre_down_and_makes_a_square() -> None:
    dx, dy, k = yn.HOG_REMAP
    r = hog_like(_row(100, 200, 100, 120))
    assert r.width() == r.height()
    assert abs((r.right() - r.left()) - k * np.sqrt(100 * 120)) <= 1  # the side as fitted: right - left
    assert abs((r.left() + r.right()) / 2 - (150 + dx * 120)) <= 1
    assert abs((r.top() + r.bottom()) / 2 - (260 + dy * 120)) <= 1


def test_an_altered_model_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "yunet.onnx"
    shutil.copy(yn.MODEL_PATH, copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="altered"):
        load_model(copy)
    with pytest.raises(ModelError, match="cannot be read"):
        YuNetDetector(model_path=tmp_path / "missing.onnx")


def test_the_shipped_model_and_its_licence_are_there() -> None:
    assert load_model()  # hash checked
    folder = yn.MODEL_PATH.parent
    assert (folder / "LICENSE").read_text().startswith("Copyright")
    assert yn.MODEL_SHA256 in (folder / "SOURCES.md").read_text()


def test_hog_detector_is_todays_detection(faces_dir: Path) -> None:
    image = load_image(faces_dir / "gallery" / "g06.jpg")
    small, scale = scaled(image, 1600)
    direct = list(dlib.get_frontal_face_detector()(small, 1))
    assert scale == 1.0
    assert HogDetector(1600, 1).photo(image) == direct


def test_make_detector_follows_the_settings() -> None:
    assert make_detector(EncoderSettings(detector="hog")).name == "hog"
    assert make_detector(EncoderSettings(detector="yunet"), threads=1, device="cpu").name == "yunet"
    with pytest.raises(ValueError, match="detector"):
        EncoderSettings(detector="nope")  # type: ignore[arg-type]


# -- GPU readiness, on a CPU: a CUDA provider that fails ------------------------------------------------


class _Sessions:
    """Makes sessions as ONNX Runtime would, but a CUDA one fails as told (at start or out of memory)."""

    def __init__(self, fail_at_start: bool = False):
        self.fail_at_start = fail_at_start
        self.made: list[list[str]] = []

    def __call__(self, model: Any, sess_options: Any = None, providers: Any = None) -> Any:
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.made.append(names)
        if CUDA in names and self.fail_at_start:
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        import onnxruntime as ort

        real = ort.InferenceSession(model, sess_options=sess_options, providers=[CPU])
        return _OutOfMemoryOnCuda(real) if CUDA in names else real


class _OutOfMemoryOnCuda:
    def __init__(self, real: Any):
        self.real = real
        self.calls = 0

    def get_providers(self) -> list[str]:
        return [CUDA, CPU]

    def run(self, *args: Any) -> Any:
        self.calls += 1
        raise RuntimeError("CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc")


def _factory(sessions: _Sessions) -> Any:
    def make(model: Any, threads: Any = None, device: str = "auto", cuda_options: Any = None) -> Any:
        return make_session(model, threads, device, cuda_options, available=[CUDA, CPU], create=sessions)

    return make


def test_a_gpu_that_cannot_start_leaves_yunet_on_the_cpu(faces_dir: Path) -> None:
    sessions = _Sessions(fail_at_start=True)
    detector = YuNetDetector(threads=1, session_factory=_factory(sessions))
    assert sessions.made == [[CUDA, CPU], [CPU]]
    assert detector.device == "cpu"
    assert len(detector.photo(load_image(faces_dir / "gallery" / "g06.jpg"))) == 4


def test_yunet_out_of_gpu_memory_runs_the_call_on_the_cpu(faces_dir: Path) -> None:
    sessions = _Sessions()
    detector = YuNetDetector(threads=1, session_factory=_factory(sessions))
    assert detector.device == "cuda"
    found = detector.photo(load_image(faces_dir / "gallery" / "g06.jpg"))  # two passes, both fall back
    assert len(found) == 4
    assert detector.fallbacks == 2
    assert sessions.made == [[CUDA, CPU], [CPU]]  # one CPU session, made on first need


def test_other_gpu_errors_are_not_hidden() -> None:
    class Broken(_OutOfMemoryOnCuda):
        def run(self, *args: Any) -> Any:
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")

    detector = YuNetDetector(threads=1, session_factory=lambda model, *a: Broken(None))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        detector.selfie(np.zeros((100, 100, 3), dtype=np.uint8))


# -- the smallest face indexed -------------------------------------------------------------------------


def test_faces_narrower_than_min_face_are_counted_not_indexed(tmp_path: Path, faces_dir: Path) -> None:
    from indexer.pipeline import index_photos
    from matcher.gallery import Gallery

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("g03.jpg", "g06.jpg"):  # one face about 320 px wide; four about 95 px
        shutil.copy(faces_dir / "gallery" / name, photos / name)
    summary = index_photos(tmp_path / "g", [photos], EncoderSettings(min_face=200), photo_root=photos, jobs=1)
    assert (summary.faces, summary.faces_too_small, summary.photos_without_faces) == (1, 4, 1)
    assert Gallery.open(tmp_path / "g").settings["min_face"] == 200


# -- galleries built before YuNet ------------------------------------------------------------------------


def test_a_hog_gallery_keeps_working_and_refuses_another_detector(tmp_path: Path, faces_dir: Path) -> None:
    from click.testing import CliRunner

    from indexer.cli import main
    from indexer.pipeline import index_photos
    from matcher.encoder import Encoder
    from matcher.gallery import Gallery

    root = tmp_path / "photos"
    (root / "Day-2").mkdir(parents=True)
    shutil.copy(faces_dir / "gallery" / "g05.jpg", root / "g05.jpg")
    # what every gallery so far records: HOG and its settings, no min_face, no detector model
    old = EncoderSettings(detector="hog", min_face=0)
    index_photos(tmp_path / "g", [root], old, photo_root=root, jobs=1)
    recorded = Gallery.open(tmp_path / "g").settings
    assert set(recorded) == {"model", "landmarks", "detector", "upsample", "jitters", "max_side"}

    shutil.copy(faces_dir / "gallery" / "g15.jpg", root / "Day-2" / "g15.jpg")
    refused = CliRunner().invoke(main, ["add", str(root / "Day-2"), "--gallery", str(tmp_path / "g"),
                                        "--detector", "yunet", "-j", "1"])
    assert refused.exit_code == 1 and "settings differ" in refused.output
    added = CliRunner().invoke(main, ["add", str(root / "Day-2"), "--gallery", str(tmp_path / "g"), "-j", "1"])
    assert added.exit_code == 0, added.output
    g = Gallery.open(tmp_path / "g")
    assert g.settings == recorded and g.stats().faces == 3
    selfie_settings = EncoderSettings.from_recorded(g.settings)
    assert Encoder(selfie_settings).detector.name == "hog"  # a selfie is encoded with the gallery's detector
