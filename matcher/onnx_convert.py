"""Convert dlib's face descriptor ResNet (``dlib_face_recognition_resnet_model_v1.dat``) to ONNX.

dlib computes a face descriptor in roughly 70-90 ms a face on a CPU.  The same network, read from
the same ``.dat`` file and run by ONNX Runtime, gives the same descriptors (differences of the order
of 1e-7) in a few milliseconds.  This module is the converter:

* :func:`parse_dlib_resnet` reads dlib's serialization of the network (the whole file, to the last
  byte) into a typed, bottom-up list of layers, and checks it against the architecture of
  ``examples/dnn_face_recognition_ex.cpp`` in dlib (the file format does not record which tag a
  ``tag``/``skip`` wrapper refers to, so the layout has to be known);
* :func:`build_onnx_model` turns that list into an ONNX graph that takes a batch of 150x150 RGB
  ``uint8`` face chips (``(N, 150, 150, 3)``, as returned by ``dlib.get_face_chip``) and returns
  ``(N, 128)`` float32 descriptors; dlib's input normalization is part of the graph;
* :func:`converted_model_path` converts once and caches the result on disk, keyed by the sha256 of
  the ``.dat`` file, with the sha256 of the model's bytes beside it (``<model>.onnx.sha256``, checked at
  every load: a model that does not match is converted again, never used), in the folder the caller
  names (default ``matcher.defaults.CACHE_DIR``, ``~/.cache/fsw``; the CLI, the worker and ``main`` here
  read ``$FSW_CACHE_DIR``).

Run ``python -m matcher.onnx_convert`` to convert (if needed) and print the cached model's path.
No converted model is shipped: it is always derived from the installed ``.dat`` file.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import pathlib
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from matcher import layout, models
from matcher.defaults import CACHE_DIR

__all__ = [
    "CONVERTER_VERSION",
    "ModelFormatError",
    "DlibNetwork",
    "build_onnx_model",
    "convert",
    "converted_model_bytes",
    "converted_model_path",
    "default_dat_path",
    "model_sha256",
    "parse_dlib_resnet",
]

#: Bumped whenever the produced graph changes; stored in the model's metadata so that an older
#: cached conversion of the same .dat file is redone rather than reused.
CONVERTER_VERSION = "1"

INPUT_NAME = "chips"
OUTPUT_NAME = "descriptors"
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; readable by every onnxruntime >= 1.13

_MAX_NAME_LEN = 64


class ModelFormatError(ValueError):
    """The .dat file is truncated, altered, or not dlib's face recognition ResNet."""


# ------------------------------------------------------------------------------------------------
# Typed layers (bottom-up order: input first)


@dataclass(eq=False)
class InputRGB:
    mean_rgb: tuple[float, float, float]
    rows: int
    cols: int
    offset: int = 0


@dataclass(eq=False)
class Conv:
    weight: np.ndarray  # (out_channels, in_channels, kernel_rows, kernel_cols), row-major
    bias: np.ndarray  # (out_channels,)
    stride: tuple[int, int]  # (y, x)
    padding: tuple[int, int]  # (y, x)
    offset: int = 0

    @property
    def num_filters(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])


@dataclass(eq=False)
class Affine:
    gamma: np.ndarray  # (C,) in conv mode
    beta: np.ndarray
    conv_mode: bool
    offset: int = 0


@dataclass(eq=False)
class Relu:
    offset: int = 0


@dataclass(eq=False)
class Pool:
    kind: str  # "max" or "avg"
    window: tuple[int, int]  # (rows, cols); (0, 0) = the whole input ("pool everything")
    stride: tuple[int, int]
    padding: tuple[int, int]
    offset: int = 0


@dataclass(eq=False)
class AddPrev:
    tag: int = 0  # resolved from the known architecture (the file does not record it)
    offset: int = 0


@dataclass(eq=False)
class FullyConnected:
    weight: np.ndarray  # (num_inputs, num_outputs): y = x @ weight (+ bias)
    bias: np.ndarray | None
    offset: int = 0


@dataclass(eq=False)
class Marker:
    """A tag or skip wrapper: the file only says 'version 1, then the subnetwork'."""

    offset: int = 0


@dataclass(eq=False)
class Tag:
    id: int
    offset: int = 0


@dataclass(eq=False)
class Skip:
    id: int
    offset: int = 0


@dataclass(eq=False)
class LossMetric:
    margin: float
    distance_threshold: float
    offset: int = 0


