"""Encoder settings and descriptor engines, measured on the labelled dev set.

- The detection grid: detection size x upsample count, each photo's HOG time and the faces found,
  against the number of people `labels.csv` lists for the photo (so the default comes from numbers).
  The combinations are `Config.grid`; "full size" is 1600 here, since the dev photos are at most 1600 px.
- Descriptor engines: ms per face for dlib and ONNX Runtime at batch 1 (one call per face) and 16.
"""

from __future__ import annotations

import numpy as np

from bench.common import Config, gallery_photos, stats, timed, timed_together
from matcher.encoder import Encoder, EncoderSettings
from matcher.engines import DlibEngine
from matcher.images import load_image
from matcher.onnx_engine import OnnxEngine


def chips(encoder: Encoder, n: int = 16) -> list[np.ndarray]:
    """n real face chips from the dev gallery (repeated when it holds fewer)."""
    import dlib

    out: list[np.ndarray] = []
    for item in gallery_photos():
        image = load_image(item.path)
        for r in encoder.detect(image, 1600, 1):
            out.append(dlib.get_face_chip(image, encoder._landmarks(image, r), size=150, padding=0.25))
        if len(out) >= n:
            break
    return (out * (n // max(1, len(out)) + 1))[:n]


def descriptor_engines(encoder: Encoder, repeats: int, warmup: int) -> dict[str, object]:
    batch = chips(encoder, 16)
    engines = {"dlib": DlibEngine(), "onnx": OnnxEngine(), "onnx_1_thread": OnnxEngine(threads=1)}
    methods = {}
    for name, engine in engines.items():
        methods[(name, 1)] = lambda e=engine: [e.describe([c]) for c in batch]
        methods[(name, 16)] = lambda e=engine: e.describe(batch)
    runs = timed_together(methods, repeats, warmup)  # type: ignore[arg-type]
    out: dict[str, object] = {}
    for name in engines:
        out[name] = {"batch_1_ms_per_face": _per_face(runs[(name, 1)][0], len(batch)),  # type: ignore[index]
                     "batch_16_ms_per_face": _per_face(runs[(name, 16)][0], len(batch))}  # type: ignore[index]
    dlib_ = out["dlib"]
    onnx_ = out["onnx"]
    assert isinstance(dlib_, dict) and isinstance(onnx_, dict)
    keys = ("batch_1_ms_per_face", "batch_16_ms_per_face")
    out["dlib_over_onnx"] = {k: round(dlib_[k]["median_ms"] / onnx_[k]["median_ms"], 2) for k in keys}
    out["dlib_batched_over_per_face"] = round(
        dlib_["batch_16_ms_per_face"]["median_ms"] / dlib_["batch_1_ms_per_face"]["median_ms"], 3
    )
    flops = network_flops()
    out["network_gflop_per_face"] = round(flops / 1e9, 3)
    out["achieved_gflop_per_s"] = {
        name: round(flops / (v["batch_16_ms_per_face"]["median_ms"] / 1000) / 1e9, 1)  # type: ignore[index]
        for name, v in out.items()
        if name in engines
    }
    return out


def network_flops() -> float:
    """Multiply-adds x 2 of one face through the converted network (convolutions and the final layer)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    from matcher import onnx_convert

    model = onnx.load(str(onnx_convert.converted_model_path()))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output})
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "Conv":
            cout, cin, kh, kw = weights[node.input[1]]
            _, _, h, w = shapes[node.output[0]]
            total += 2.0 * cout * h * w * cin * kh * kw
        elif node.op_type == "MatMul" and node.input[1] in weights:
            n_in, n_out = weights[node.input[1]]
            total += 2.0 * n_in * n_out
    return total


def _per_face(st: dict[str, float | int], n: int) -> dict[str, float | int]:
    return {k: (round(v / n, 3) if k.endswith("_ms") else v) for k, v in st.items()}


def detection_grid(config: Config, encoder: Encoder) -> list[dict[str, object]]:
    photos = [(item, load_image(item.path)) for item in gallery_photos()[: config.dev_photos]]
    expected_total = sum(item.expected_faces for item, _ in photos)
    rows = []
    for side, upsample in config.grid:
        detect_s, describe_s, found, exact, missed, extra = [], [], 0, 0, 0, 0
        for item, image in photos:
            st, rects = timed(lambda i=image, s=side, u=upsample: encoder.detect(i, s, u), 1, warmup=0)
            detect_s.append(st["median_ms"] / 1000)
            st, _ = timed(lambda i=image, r=rects: encoder.describe(i, r), 1, warmup=0)
            describe_s.append(st["median_ms"] / 1000)
            n, want = len(rects), item.expected_faces
            found += n
            exact += n == want
            missed += max(0, want - n)
            extra += max(0, n - want)
        total = np.asarray(detect_s) + np.asarray(describe_s)
        rows.append({
            "max_side": side,
            "upsample": upsample,
            "photos": len(photos),
            "detect_per_photo": stats(detect_s),
            "photo_per_photo": stats(list(total)),  # detect + landmarks, chip and ONNX descriptor
            "mean_ms_per_photo": round(float(total.mean()) * 1000, 2),
            "faces_found": found,
            "faces_expected": expected_total,
            "faces_missed": missed,
            "faces_extra": extra,
            "photos_exact": exact,
        })
    return rows


def measure(config: Config) -> dict[str, object]:
    encoder = Encoder(EncoderSettings())
    return {
        "default": {k: v for k, v in EncoderSettings().as_dict().items() if k in ("max_side", "upsample", "detector")},
        "descriptor_engines": descriptor_engines(encoder, config.descriptor_repeats, config.descriptor_warmup),
        "detection_grid": detection_grid(config, Encoder(EncoderSettings(detector="hog"))),  # HOG's sizes x upsample
        "grid_note": "one pass over the 19 dev gallery photos per combination; spread is across photos "
        "(of different sizes), not repeats. 'full' size equals 1600 here: the dev photos are at most 1600 px.",
    }
