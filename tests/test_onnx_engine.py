"""The ONNX conversion of dlib's face ResNet against dlib itself, and the converter's file checks.

Real faces come from the labelled face set (tests/data/faces, or `FSW_FACES`), read in place.
Conversions go to a temporary cache folder (`cache_dir`), never to the user's cache.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import dlib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

from indexer.labels import Label
from matcher import onnx_convert
from matcher.onnx_convert import (
    AddPrev,
    Affine,
    Conv,
    FullyConnected,
    ModelFormatError,
    Pool,
    Relu,
    Skip,
    Tag,
    converted_model_path,
    model_sha256,
    parse_dlib_resnet,
)
from matcher.onnx_engine import OnnxEngine

THRESHOLDS = (0.40, 0.45, 0.50, 0.55, 0.60)


def _models():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation
        import face_recognition_models

    return face_recognition_models


DAT = Path(_models().face_recognition_model_location())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsw_cache")


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> OnnxEngine:
    return OnnxEngine(threads=2, device="cpu", cache_dir=str(cache_dir))


@dataclass(frozen=True)
class RealFaces:
    chips: list[np.ndarray]
    where: list[str]  # image file and face index, for messages
    dlib_descriptors: np.ndarray  # (n, 128) from dlib's compute_face_descriptor, one batch


@pytest.fixture(scope="module")
def real_faces(labels: list[Label]) -> RealFaces:
    models = _models()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(models.pose_predictor_five_point_model_location())
    facerec = dlib.face_recognition_model_v1(models.face_recognition_model_location())
    assert any(x.file.startswith("gallery/") for x in labels) and any(x.file.startswith("queries/") for x in labels)
    chips: list[np.ndarray] = []
    where: list[str] = []
    for x in labels:
        with Image.open(x.path) as im:
            img = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        for i, box in enumerate(detector(img, 1)):
            shape = predictor(img, box)
            chips.append(dlib.get_face_chip(img, shape, size=150, padding=0.25))
            where.append(f"{x.file}#{i}")
    assert len(chips) >= 40, f"only {len(chips)} faces found in the labelled set"
    reference = np.asarray([np.asarray(d) for d in facerec.compute_face_descriptor(chips)], dtype=np.float32)
    return RealFaces(chips, where, reference)


def _pairwise(d: np.ndarray) -> np.ndarray:
    return np.linalg.norm(d[:, None, :] - d[None, :, :], axis=-1)


# -- equality with dlib ----------------------------------------------------------------------------


def test_descriptors_match_dlib_on_real_faces(engine: OnnxEngine, real_faces: RealFaces) -> None:
    ours = engine.describe(real_faces.chips)
    ref = real_faces.dlib_descriptors
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(real_faces.chips), 128)
    diff = np.abs(ours - ref).max(axis=1)
    worst = int(diff.argmax())
    assert diff[worst] < 1e-5, f"max abs diff {diff[worst]:.3g} on {real_faces.where[worst]}"

    d_ours, d_ref = _pairwise(ours), _pairwise(ref)
    for t in THRESHOLDS:
        flips = np.argwhere((d_ours < 1 - t) != (d_ref < 1 - t))
        pairs = [(real_faces.where[i], real_faces.where[j]) for i, j in flips if i < j]
        assert not pairs, f"threshold {t}: match decisions differ for {pairs[:5]}"


def test_batch_sizes_give_the_same_descriptors(engine: OnnxEngine, real_faces: RealFaces) -> None:
    chips = real_faces.chips[:16]
    assert len(chips) == 16
    one_by_one = np.concatenate([engine.describe([c]) for c in chips])
    assert one_by_one.shape == (16, 128)

    empty = engine.describe([])
    assert empty.shape == (0, 128) and empty.dtype == np.float32
    single = engine.describe(chips[:1])
    assert single.shape == (1, 128)
    np.testing.assert_allclose(single, one_by_one[:1], rtol=0, atol=1e-6)
    batch = engine.describe(chips)
    np.testing.assert_allclose(batch, one_by_one, rtol=0, atol=1e-6)
    # a 4-d array works like a list, and batches above max_batch are split
    np.testing.assert_allclose(engine.describe(np.stack(chips)), one_by_one, rtol=0, atol=1e-6)
    many = engine.describe(chips * 5)  # 80 > max_batch
    np.testing.assert_allclose(many, np.tile(one_by_one, (5, 1)), rtol=0, atol=1e-6)


def test_jitter_averages_jittered_copies(engine: OnnxEngine, real_faces: RealFaces) -> None:
    chips = real_faces.chips[:2]
    plain = engine.describe(chips)
    np.testing.assert_array_equal(engine.describe(chips, jitters=0), plain)
    jittered = engine.describe(chips, jitters=4)
    assert jittered.shape == (2, 128) and jittered.dtype == np.float32
    assert not np.allclose(jittered, plain)
    # the mean of jittered copies of a face stays near that face
    assert np.linalg.norm(jittered - plain, axis=1).max() < 0.3


def test_describe_rejects_bad_chips(engine: OnnxEngine) -> None:
    with pytest.raises(ValueError, match="shape"):
        engine.describe([np.zeros((150, 150), dtype=np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        engine.describe([np.zeros((150, 150, 3), dtype=np.float32)])


def test_device_selection(cache_dir: Path) -> None:
    assert OnnxEngine(threads=1, device="cpu", cache_dir=str(cache_dir)).device == "cpu"
    assert OnnxEngine(threads=1, cache_dir=str(cache_dir)).device in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        OnnxEngine(device="tpu", cache_dir=str(cache_dir))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert OnnxEngine(device="cuda", cache_dir=str(cache_dir)).device == "cuda"
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            OnnxEngine(device="cuda", cache_dir=str(cache_dir))


# -- the converter --------------------------------------------------------------------------------


def test_parser_reads_the_whole_network() -> None:
    net = parse_dlib_resnet(DAT)
    assert net.file_size == DAT.stat().st_size
    assert net.input.rows == net.input.cols == 150
    np.testing.assert_allclose(net.input.mean_rgb, (122.782, 117.001, 104.298), atol=1e-4)
    assert abs(net.loss.distance_threshold - 0.6) < 1e-6
    counts: dict[type, int] = {}
    for layer in net.layers[1:]:
        counts[type(layer)] = counts.get(type(layer), 0) + 1
    expected = {Conv: 29, Affine: 29, Relu: 29, Pool: 6, AddPrev: 14, FullyConnected: 1, Tag: 18, Skip: 4}
    assert counts == expected
    first = net.layers[1]
    assert isinstance(first, Conv)
    assert first.weight.shape == (32, 3, 7, 7) and first.stride == (2, 2) and first.padding == (0, 0)
    fc = net.layers[-1]
    assert isinstance(fc, FullyConnected) and fc.weight.shape == (256, 128) and fc.bias is None


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    data = DAT.read_bytes()
    for cut in (len(data) // 2, 300, len(data) - 1):
        copy = tmp_path / f"cut{cut}.dat"
        copy.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=rf"is truncated at byte {cut} \(expected "):
            parse_dlib_resnet(copy)
    copy = tmp_path / "half.dat"
    copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"expected a tensor of \d+ floats"):
        converted_model_path(str(copy))


def _altered(tmp_path: Path, old: bytes, new: bytes, nth: int = 0) -> tuple[Path, int]:
    data = bytearray(DAT.read_bytes())
    at = -1
    for _ in range(nth + 1):
        at = data.index(old, at + 1)
    data[at : at + len(old)] = new
    path = tmp_path / f"altered_{new.decode()}_{nth}.dat"
    path.write_bytes(bytes(data))
    return path, at


def test_altered_layer_structure_is_rejected(tmp_path: Path) -> None:
    path, at = _altered(tmp_path, b"relu_", b"relv_", nth=3)
    with pytest.raises(ModelFormatError, match=rf"unexpected layer 'relv_' at byte {at - 2}"):
        parse_dlib_resnet(path)
    path, at = _altered(tmp_path, b"con_4", b"con_5", nth=10)
    with pytest.raises(ModelFormatError, match=rf"unexpected layer 'con_5' at byte {at - 2}"):
        parse_dlib_resnet(path)
    # relu_ and add_prev_ are both parameterless: swapping one for the other keeps the file readable,
    # but no longer dlib's face ResNet
    data = DAT.read_bytes()
    at = data.index(b"\x05relu_", data.index(b"add_prev_"))
    swapped = tmp_path / "swapped.dat"
    swapped.write_bytes(data[:at] + b"\x09add_prev_" + data[at + 6 :])
    with pytest.raises(ModelFormatError, match="does not hold dlib's face ResNet"):
        parse_dlib_resnet(swapped)
    # a layer wrapper's version (the file starts with the versions of all wrappers, outermost first)
    first_wrapper = data.index(b"\x01\x02\x01\x02", data.index(b"loss_metric_2"))
    assert first_wrapper < 64
    bad = bytearray(data)
    bad[first_wrapper + 1] = 7
    wrapper = tmp_path / "wrapper.dat"
    wrapper.write_bytes(bytes(bad))
    with pytest.raises(ModelFormatError, match=f"unexpected layer wrapper version 7 at byte {first_wrapper}"):
        parse_dlib_resnet(wrapper)


def test_trailing_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "longer.dat"
    path.write_bytes(DAT.read_bytes() + b"\x00")
    with pytest.raises(ModelFormatError, match=r"trailing bytes after the network \(1 bytes\)"):
        parse_dlib_resnet(path)


def test_cache_is_keyed_by_the_file_hash(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    copy = tmp_path / "model.dat"
    shutil.copyfile(DAT, copy)
    sha = model_sha256(str(copy))
    assert sha == model_sha256(str(DAT)) and len(sha) == 64
    first = converted_model_path(str(copy), cache)
    assert first == cache / f"dlib_resnet_{sha[:16]}.onnx" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert converted_model_path(str(copy), cache) == first and first.stat().st_mtime_ns == stamp  # no rework
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]

    model = onnx.load(str(first))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fsw_source_sha256"] == sha
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    # one weight changed: still a valid network, another hash, another cached model
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(stamp + 10**9, stamp + 10**9))
    sha2 = model_sha256(str(copy))
    assert sha2 != sha
    second = converted_model_path(str(copy), cache)
    assert second == cache / f"dlib_resnet_{sha2[:16]}.onnx" and second != first and first.is_file()

    # a damaged cached file is converted again
    second.write_bytes(b"not a model")
    assert converted_model_path(str(copy), cache) == second
    assert onnx.load(str(second)).graph.output[0].name == onnx_convert.OUTPUT_NAME


def test_a_tampered_cached_model_is_rebuilt_never_used(tmp_path: Path, real_faces: RealFaces) -> None:
    """Issue 12: a cached model altered but still valid (the final layer's weights zeroed, its metadata
    kept) is refused by the hash of its bytes recorded at conversion, and converted again."""
    cache = tmp_path / "cache"
    cached = converted_model_path(None, cache)
    assert cached.stat().st_mode & 0o777 == 0o600  # descriptors' model: its owner's alone
    model = onnx.load(str(cached))
    fc = next(t for t in model.graph.initializer if t.name.startswith("fc_w"))
    fc.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(fc)), fc.name))
    onnx.save(model, str(cached))  # metadata (source hash, converter version) untouched
    assert {p.key: p.value for p in onnx.load(str(cached)).metadata_props}["fsw_source_sha256"]

    engine = OnnxEngine(threads=1, device="cpu", cache_dir=str(cache))
    got = engine.describe(real_faces.chips[:4])
    assert np.abs(got - real_faces.dlib_descriptors[:4]).max() < 1e-4  # not zeros: the real network
    rebuilt = onnx.load(str(cached))
    fc = next(t for t in rebuilt.graph.initializer if t.name.startswith("fc_w"))
    assert np.any(onnx.numpy_helper.to_array(fc))
    assert cached.stat().st_mode & 0o777 == 0o600