Layer = InputRGB | Conv | Affine | Relu | Pool | AddPrev | FullyConnected | Tag | Skip


@dataclass(eq=False)
class DlibNetwork:
    """The parsed network: ``layers`` bottom-up, starting with the input layer."""

    layers: list[Layer]
    loss: LossMetric
    source: str = ""
    sha256: str = ""
    file_size: int = 0
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def input(self) -> InputRGB:
        first = self.layers[0]
        assert isinstance(first, InputRGB)
        return first


# ------------------------------------------------------------------------------------------------
# dlib's serialization primitives


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.source = source

    def error(self, message: str, at: int | None = None) -> ModelFormatError:
        where = self.pos if at is None else at
        return ModelFormatError(f"dlib model file {self.source}: {message} at byte {where}")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise ModelFormatError(
                f"dlib model file {self.source} is truncated at byte {len(self.data)} "
                f"(expected {what} at byte {self.pos})"
            )

    def _int_at(self, pos: int) -> tuple[int, int]:
        """Decode dlib's integer format at pos; returns (value, next position)."""
        if pos >= len(self.data):
            raise ModelFormatError(
                f"dlib model file {self.source} is truncated at byte {len(self.data)} "
                f"(expected an integer at byte {pos})"
            )
        control = self.data[pos]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self.error(f"invalid integer control byte 0x{control:02x}", pos)
        if pos + 1 + size > len(self.data):
            raise ModelFormatError(
                f"dlib model file {self.source} is truncated at byte {len(self.data)} "
                f"(expected a {size}-byte integer at byte {pos})"
            )
        value = int.from_bytes(self.data[pos + 1 : pos + 1 + size], "little")
        if control & 0x80:
            value = -value
        return value, pos + 1 + size

    def int(self, what: str = "integer", lo: int | None = None, hi: int | None = None) -> int:
        start = self.pos
        value, self.pos = self._int_at(self.pos)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(f"implausible {what} {value}", start)
        return value

    def float(self) -> float:
        start = self.pos
        self._need(1, "a floating point number")
        if self.data[self.pos] & 0x70:
            raise self.error("unsupported (pre-2016 ASCII) floating point encoding", start)
        mantissa = self.int("float mantissa")
        exponent = self.int("float exponent", -(2**15), 2**15 - 1)
        if exponent == 32000:
            return math.inf
        if exponent == 32001:
            return -math.inf
        if exponent == 32002:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        self._need(1, "a bool ('0' or '1')")
        ch = self.data[self.pos]
        if ch not in (0x30, 0x31):
            raise self.error(f"invalid bool byte 0x{ch:02x}")
        self.pos += 1
        return ch == 0x31

    def peek_name(self) -> str | None:
        """The identifier-like string starting here, if there is one (without consuming it)."""
        try:
            length, start = self._int_at(self.pos)
        except ModelFormatError:
            return None
        if not 1 <= length <= _MAX_NAME_LEN or start + length > len(self.data):
            return None
        raw = bytes(self.data[start : start + length])
        if not all(0x21 <= b < 0x7F for b in raw) or not raw[:1].isalpha():
            return None
        return raw.decode("ascii")

    def string(self, what: str = "a layer name") -> str:
        start = self.pos
        length = self.int("string length", 0, _MAX_NAME_LEN)
        self._need(length, what)
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"non-ASCII bytes in {what} {raw!r}", start) from None

    def tensor_dims(self, version: int, what: str) -> tuple[int, int, int, int]:
        start = self.pos
        found = self.int(f"{what} version")
        if found != version:
            raise self.error(f"unexpected {what} version {found} (expected {version})", start)
        dims = tuple(self.int(f"{what} dimension", 0, 1 << 31) for _ in range(4))
        return dims  # type: ignore[return-value]

    def tensor(self) -> np.ndarray:
        dims = self.tensor_dims(2, "tensor")
        count = math.prod(dims)
        self._need(4 * count, f"a tensor of {count} floats")
        array = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos += 4 * count
        return array.astype(np.float32).reshape(dims)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        return self.tensor_dims(1, "alias tensor")


# ------------------------------------------------------------------------------------------------
# Layer details


def _read_con(r: _Reader, offset: int) -> Conv:
    params = r.tensor().reshape(-1)
    num_filters = r.int("num_filters", 1, 1 << 20)
    nr = r.int("filter rows", 1, 1024)
    nc = r.int("filter cols", 1, 1024)
    stride_y = r.int("stride", 1, 1024)
    stride_x = r.int("stride", 1, 1024)
    pad_y = r.int("padding", 0, 1024)
    pad_x = r.int("padding", 0, 1024)
    at = r.pos
    filters = r.alias_tensor()
    biases = r.alias_tensor()
    for _ in range(4):  # learning rate and weight decay multipliers (training only)
        r.float()
    if filters[0] != num_filters or filters[2:] != (nr, nc) or biases != (1, num_filters, 1, 1):
        raise r.error(f"inconsistent con_ shapes {filters} / {biases}", at)
    n_weights = math.prod(filters)
    if params.size != n_weights + num_filters:
        raise r.error(f"con_ holds {params.size} parameters, expected {n_weights + num_filters}", at)
    weight = params[:n_weights].reshape(filters)
    bias = params[n_weights:].copy()
    return Conv(weight.copy(), bias, (stride_y, stride_x), (pad_y, pad_x), offset)


def _read_affine(r: _Reader, offset: int) -> Affine:
    params = r.tensor().reshape(-1)
    at = r.pos
    gamma = r.alias_tensor()
    beta = r.alias_tensor()
    mode = r.int("affine mode", 0, 1)
    n = math.prod(gamma)
    if gamma != beta or params.size != 2 * n:
        raise r.error(f"inconsistent affine_ shapes {gamma} / {beta} for {params.size} parameters", at)
    conv_mode = mode == 0
    if conv_mode and gamma[2:] != (1, 1):
        raise r.error(f"affine_ in conv mode with per-pixel shape {gamma}", at)
    return Affine(params[:n].copy(), params[n:].copy(), conv_mode, offset)


def _read_pool(r: _Reader, offset: int, kind: str) -> Pool:
    nr = r.int("pool rows", 0, 1 << 20)
    nc = r.int("pool cols", 0, 1 << 20)
    stride_y = r.int("stride", 1, 1024)
    stride_x = r.int("stride", 1, 1024)
    pad_y = r.int("padding", 0, 1024)
    pad_x = r.int("padding", 0, 1024)
    return Pool(kind, (nr, nc), (stride_y, stride_x), (pad_y, pad_x), offset)


def _read_fc(r: _Reader, offset: int) -> FullyConnected:
    num_outputs = r.int("fc outputs", 1, 1 << 20)
    num_inputs = r.int("fc inputs", 1, 1 << 24)
    params = r.tensor().reshape(-1)
    at = r.pos
    weights = r.alias_tensor()
    biases = r.alias_tensor()
    bias_mode = r.int("fc bias mode", 0, 1)
    for _ in range(4):
        r.float()
    if weights != (num_inputs, num_outputs, 1, 1):
        raise r.error(f"inconsistent fc_ weight shape {weights}", at)
    n = num_inputs * num_outputs
    has_bias = bias_mode == 0
    expected = n + (num_outputs if has_bias else 0)
    if params.size != expected:
        raise r.error(f"fc_ holds {params.size} parameters, expected {expected}", at)
    if has_bias and biases != (1, num_outputs, 1, 1):
        raise r.error(f"inconsistent fc_ bias shape {biases}", at)
    weight = params[:n].reshape(num_inputs, num_outputs).copy()
    bias = params[n:].copy() if has_bias else None
    return FullyConnected(weight, bias, offset)


def _read_details(r: _Reader) -> Layer:
    offset = r.pos
    name = r.string()
    if name == "con_4":
        return _read_con(r, offset)
    if name == "affine_":
        return _read_affine(r, offset)
    if name == "relu_":
        return Relu(offset)
    if name == "max_pool_2":
        return _read_pool(r, offset, "max")
    if name == "avg_pool_2":
        return _read_pool(r, offset, "avg")
    if name == "add_prev_":
        return AddPrev(0, offset)
    if name == "fc_2":
        return _read_fc(r, offset)
    raise r.error(f"unexpected layer {name!r}", offset)


def _read_input(r: _Reader) -> InputRGB:
    offset = r.pos
    name = r.string()
    if name != "input_rgb_image_sized":
        raise r.error(f"unexpected layer {name!r} (expected the input layer 'input_rgb_image_sized')", offset)
    mean = (r.float(), r.float(), r.float())
    rows = r.int("input rows", 1, 1 << 16)
    cols = r.int("input cols", 1, 1 << 16)
    if not all(math.isfinite(m) for m in mean):
        raise r.error(f"non-finite input means {mean}", offset)
    return InputRGB(mean, rows, cols, offset)


def _read_network(data: bytes, source: str) -> tuple[LossMetric, list[Layer | Marker]]:
    r = _Reader(data, source)
    version = r.int("loss layer version")
    if version != 1:
        raise r.error(f"unexpected add_loss_layer version {version} (expected 1)", 0)
    offset = r.pos
    name = r.string()
    if name != "loss_metric_2":
        raise r.error(f"unexpected layer {name!r} (expected the loss layer 'loss_metric_2')", offset)
    loss = LossMetric(r.float(), r.float(), offset)

    # Each wrapper writes its version, then its subnetwork, then (add_layer only) its own layer:
    # the file starts with the versions of all wrappers, outermost first, down to the input layer.
    wrappers: list[tuple[int, int]] = []  # (version, byte offset)
    while True:
        name_here = r.peek_name()
        if name_here is not None and name_here.startswith("input"):
            break
        at = r.pos
        version = r.int("layer wrapper version")
        if version not in (1, 2, 3):
            if 0 < version <= _MAX_NAME_LEN and r.pos + version > len(r.data):
                raise ModelFormatError(
                    f"dlib model file {source} is truncated at byte {len(r.data)} "
                    f"(expected a layer name of {version} bytes at byte {r.pos})"
                )
            if name_here is not None:
                raise r.error(f"unexpected layer {name_here!r}", at)
            raise r.error(f"unexpected layer wrapper version {version}", at)
        wrappers.append((version, at))
        if len(wrappers) > 100_000:
            raise r.error("implausibly deep network", at)
    if not wrappers or wrappers[-1][0] not in (2, 3):
        raise r.error("the input layer is not wrapped by an add_layer")
    for version, at in wrappers[:-1]:
        if version == 3:
            raise r.error("unexpected layer wrapper version 3 above the bottom layer", at)

    layers: list[Layer | Marker] = [_read_input(r)]
    bottom_version = wrappers[-1][0]
    for i in range(len(wrappers) - 1, -1, -1):
        version, at = wrappers[i]
        if version == 1:  # add_tag_layer / add_skip_layer: nothing after the subnetwork
            layers.append(Marker(at))
            continue
        layers.append(_read_details(r))
        for _ in range(3):  # setup called, gradient stale, output getters disabled
            r.bool()
        r.tensor()  # x_grad
        r.tensor()  # cached_output
        r.tensor()  # params_grad (grad_final for the bottom layer)
        if i == len(wrappers) - 1 and bottom_version == 3:
            r.int("sample expansion factor", 0, 1 << 20)
    if r.pos != len(r.data):
        raise r.error(f"trailing bytes after the network ({len(r.data) - r.pos} bytes)")
    return loss, layers


# ------------------------------------------------------------------------------------------------
# The architecture of dlib's face ResNet (examples/dnn_face_recognition_ex.cpp), bottom-up


def _expected_layers() -> list[tuple]:
    def block(n: int, stride: int) -> list[tuple]:
        return [("con", n, 3, stride), ("affine",), ("relu",), ("con", n, 3, 1), ("affine",)]

    def ares(n: int) -> list[tuple]:
        return [("tag", 1), *block(n, 1), ("add_prev", 1), ("relu",)]

    def ares_down(n: int) -> list[tuple]:
        shortcut = [("tag", 2), ("skip", 1), ("avg_pool", 2, 2)]
        return [("tag", 1), *block(n, 2), *shortcut, ("add_prev", 2), ("relu",)]

    spec: list[tuple] = [("con", 32, 7, 2), ("affine",), ("relu",), ("max_pool", 3, 2)]
    spec += ares(32) * 3
    spec += ares_down(64) + ares(64) * 3
    spec += ares_down(128) + ares(128) * 2
    spec += ares_down(256) + ares(256) * 2
    spec += ares_down(256)
    spec += [("avg_pool", 0, 1), ("fc", 128, False)]
    return spec


def _describe(layer: Layer | Marker) -> str:
    if isinstance(layer, Conv):
        return f"con (filters={layer.num_filters}, kernel={layer.kernel}, stride={layer.stride})"
    if isinstance(layer, Pool):
        return f"{layer.kind}_pool (window={layer.window}, stride={layer.stride})"
    if isinstance(layer, FullyConnected):
        return f"fc (outputs={layer.weight.shape[1]}, bias={layer.bias is not None})"
    if isinstance(layer, Marker):
        return "tag/skip"
    return type(layer).__name__.lower()


def _resolve(raw: list[Layer | Marker], source: str) -> list[Layer]:
    spec = _expected_layers()
    body = raw[1:]
    if len(body) != len(spec):
        raise ModelFormatError(
            f"dlib model file {source} does not hold dlib's face ResNet: "
            f"{len(body)} layers, expected {len(spec)}"
        )
    out: list[Layer] = [raw[0]]  # type: ignore[list-item]
    for index, (layer, want) in enumerate(zip(body, spec, strict=True), start=1):
        kind = want[0]
        ok = False
        resolved: Layer | None = None
        if kind in ("tag", "skip") and isinstance(layer, Marker):
            ok, resolved = True, (Tag if kind == "tag" else Skip)(want[1], layer.offset)
        elif kind == "con" and isinstance(layer, Conv):
            n, k, s = want[1:]
            default_pad = 0 if s != 1 else k // 2  # dlib's con_ default padding
            ok = (
                layer.num_filters == n
                and layer.kernel == (k, k)
                and layer.stride == (s, s)
                and layer.padding == (default_pad, default_pad)
            )
        elif kind == "affine" and isinstance(layer, Affine):
            ok = layer.conv_mode
        elif kind == "relu" and isinstance(layer, Relu):
            ok = True
        elif kind in ("max_pool", "avg_pool") and isinstance(layer, Pool):
            k, s = want[1:]
            default_pad = 0 if s != 1 else k // 2  # dlib's pooling default padding
            ok = (
                layer.kind == kind[:3]
                and layer.window == (k, k)
                and layer.stride == (s, s)
                and layer.padding == (default_pad, default_pad)
            )
        elif kind == "add_prev" and isinstance(layer, AddPrev):
            ok, resolved = True, AddPrev(want[1], layer.offset)
        elif kind == "fc" and isinstance(layer, FullyConnected):
            ok = layer.weight.shape[1] == want[1] and (layer.bias is not None) == want[2]
        if not ok:
            raise ModelFormatError(
                f"dlib model file {source} does not hold dlib's face ResNet: layer {index} "
                f"(byte {layer.offset}) is {_describe(layer)}, expected {want}"
            )
        out.append(resolved if resolved is not None else layer)  # type: ignore[arg-type]
    return out


def parse_dlib_resnet(dat_path: str | os.PathLike[str] | None = None) -> DlibNetwork:
    """Read the whole .dat file into a :class:`DlibNetwork`; raise :class:`ModelFormatError`."""
    path = pathlib.Path(dat_path) if dat_path is not None else pathlib.Path(default_dat_path())
    data = path.read_bytes()
    loss, raw = _read_network(data, str(path))
    layers = _resolve(raw, str(path))
    return DlibNetwork(
        layers=layers,
        loss=loss,
        source=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        file_size=len(data),
    )


# ------------------------------------------------------------------------------------------------
# ONNX graph


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str | None = None, **attrs: object) -> str:
        out = self.name(prefix or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _pool_size(size: int, window: int, stride: int, pad: int) -> int:
    return 1 + (size + 2 * pad - window) // stride  # dlib's (and ONNX's floor-mode) output size


def build_onnx_model(net: DlibNetwork) -> onnx.ModelProto:
    """The ONNX graph of ``net``: uint8 chips (N, rows, cols, 3) RGB -> float32 descriptors (N, D)."""
    inp = net.input
    g = _GraphBuilder()
    x = g.op("Cast", [INPUT_NAME], "input_float", to=TensorProto.FLOAT)
    x = g.op("Transpose", [x], "input_nchw", perm=[0, 3, 1, 2])
    mean = np.array(inp.mean_rgb, dtype=np.float32).reshape(1, 3, 1, 1)
    x = g.op("Sub", [x, g.const("input_mean", mean)])
    # dlib divides by 256; multiplying by 2**-8 is exact in float32.
    x = g.op("Mul", [x, g.const("input_scale", np.array(1.0 / 256.0, dtype=np.float32))])
    shape = (3, inp.rows, inp.cols)  # (C, H, W) of x, batch excluded
    tags: dict[int, tuple[str, tuple[int, int, int]]] = {}

    for layer in net.layers[1:]:
        if isinstance(layer, Conv):
            c, h, w = shape
            if layer.weight.shape[1] != c:
                raise ModelFormatError(
                    f"con_ at byte {layer.offset} expects {layer.weight.shape[1]} channels, gets {c}"
                )
            (kh, kw), (sy, sx), (py, px) = layer.kernel, layer.stride, layer.padding
            x = g.op(
                "Conv",
                [x, g.const("conv_w", layer.weight), g.const("conv_b", layer.bias)],
                kernel_shape=[kh, kw],
                strides=[sy, sx],
                pads=[py, px, py, px],
            )
            shape = (layer.num_filters, _pool_size(h, kh, sy, py), _pool_size(w, kw, sx, px))
        elif isinstance(layer, Affine):
            c = shape[0]
            if layer.gamma.size != c:
                raise ModelFormatError(
                    f"affine_ at byte {layer.offset} has {layer.gamma.size} channels, gets {c}"
                )
            x = g.op("Mul", [x, g.const("affine_gamma", layer.gamma.reshape(1, c, 1, 1))])
            x = g.op("Add", [x, g.const("affine_beta", layer.beta.reshape(1, c, 1, 1))])
        elif isinstance(layer, Relu):
            x = g.op("Relu", [x])
        elif isinstance(layer, Pool):
            c, h, w = shape
            if layer.window == (0, 0):
                x = g.op("GlobalMaxPool" if layer.kind == "max" else "GlobalAveragePool", [x])
                shape = (c, 1, 1)
            else:
                (kh, kw), (sy, sx), (py, px) = layer.window, layer.stride, layer.padding
                if layer.kind == "avg" and (py or px):
                    raise ModelFormatError(f"avg_pool_ at byte {layer.offset}: padding is not supported")
                x = g.op(
                    "MaxPool" if layer.kind == "max" else "AveragePool",
                    [x],
                    kernel_shape=[kh, kw],
                    strides=[sy, sx],
                    pads=[py, px, py, px],
                )
                shape = (c, _pool_size(h, kh, sy, py), _pool_size(w, kw, sx, px))
        elif isinstance(layer, Tag):
            tags[layer.id] = (x, shape)
        elif isinstance(layer, Skip):
            x, shape = tags[layer.id]
        elif isinstance(layer, AddPrev):
            other, other_shape = tags[layer.tag]
            # dlib's add_prev: the output has the larger size in every dimension and the smaller
            # input counts as zero where it has no element (zero padding at the end).
            out_shape = tuple(max(a, b) for a, b in zip(shape, other_shape, strict=True))
            operands = []
            for name, sh in ((x, shape), (other, other_shape)):
                if sh != out_shape:
                    pads = [0, 0, 0, 0, 0] + [o - s for o, s in zip(out_shape, sh, strict=True)]
                    pads_name = g.const("pads", np.array(pads, dtype=np.int64))
                    name = g.op("Pad", [name, pads_name], mode="constant")
                operands.append(name)
            x = g.op("Add", operands, "add_prev")
            shape = out_shape  # type: ignore[assignment]
        elif isinstance(layer, FullyConnected):
            n_in = math.prod(shape)
            if layer.weight.shape[0] != n_in:
                raise ModelFormatError(
                    f"fc_ at byte {layer.offset} expects {layer.weight.shape[0]} inputs, gets {n_in}"
                )
            x = g.op("Flatten", [x], axis=1)
            x = g.op("MatMul", [x, g.const("fc_w", layer.weight)])
            if layer.bias is not None:
                x = g.op("Add", [x, g.const("fc_b", layer.bias)])
            shape = (int(layer.weight.shape[1]),)  # type: ignore[assignment]
        else:  # pragma: no cover - _resolve only yields the types above
            raise ModelFormatError(f"unsupported layer {layer!r}")

    if len(shape) != 1:
        raise ModelFormatError("the network does not end with a fully connected layer")
    g.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name="output"))
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", inp.rows, inp.cols, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", shape[0]])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="fsw.matcher.onnx_convert",
        producer_version=CONVERTER_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=(
            "dlib's face descriptor ResNet converted from a dlib .dat file. Input: uint8 RGB face "
            "chips (N, rows, cols, 3) from dlib.get_face_chip; output: float32 descriptors."
        ),
    )
    model.ir_version = IR_VERSION
    meta = {
        "fsw_converter_version": CONVERTER_VERSION,
        "fsw_source_sha256": net.sha256,
        "fsw_source_name": pathlib.Path(net.source).name,
        "fsw_input_mean_rgb": ",".join(repr(m) for m in inp.mean_rgb),
        "fsw_loss_distance_threshold": repr(net.loss.distance_threshold),
    }
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


# ------------------------------------------------------------------------------------------------
# Hashing and the on-disk cache


def default_dat_path() -> str:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` from ``face_recognition_models``."""
    return models.descriptor_model_path()


_convert_lock = threading.Lock()
_log = logging.getLogger(__name__)


def _resolve_dat(dat_path: str | os.PathLike[str] | None) -> pathlib.Path:
    path = pathlib.Path(dat_path) if dat_path is not None else pathlib.Path(default_dat_path())
    return path.resolve()


def model_sha256(dat_path: str | None = None) -> str:
    """sha256 (hex) of the .dat file; memoized per (path, mtime, size) in this process."""
    return models.model_sha256(str(_resolve_dat(dat_path)))


def _cached_path(sha: str, cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    folder = pathlib.Path(cache_dir if cache_dir else CACHE_DIR).expanduser()
    return folder / f"dlib_resnet_{sha[:16]}.onnx"


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    """Where the sha256 of the cached model's bytes is recorded at conversion."""
    return path.with_name(path.name + ".sha256")


def _verified_bytes(path: pathlib.Path, sha: str) -> bytes | None:
    """The cached model's bytes when they are the ones recorded at its conversion (their sha256 in the
    sidecar) and it converts this .dat with this converter; None when anything differs: convert again.

    The metadata alone is not enough: a model with altered weights and the metadata kept is a valid
    network that gives wrong descriptors (issue 12). The bytes checked are the bytes the engine loads.
    """
    try:
        data = path.read_bytes()
        recorded = _sidecar(path).read_text().strip()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != recorded:
        if path.exists():
            _log.warning("cached model %s does not match the hash recorded at its conversion: converting again", path)
        return None
    try:
        meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    except Exception:  # a recorded but unreadable file: convert again
        return None
    if meta.get("fsw_source_sha256") != sha or meta.get("fsw_converter_version") != CONVERTER_VERSION:
        return None
    return data


def convert(dat_path: str | os.PathLike[str] | None = None) -> onnx.ModelProto:
    """Parse the .dat file and build the ONNX model in memory (no caching)."""
    return build_onnx_model(parse_dlib_resnet(dat_path))


def converted_model_path(
    dat_path: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """The cached ONNX conversion of the .dat file, converting it first if needed (or if the cached file
    is not byte for byte what was converted).

    cache_dir: the folder of converted models (None: ``matcher.defaults.CACHE_DIR``). A caller that loads
    the model should use :func:`converted_model_bytes`: the file could change between check and load.
    """
    return _converted(dat_path, cache_dir)[0]


def converted_model_bytes(
    dat_path: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[pathlib.Path, bytes]:
    """The cached model's path and its bytes, checked against the hash recorded at its conversion."""
    return _converted(dat_path, cache_dir)


def _converted(dat_path: str | None, cache_dir: str | os.PathLike[str] | None) -> tuple[pathlib.Path, bytes]:
    source = _resolve_dat(dat_path)
    sha = model_sha256(str(source))
    target = _cached_path(sha, cache_dir)
    with _convert_lock:
        data = _verified_bytes(target, sha)
        if data is not None:
            return target, data
        net = parse_dlib_resnet(source)
        if net.sha256 != sha:  # the file changed while we were looking at it
            raise ModelFormatError(f"dlib model file {source} changed during conversion")
        data = build_onnx_model(net).SerializeToString()
        target.parent.mkdir(mode=layout.PRIVATE_FOLDER, parents=True, exist_ok=True)
        # the model first, then its hash: a crash between the two leaves a mismatch, converted again
        layout.atomic_write(target, data)  # 0600 (layout.file_mode)
        layout.atomic_write(_sidecar(target), hashlib.sha256(data).hexdigest() + "\n")
    return target, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matcher.onnx_convert",
        description="Convert dlib's face ResNet .dat to ONNX (cached) and print the cached path.",
    )
    parser.add_argument(
        "dat", nargs="?", default=None, help="the .dat file (default: the one in face_recognition_models)"
    )
    args = parser.parse_args(argv)
    try:
        path = converted_model_path(args.dat, os.environ.get("FSW_CACHE_DIR") or None)  # the edge reads the env
    except (ModelFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
