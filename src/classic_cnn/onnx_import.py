"""ONNX import: a classic CNN trained elsewhere (PyTorch, Keras, this engine) as a ``Sequential``.

The mirror of :mod:`classic_cnn.export`. The graph must be a *chain*: one input, one output, and
every operator takes the previous one's output plus constants (initializers or ``Constant``
nodes). Operator by operator:

=====================================  ===========================================================
ONNX                                   layer
=====================================  ===========================================================
``Conv`` (groups 1, dilations 1)       Conv2D; the kernel C_out×C_in×KH×KW becomes
                                       KH×KW×C_in×C_out; pads equal on every side, or Keras's
                                       'same' (``SAME_UPPER`` or the explicit pads it means)
``MaxPool``, ``AveragePool``           MaxPool2D, AvgPool2D (no padding, same stride both ways)
``GlobalAveragePool``, ``ReduceMean``  AvgPool2D over the whole feature map (ReduceMean over
over H and W                           H and W is how PyTorch exports ``AdaptiveAvgPool2d(1)``)
``Gemm``, ``MatMul`` (+ ``Add``)       Dense (alpha, beta and transB folded into the weights)
``BatchNormalization``                 BatchNorm with the running statistics
``Relu`` ``LeakyRelu`` ``Elu``         ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Softmax
``Sigmoid`` ``Tanh`` ``Softmax``
``Flatten`` / ``Reshape`` to 2-D       Flatten
``Dropout``                            Dropout (the ratio kept for fine-tuning)
``Identity``                           nothing
``Transpose`` NHWC↔NCHW                nothing: it only says which order the next operator sees
=====================================  ===========================================================

Layouts: ONNX's convolutions work on N×C×H×W, this engine on N×H×W×C. The importer keeps every
feature map channels-last and only tracks the order the ONNX graph *would* have the tensor in
(a ``Transpose`` flips it). Where that order matters it converts: a ``Flatten`` of an N×C×H×W
tensor lists the features as C·H·W while this engine's Flatten lists H·W·C, so the rows of the
dense layer after it are permuted to match (and the per-feature statistics of a batch norm in
between). A graph whose input is N×H×W×C (a Keras export, or this engine's own with
``layout="NHWC"``) starts with a ``Transpose`` to N×C×H×W, which is recognised.

A trailing ``Softmax`` over the classes is dropped: models here end in logits and
:meth:`~classic_cnn.model.Sequential.predict_proba` applies the softmax, so the probabilities are
the same. Anything else (a residual ``Add``, a ``Concat``, a branch, a cycle, an operator not
listed, an attribute this engine cannot honour) raises :class:`OnnxImportError` naming the
operator and the node, rather than building a model that computes something else.

Files are read without executing anything and without the ``onnx`` package's external-data
loader: external tensors are read here, only from regular files inside the model's own folder,
after their declared size has been checked against the bytes present.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .layers import (
    ELU,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Softmax,
    Tanh,
)

#: the largest tensor the importer will decode (elements): a classic CNN's largest weight is far
#: smaller; a file declaring more is refused before anything is allocated
MAX_ELEMENTS = 1 << 28
#: the largest image side the importer accepts for the graph's input
MAX_SIDE = 1 << 14
#: the largest feature map of one image (elements) an imported model may make: 224×224×64, a
#: large classic CNN's, is 3.2 million; a tiny hostile file could otherwise ask for terabytes
MAX_MAP_ELEMENTS = 1 << 25
#: the largest ONNX file read into memory (protobuf itself stops at 2 GiB)
MAX_FILE_BYTES = 1 << 31

SUPPORTED_OPS = (
    "Conv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Gemm",
    "MatMul",
    "Relu",
    "LeakyRelu",
    "Elu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Dropout",
    "Identity",
    "Transpose",
)

# ONNX TensorProto data types the importer decodes: float32, float64, float16, int64, int32
_DTYPES = {1: np.float32, 11: np.float64, 10: np.float16, 7: np.int64, 6: np.int32}
_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class OnnxImportError(ValueError):
    """An ONNX file that cannot be imported as a classic CNN; the message says why, in one line
    (names and values from a hostile file may hold line breaks: they are flattened)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _need_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            f"ONNX import needs the 'onnx' extra ({exc.name or 'onnx'} is missing): "
            "pip install 'classic-cnn[onnx]'"
        ) from None
    return onnx


# --------------------------------------------------------------------------------------------
# Reading the file and its tensors
# --------------------------------------------------------------------------------------------


def read_onnx(path) -> tuple[object, Path]:
    """Parse the ``ModelProto`` in ``path`` (no external data loaded); returns it and the
    model's folder, against which external data is resolved."""
    onnx = _need_onnx()
    path = Path(path)
    if not path.is_file():
        raise OnnxImportError(f"{path}: no such ONNX file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise OnnxImportError(f"{path}: {size:,} bytes, more than an ONNX protobuf can hold")
    return parse_onnx(path.read_bytes(), str(path), onnx), path.resolve().parent


def parse_onnx(data: bytes, label: str = "the ONNX data", onnx=None):
    """A ``ModelProto`` from bytes, or :class:`OnnxImportError`."""
    onnx = onnx or _need_onnx()
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OnnxImportError(
            f"{label}: not an ONNX model (the protobuf does not parse: {exc})"[:300]
        ) from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise OnnxImportError(f"{label}: not an ONNX model (no graph with nodes in it)")
    return proto


def _tensor(t, base: Path | None) -> np.ndarray:
    """Decode a TensorProto after checking its declared size against the data present."""
    name = t.name or "(unnamed)"
    dtype = _DTYPES.get(t.data_type)
    if dtype is None:
        raise OnnxImportError(
            f"tensor '{name}' has ONNX data type {t.data_type}; the importer reads float32, "
            "float64, float16, int64 and int32 tensors"
        )
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise OnnxImportError(f"tensor '{name}' declares negative dimensions {dims}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise OnnxImportError(
            f"tensor '{name}' declares {count:,} elements (dims {dims}); the importer reads at "
            f"most {MAX_ELEMENTS:,}, far more than a classic CNN's largest weight"
        )
    itemsize = np.dtype(dtype).itemsize
    if t.data_location == 1:  # EXTERNAL
        raw = _external_bytes(t, name, count * itemsize, base)
    elif t.HasField("raw_data"):
        raw = t.raw_data
    else:
        field = {1: t.float_data, 11: t.double_data, 7: t.int64_data, 6: t.int32_data}.get(
            t.data_type
        )
        if t.data_type == 10:  # float16 in int32_data, one value per element
            values = np.asarray(t.int32_data, np.int32)
            if values.size != count:
                raise OnnxImportError(f"tensor '{name}' holds {values.size} values for {dims}")
            return values.astype(np.uint16).view(np.float16).reshape(dims)
        values = np.asarray(field, dtype)
        if values.size != count:
            raise OnnxImportError(
                f"tensor '{name}' declares dims {dims} ({count:,} values) but holds {values.size:,}"
            )
        return values.reshape(dims)
    if len(raw) != count * itemsize:
        raise OnnxImportError(
            f"tensor '{name}' declares dims {dims} ({count * itemsize:,} bytes) but holds "
            f"{len(raw):,} bytes"
        )
    return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(dims)


def _external_bytes(t, name: str, expected: int, base: Path | None) -> bytes:
    """The bytes of an external tensor, read only from a regular file inside ``base``."""
    if base is None:
        raise OnnxImportError(
            f"tensor '{name}' is stored in an external file, but the model was given as bytes "
            "(import it from its path so the file can be found beside it)"
        )
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    target = os.path.realpath(os.path.join(base, location))
    base_real = os.path.realpath(base)
    if (
        not location
        or os.path.isabs(location)
        or os.path.commonpath([base_real, target]) != base_real
        or target == base_real
    ):
        raise OnnxImportError(
            f"tensor '{name}': external data location {location!r} is outside the model's "
            f"folder {base}; only files beside the model are read"
        )
    if not os.path.isfile(target):
        raise OnnxImportError(f"tensor '{name}': external data file {location!r} is missing")
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise OnnxImportError(
            f"tensor '{name}': external data offset/length are not integers: {info!r}"[:300]
        ) from None
    size = os.path.getsize(target)
    if length is None:
        length = size - offset
    if offset < 0 or length != expected or offset + length > size:
        raise OnnxImportError(
            f"tensor '{name}': external data at offset {offset} of length {length} does not "
            f"hold the {expected:,} bytes its dims declare within {location!r} ({size:,} bytes)"
        )
    with open(target, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _attrs(node) -> dict:
    """A node's attributes as plain Python values (ints, floats, strings, lists, tensors)."""
    out = {}
    for a in node.attribute:
        kind = a.type
        if kind == 1:  # float32 in the file: its shortest decimal (0.2, not 0.2000000029802)
            out[a.name] = float(str(np.float32(a.f)))
        elif kind == 2:
            out[a.name] = int(a.i)
        elif kind == 3:
            out[a.name] = a.s.decode("utf-8", "replace")
        elif kind == 4:
            out[a.name] = a.t
        elif kind == 6:
            out[a.name] = [float(v) for v in a.floats]
        elif kind == 7:
            out[a.name] = [int(v) for v in a.ints]
        else:  # graphs, tensors lists, …: nothing a classic CNN layer takes
            out[a.name] = f"<attribute of type {kind}>"
    return out


# --------------------------------------------------------------------------------------------
# The chain of operators → layers
# --------------------------------------------------------------------------------------------


class _Builder:
    """Walks the chain and collects layers with their weights (in this engine's layout)."""

    def __init__(self, graph, base: Path | None, opset: int):
        self.graph = graph
        self.base = base
        self.opset = opset
        self.consts: dict[str, np.ndarray] = {}
        self.layers: list = []
        self.weights: list[dict[str, np.ndarray]] = []
        self.names: set[str] = set()
        self.keep_names = False

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def where(node) -> str:
        return f"node '{node.name or '(unnamed)'}' ({node.op_type})"

    def fail(self, node, why: str):
        raise OnnxImportError(f"{self.where(node)}: {why}")

    def const(self, node, i: int, what: str) -> np.ndarray:
        if i >= len(node.input) or not node.input[i]:
            self.fail(node, f"its {what} (input {i}) is missing")
        name = node.input[i]
        if name not in self.consts:
            self.fail(node, f"its {what} '{name}' must be a constant (an initializer)")
        return self.consts[name]

    def add(self, layer, node, weights=None):
        # this engine's own exports keep their layer names; other exporters' node names
        # ("/features/0/Conv", "node_conv2d_1") give way to conv2d_1, relu_1, …
        name = node.name if node is not None and self.keep_names else ""
        if _NAME.match(name or "") and name not in self.names:
            layer.name = name
            self.names.add(name)
        self.layers.append(layer)
        self.weights.append(weights or {})


def _onnx_opset(proto) -> int:
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def _input_dims(graph, consts) -> tuple[str, list]:
    inputs = [v for v in graph.input if v.name not in consts]
    if len(inputs) != 1:
        raise OnnxImportError(
            f"the graph has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); "
            "a classic CNN has one, the image batch"
        )
    if len(graph.output) != 1:
        raise OnnxImportError(
            f"the graph has {len(graph.output)} outputs; a classic CNN has one, the class scores"
        )
    (value,) = inputs
    ttype = value.type.tensor_type
    if ttype.elem_type not in (1, 11):
        raise OnnxImportError(
            f"input '{value.name}' has ONNX element type {ttype.elem_type}; expected float "
            "(1) or double (11)"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
    return value.name, dims


def build_from_proto(proto, base: Path | None = None, *, input_shape=None):
    """The layers and weights of the chain in ``proto``: ``(layers, weights, input_shape,
    info)``, ``input_shape`` channels-last (H, W, C) or (D,), ``info`` the graph's input layout
    ("NCHW", "NHWC" or "ND") and whether its output is "probabilities" (a trailing softmax,
    dropped from the layers) or "logits"."""
    graph = proto.graph
    b = _Builder(graph, base, _onnx_opset(proto))
    b.keep_names = proto.producer_name == "classic-cnn"
    for t in graph.initializer:
        b.consts[t.name] = _tensor(t, base)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise OnnxImportError(
                f"{b.where(node)} is in operator domain '{node.domain}'; the importer reads the "
                "standard ONNX operators only"
            )
        if node.op_type == "Constant":
            b.consts[node.output[0]] = _constant(node, base)
    x_name, dims = _input_dims(graph, b.consts)

    # who consumes what: the chain is followed from the input, one consumer at a time
    nodes = [n for n in graph.node if n.op_type != "Constant"]
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in dict.fromkeys(n.input):  # a node reading a tensor twice is one consumer
            if name and name not in b.consts:
                consumers.setdefault(name, []).append(n)
    out_name = graph.output[0].name

    # the input's layout: N×H×W×C when the first order-sensitive operator is the Transpose an
    # NHWC export adds, N×C×H×W otherwise (ONNX's own order for images)
    at = "vector"
    if len(dims) == 4:
        at = "NCHW"
        if _first_transpose_to_nchw(x_name, consumers, b.consts):
            at = "NHWC"
    elif len(dims) != 2:
        raise OnnxImportError(
            f"input '{x_name}' has {len(dims)} dimensions {dims}; expected N×C×H×W, N×H×W×C or N×D"
        )
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    else:
        per_image = dims[1:]
        if any(d is None or d < 1 for d in per_image):
            raise OnnxImportError(
                f"input '{x_name}' has dimensions {dims}: all but the batch must be fixed "
                "numbers (give input_shape=(H, W, C) for a graph exported with free image sizes)"
            )
        if at == "NCHW":
            c, h, w = per_image
            shape = (h, w, c)
        elif at == "NHWC":
            shape = tuple(per_image)
        else:
            shape = tuple(per_image)
    if len(shape) == 3 and (max(shape[:2]) > MAX_SIDE or shape[2] > 4096):
        raise OnnxImportError(f"input '{x_name}': image shape {shape} is implausibly large")

    state = {"x": x_name, "at": at, "shape": shape, "perm": None}
    b.input_layout = at if at != "vector" else "ND"
    b.softmax_dropped = False
    visited: set[int] = set()
    steps = 0
    while state["x"] != out_name:
        steps += 1
        if steps > len(nodes) + 1:
            raise OnnxImportError("the graph has a cycle: the chain never reaches its output")
        cur = state["x"]
        users = consumers.get(cur, [])
        if not users:
            raise OnnxImportError(
                f"tensor '{cur}' is used by no node but is not the graph's output "
                f"'{out_name}': the graph is not one chain"
            )
        if len(users) > 1:
            named = ", ".join(b.where(n) for n in users[:4])
            raise OnnxImportError(
                f"tensor '{cur}' feeds {len(users)} nodes ({named}): a branch; classic-cnn "
                "imports a chain of layers only (no residual add, concat or skip connection)"
            )
        node = users[0]
        if id(node) in visited:
            raise OnnxImportError(f"the graph has a cycle through {b.where(node)}")
        visited.add(id(node))
        if node.op_type not in SUPPORTED_OPS and node.op_type != "Add":
            raise OnnxImportError(
                f"{b.where(node)}: unsupported operator '{node.op_type}'; a classic CNN is "
                f"imported from {', '.join(SUPPORTED_OPS)} (and Add as a dense bias)"
            )
        variable = [n for n in node.input if n and n not in b.consts]
        if variable != [cur]:
            raise OnnxImportError(
                f"{b.where(node)} combines tensors {variable}: a residual add, concat or "
                "other join; classic-cnn imports a chain of layers only"
            )
        if node.input[0] != cur:
            b.fail(node, f"takes '{cur}' as input {list(node.input).index(cur)}, not as its data")
        if node.op_type == "Add":
            b.fail(node, "an Add that is not the bias of a MatMul; not a classic CNN layer")
        for extra in node.output[1:]:
            if extra and (extra in consumers or extra == out_name):
                b.fail(node, f"its second output '{extra}' is used; only the first may be")
        if not node.output or not node.output[0]:
            b.fail(node, "it has no output")
        _convert(b, node, state, consumers, visited)
    leftover = [n for n in nodes if id(n) not in visited]
    if leftover:
        raise OnnxImportError(
            f"{b.where(leftover[0])} is not on the chain from input '{x_name}' to output "
            f"'{out_name}'; classic-cnn imports a chain of layers only"
        )
    if state["perm"] is not None:
        raise OnnxImportError(
            "the graph ends in features flattened in C·H·W order with no dense layer after "
            "them; this engine's Flatten lists H·W·C and cannot reorder its output"
        )
    if b.layers and isinstance(b.layers[-1], Softmax) and len(b.layers) > 1:
        if state["at"] == "vector":
            b.layers.pop()
            b.weights.pop()
            b.softmax_dropped = True
    if not b.layers:
        raise OnnxImportError("the graph holds no layer (only identities)")
    return (
        b.layers,
        b.weights,
        shape,
        {
            "input_layout": b.input_layout,
            "output": "probabilities" if b.softmax_dropped else "logits",
        },
    )


def _constant(node, base):
    a = _attrs(node)
    if "value" in a:
        return _tensor(a["value"], base)
    if "value_float" in a:
        return np.asarray(a["value_float"], np.float32)
    if "value_floats" in a:
        return np.asarray(a["value_floats"], np.float32)
    if "value_int" in a:
        return np.asarray(a["value_int"], np.int64)
    if "value_ints" in a:
        return np.asarray(a["value_ints"], np.int64)
    raise OnnxImportError(
        f"node '{node.name}' (Constant): holds {sorted(a)}; expected a numeric tensor"
    )


def _first_transpose_to_nchw(x_name, consumers, consts) -> bool:
    """Whether the first operator after the input (past identities) is Transpose 0,3,1,2."""
    cur = x_name
    for _ in range(8):
        users = consumers.get(cur, [])
        if len(users) != 1:
            return False
        node = users[0]
        if node.op_type in ("Identity", "Dropout"):
            cur = node.output[0]
            continue
        return node.op_type == "Transpose" and _attrs(node).get("perm") == _TO_NCHW
    return False


def _hw_pair(node, a: dict, key: str, default: int, b) -> tuple[int, int]:
    value = a.get(key, [default, default])
    if not isinstance(value, list) or len(value) != 2 or min(value) < 1:
        b.fail(node, f"{key}={value!r}; expected two positive ints (a 2-D operator)")
    return int(value[0]), int(value[1])


def _need_images(b, node, state, order: str = "NCHW"):
    if state["at"] == "vector":
        b.fail(node, f"it works on images, but its input is a batch of vectors {state['shape']}")
    if state["at"] != order:
        b.fail(
            node,
            f"its input is in {state['at']} order; ONNX's {node.op_type} reads {order} "
            "(a Transpose is missing or misplaced)",
        )


def _convert(b: _Builder, node, state: dict, consumers, visited) -> None:
    """Turn one node into a layer (or a change of the tracked order), advancing ``state``."""
    op, a = node.op_type, _attrs(node)
    shape = state["shape"]
    layer, weights = None, {}
    if op == "Conv":
        _need_images(b, node, state)
        w = b.const(node, 1, "kernel").astype(np.float32)
        if w.ndim != 4 or w.shape[1] != shape[2]:
            b.fail(node, f"kernel of shape {w.shape}; expected C_out×{shape[2]}×KH×KW")
        if a.get("group", 1) != 1:
            b.fail(node, f"group={a['group']}; only ordinary convolutions (group 1) are imported")
        if a.get("dilations", [1, 1]) != [1, 1]:
            b.fail(node, f"dilations={a['dilations']}; only dilation 1 is imported")
        kernel = (int(w.shape[2]), int(w.shape[3]))
        if a.get("kernel_shape", list(kernel)) != list(kernel):
            b.fail(node, f"kernel_shape={a['kernel_shape']} disagrees with the kernel {w.shape}")
        sh, sw = _hw_pair(node, a, "strides", 1, b)
        if sh != sw:
            b.fail(node, f"strides={[sh, sw]}; this engine's Conv2D moves the same in both ways")
        padding = _conv_padding(b, node, a, shape, kernel, sh)
        bias = b.const(node, 2, "bias").astype(np.float32) if len(node.input) > 2 else None
        if bias is not None and bias.shape != (w.shape[0],):
            b.fail(node, f"bias of shape {bias.shape}; expected ({w.shape[0]},)")
        layer = Conv2D(
            int(w.shape[0]), kernel, stride=sh, padding=padding, use_bias=bias is not None
        )
        weights = {"kernel": w.transpose(2, 3, 1, 0)}
        if bias is not None:
            weights["bias"] = bias
    elif op in ("MaxPool", "AveragePool"):
        _need_images(b, node, state)
        if len(node.output) > 1 and node.output[1]:
            b.fail(node, "it also outputs indices; not a classic pooling layer")
        window = _hw_pair(node, a, "kernel_shape", 0, b)
        sh, sw = _hw_pair(node, a, "strides", 1, b)
        if sh != sw:
            b.fail(node, f"strides={[sh, sw]}; this engine's pooling moves the same both ways")
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(a.get("pads", [])):
            b.fail(node, f"padding {a.get('pads') or a.get('auto_pad')}; pooling is unpadded here")
        if a.get("dilations", [1, 1]) != [1, 1] or a.get("storage_order", 0) != 0:
            b.fail(node, "dilated pooling or column-major indices are not imported")
        cls = MaxPool2D if op == "MaxPool" else AvgPool2D
        layer = cls(window, stride=sh)
        if shape[0] < window[0] or shape[1] < window[1]:
            b.fail(node, f"its {window} window is larger than the {shape[:2]} input")
        if a.get("ceil_mode", 0):
            # ceil mode only differs from floor mode when a last, partial window exists
            for size, k in zip(shape[:2], window, strict=True):
                if (size - k) % sh:
                    b.fail(node, "ceil_mode=1 adds partial windows; this engine drops them")
    elif op == "GlobalAveragePool":
        _need_images(b, node, state)
        layer = AvgPool2D((shape[0], shape[1]), stride=1)
    elif op == "ReduceMean":
        if state["at"] == "vector":
            b.fail(node, "a mean over the features of a vector; not a classic CNN layer")
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = b.const(node, 1, "axes").astype(np.int64).reshape(-1).tolist()
        axes = sorted(int(v) + 4 if int(v) < 0 else int(v) for v in (axes or []))
        spatial = [2, 3] if state["at"] == "NCHW" else [1, 2]
        if axes != spatial:
            b.fail(node, f"a mean over axes {axes}; only over H and W ({spatial} here)")
        layer = AvgPool2D((shape[0], shape[1]), stride=1)
        if not a.get("keepdims", 1):  # N×C out: the pooling, then a flatten of 1×1×C
            b.add(layer, node)
            layer.build(shape, np.random.default_rng(0), np.float32)
            shape = state["shape"] = layer.output_shape(shape)
            layer = Flatten()
            state["at"] = "vector"
    elif op in ("Gemm", "MatMul"):
        if state["at"] != "vector":
            b.fail(node, f"its input is a batch of images {shape}; flatten it first")
        w = b.const(node, 1, "weights").astype(np.float32)
        bias = None
        if op == "Gemm":
            if a.get("transA", 0):
                b.fail(node, "transA=1: the batch must be the rows of the input")
            if w.ndim != 2:
                b.fail(node, f"weights of shape {w.shape}; expected 2-D")
            if a.get("transB", 0):
                w = w.T
            w = w * np.float32(a.get("alpha", 1.0))
            if len(node.input) > 2 and node.input[2]:
                bias = b.const(node, 2, "bias").astype(np.float32) * np.float32(a.get("beta", 1.0))
        elif w.ndim != 2:
            b.fail(node, f"weights of shape {w.shape}; expected in×out")
        if w.shape[0] != shape[0]:
            b.fail(node, f"weights of shape {w.shape} for {shape[0]} input features")
        units = int(w.shape[1])
        if op == "MatMul":  # a following Add of a constant is the bias
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add":
                add = users[0]
                other = [n for n in add.input if n != node.output[0]]
                if len(other) == 1 and other[0] in b.consts:
                    bias = b.consts[other[0]].astype(np.float32)
                    visited.add(id(add))
                    state["x_after"] = add.output[0]
        if bias is not None:
            if bias.size == 1 and units != 1:
                bias = np.full(units, bias.reshape(()), np.float32)
            if bias.size != units or bias.ndim > 2:
                b.fail(node, f"bias of shape {bias.shape} for {units} outputs")
            bias = bias.reshape(units)
        if state["perm"] is not None:
            w = w[state["perm"]]  # ONNX's C·H·W feature order → this engine's H·W·C
            state["perm"] = None
        layer = Dense(units, use_bias=bias is not None)
        weights = {"kernel": np.ascontiguousarray(w)}
        if bias is not None:
            weights["bias"] = bias
    elif op == "BatchNormalization":
        if a.get("training_mode", 0):
            b.fail(node, "training_mode=1; export the model in evaluation mode")
        if state["at"] == "NHWC":
            _need_images(b, node, state)
        channels = shape[-1]
        stats = [
            b.const(node, i, what).astype(np.float32).reshape(-1)
            for i, what in enumerate(("scale", "bias", "mean", "variance"), start=1)
        ]
        if any(s.shape != (channels,) for s in stats):
            b.fail(node, f"statistics of shapes {[s.shape for s in stats]} for {channels} channels")
        if state["perm"] is not None:
            stats = [s[state["perm"]] for s in stats]
        if np.any(stats[3] < 0):
            b.fail(node, "a negative running variance")
        # ONNX's momentum is the share the *old* running value keeps
        momentum = float(str(np.float32(1.0 - float(a.get("momentum", 0.9)))))
        eps = float(a.get("epsilon", 1e-5))
        if not 0.0 <= momentum <= 1.0 or not eps > 0:
            b.fail(node, f"momentum {a.get('momentum')} / epsilon {eps} out of range")
        layer = BatchNorm(momentum=momentum, eps=eps)
        weights = dict(zip(("gamma", "beta", "running_mean", "running_var"), stats, strict=True))
    elif op in ("Relu", "Sigmoid", "Tanh"):
        layer = {"Relu": ReLU, "Sigmoid": Sigmoid, "Tanh": Tanh}[op]()
    elif op == "LeakyRelu":
        alpha = a.get("alpha", 0.01)
        if not alpha >= 0:
            b.fail(node, f"alpha={alpha}; expected a non-negative slope")
        layer = LeakyReLU(alpha)
    elif op == "Elu":
        alpha = a.get("alpha", 1.0)
        if not alpha >= 0:
            b.fail(node, f"alpha={alpha}; expected a non-negative number")
        layer = ELU(alpha)
    elif op == "Softmax":
        axis = a.get("axis", 1 if b.opset < 13 else -1)
        rank = 2 if state["at"] == "vector" else 4
        axis = axis + rank if axis < 0 else axis
        channel_axis = {"vector": 1, "NCHW": 1, "NHWC": 3}[state["at"]]
        if axis != channel_axis or (rank == 4 and b.opset < 13):
            b.fail(node, f"softmax over axis {a.get('axis')}; only over the channels/classes")
        layer = Softmax()  # a trailing one is dropped at the end: predict_proba applies it
    elif op in ("Flatten", "Reshape"):
        if op == "Flatten" and a.get("axis", 1) != 1:
            b.fail(node, f"axis={a['axis']}; only a flatten after the batch axis (axis 1)")
        if op == "Reshape":
            target = b.const(node, 1, "shape").astype(np.int64).reshape(-1).tolist()
            total = math.prod(shape)
            ok = (
                len(target) == 2
                and target[1] in (-1, total)
                and (target[0] in (0, -1) or target[0] >= 1)
                and target != [-1, -1]
                and not (target[0] == -1 and target[1] == -1)
            )
            if not ok:
                b.fail(node, f"reshape to {target}; only to (batch, {total}) is imported")
        if state["at"] != "vector":
            h, w, c = shape
            if state["at"] == "NCHW" and (h, w) != (1, 1) and c > 1:
                # ONNX lists the features as C·H·W; ours come out H·W·C
                state["perm"] = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()
            layer = Flatten()
            state["at"] = "vector"
    elif op == "Transpose":
        perm = a.get("perm")
        if state["at"] == "NHWC" and perm == _TO_NCHW:
            state["at"] = "NCHW"
        elif state["at"] == "NCHW" and perm == _TO_NHWC:
            state["at"] = "NHWC"
        elif not (state["at"] == "vector" and perm == [0, 1]):
            b.fail(node, f"perm={perm} on a {state['at']} tensor; only NHWC↔NCHW is imported")
    elif op == "Dropout":
        ratio = a.get("ratio", 0.5)
        if len(node.input) > 1 and node.input[1]:
            ratio = float(b.const(node, 1, "ratio").reshape(-1)[0])
        if len(node.input) > 2 and node.input[2] and bool(b.const(node, 2, "training_mode")):
            b.fail(node, "training_mode is on; export the model in evaluation mode")
        if not 0.0 <= ratio < 1.0:
            b.fail(node, f"ratio={ratio}; expected a probability in [0, 1)")
        layer = Dropout(ratio)
    # Identity: nothing to add
    if layer is not None:
        try:
            layer.build(shape, np.random.default_rng(0), np.float32)
            new_shape = layer.output_shape(shape)
        except ValueError as exc:
            b.fail(node, str(exc))
        for key, value in weights.items():
            want = (layer.params | layer.buffers)[key].shape
            if value.shape != want:
                b.fail(node, f"{key} of shape {value.shape}; the layer needs {want}")
        b.add(layer, node, weights)
        state["shape"] = new_shape
    state["x"] = state.pop("x_after", node.output[0])


def _conv_padding(b, node, a, shape, kernel, stride):
    """This engine's padding spec for the ONNX ``pads`` / ``auto_pad`` of a convolution."""
    from .ops import same_padding

    auto = a.get("auto_pad", "NOTSET")
    same = (
        same_padding(shape[0], kernel[0], stride),
        same_padding(shape[1], kernel[1], stride),
    )
    if auto == "VALID":
        return "valid"
    if auto == "SAME_UPPER":
        return "same"
    if auto != "NOTSET":
        b.fail(node, f"auto_pad={auto}; the odd extra padding must go bottom/right (SAME_UPPER)")
    pads = a.get("pads", [0, 0, 0, 0])
    if not isinstance(pads, list) or len(pads) != 4 or min(pads) < 0:
        b.fail(node, f"pads={pads}; expected [top, left, bottom, right] ≥ 0")
    top, left, bottom, right = pads
    if top == left == bottom == right == 0:
        return "valid"
    if ((top, bottom), (left, right)) == same:
        return "same"  # reads better than the int, and is what Keras or this engine wrote
    if top == left == bottom == right:
        return int(top)
    b.fail(
        node,
        f"pads={pads} (top, left, bottom, right): uneven padding other than Keras's 'same' "
        f"({[same[0][0], same[1][0], same[0][1], same[1][1]]} here) is not imported",
    )


# --------------------------------------------------------------------------------------------
# The model, its classes and preprocessing
# --------------------------------------------------------------------------------------------


def _metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _json(meta: dict, key: str):
    try:
        return json.loads(meta[key]) if key in meta else None
    except ValueError:
        raise OnnxImportError(f"metadata '{key}' is not JSON: {meta[key][:80]!r}") from None


def _per_channel(values, channels: int, what: str) -> tuple[float, ...]:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        values = [values]
    values = [float(v) for v in values]
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise OnnxImportError(
            f"{what} needs one value, or one per channel ({channels}). Received: {values}"
        )
    if what == "std" and min(values) <= 0:
        raise OnnxImportError(f"std must be positive. Received: {values}")
    return tuple(values)


def model_from_proto(
    proto,
    base: Path | None = None,
    *,
    classes=None,
    mean=None,
    std=None,
    background: str | None = None,
    input_shape=None,
    name: str | None = None,
):
    """The :class:`~classic_cnn.model.Sequential` of an ONNX ``ModelProto``; see
    :func:`import_onnx` for the parameters."""
    from .data.batches import Preprocessing
    from .model import Sequential

    try:
        layers, weights, shape, io_info = build_from_proto(proto, base, input_shape=input_shape)
    except OnnxImportError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as exc:
        raise OnnxImportError(f"malformed ONNX graph ({type(exc).__name__}: {exc})"[:300]) from None
    for layer in layers:  # fresh layers: the model names and builds them
        layer.input_shape = None
    meta = _metadata(proto)
    seed = 0
    if proto.producer_name == "classic-cnn":
        layers, weights, seed = _restore_dropout(layers, weights, _json(meta, "architecture"))
    ours = proto.producer_name == "classic-cnn" and _NAME.match(proto.graph.name or "")
    model_name = name or (proto.graph.name if ours else "imported")
    try:
        model = Sequential(layers, shape, seed=seed, name=model_name)
    except ValueError as exc:
        raise OnnxImportError(f"the chain does not make a model: {exc}") from None
    if model._largest_map > MAX_MAP_ELEMENTS:
        raise OnnxImportError(
            f"the model's largest feature map holds {model._largest_map:,} numbers per image; "
            f"the importer accepts at most {MAX_MAP_ELEMENTS:,} (a classic CNN's are far smaller)"
        )
    state = {}
    for layer, w in zip(model.layers, weights, strict=True):
        state |= {f"{layer.name}.{k}": v for k, v in w.items()}
    model.load_state_dict(state)

    notes = []
    n_classes = model.output_shape[-1]
    if classes is None:
        classes = _json(meta, "classes")
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(classes) != n_classes or len(model.output_shape) != 1:
            raise OnnxImportError(
                f"the model gives {n_classes} scores but {len(classes)} class names were "
                f"given: {classes[:12]}"
            )
    elif len(model.output_shape) == 1:
        classes = [str(i) for i in range(n_classes)]
        notes.append(
            f"no class names in the file or given: the {n_classes} classes are numbered 0-"
            f"{n_classes - 1} (give them with --classes FILE, one name a line)"
        )
    model.classes = classes

    if len(shape) == 3:
        h, w, c = shape
        prep = _json(meta, "preprocessing")
        if mean is not None or std is not None or prep is None:
            mean = _per_channel(0.0 if mean is None else mean, c, "mean")
            std = _per_channel(1.0 if std is None else std, c, "std")
            if prep is None and (mean == (0.0,) * c and std == (1.0,) * c):
                notes.append(
                    "no preprocessing in the file or given: inputs are taken as image / 255 "
                    "(mean 0, std 1; give the training normalisation with --mean and --std)"
                )
            prep = {
                "size": [h, w],
                "channels": c,
                "mean": list(mean),
                "std": list(std),
                "background": (prep or {}).get("background", "dark"),
            }
        if background is not None:
            prep = {**prep, "background": background}
        try:
            model.preprocessing = Preprocessing.from_dict(prep)
        except ValueError as exc:
            raise OnnxImportError(f"metadata 'preprocessing': {exc}"[:300]) from None
        if model.preprocessing.background not in ("dark", "light"):
            raise OnnxImportError(
                f"background must be 'dark' or 'light'. Received: "
                f"{model.preprocessing.background!r}"
            )
        if model.preprocessing.input_shape != tuple(shape):
            raise OnnxImportError(
                f"metadata 'preprocessing' is for {model.preprocessing.input_shape} images, "
                f"the graph takes {tuple(shape)}"
            )
    producer = f"{proto.producer_name} {proto.producer_version}".strip() or "unknown"
    dataset = _json(meta, "dataset")
    if dataset is not None and not (
        isinstance(dataset, dict) and isinstance(dataset.get("name"), str)
    ):
        raise OnnxImportError(
            f"metadata 'dataset' must be a record with a 'name'. Received: {dataset!r}"[:300]
        )
    origin = {"format": "onnx", "producer": producer, "opset": _onnx_opset(proto), **io_info}
    model.metadata = {
        "imported_from": origin,
        # how the weights were made: what a model file keeps of an imported model's history
        "hyperparameters": {"imported_from": origin},
        "dataset": dataset,
        "import_notes": notes,
    }
    for note in notes:
        warnings.warn(note, OnnxImportWarning, stacklevel=3)
    return model


def _restore_dropout(layers, weights, architecture):
    """Put back the Dropout layers (exported as Identity) and the seed that this engine's
    architecture metadata records, when its other layers are exactly the imported ones in order.
    Dropout computes nothing at inference, so the graph alone still decides every prediction;
    the layers matter for fine-tuning."""
    try:
        specs = architecture["layers"]
        kinds = [spec["class_name"] for spec in specs]
        seed = architecture.get("seed", 0)
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0
    except (TypeError, KeyError):
        return layers, weights, 0
    if [k for k in kinds if k != "Dropout"] != [type(layer).__name__ for layer in layers]:
        return layers, weights, seed
    out_layers, out_weights = [], []
    it = iter(zip(layers, weights, strict=True))
    for spec in specs:
        if spec["class_name"] == "Dropout":
            try:
                config = spec.get("config", {})
                out_layers.append(Dropout(float(config.get("rate", 0.5)), name=config.get("name")))
            except (ValueError, TypeError, AttributeError):
                return layers, weights, seed
            out_weights.append({})
        else:
            layer, w = next(it)
            out_layers.append(layer)
            out_weights.append(w)
    names = [layer.name for layer in out_layers if layer.name is not None]
    if len(names) != len(set(names)) or not all(_NAME.match(str(n)) for n in names):
        for layer in out_layers:
            if isinstance(layer, Dropout):
                layer.name = None
    return out_layers, out_weights, seed


def _default_name(proto, path) -> str | None:
    """This engine's own exports keep their model's name; other files are named after the file."""
    if proto.producer_name == "classic-cnn" and _NAME.match(proto.graph.name or ""):
        return None
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:64] or None


class OnnxImportWarning(UserWarning):
    """Something the importer had to assume (numbered classes, no normalisation)."""


def import_onnx(
    path,
    *,
    classes=None,
    mean=None,
    std=None,
    background: str | None = None,
    input_shape=None,
    name: str | None = None,
):
    """Read the classic CNN in the ONNX file ``path`` as a :class:`~classic_cnn.model.Sequential`.

    Parameters
    ----------
    path : an ``.onnx`` file (external tensors are read only from files in its folder)
    classes : class names, overriding the file's metadata ``classes``; without either the
        classes are numbered and an :class:`OnnxImportWarning` says so
    mean, std : the normalisation the model was trained with, ``x = (image / 255 − mean) / std``,
        one number or one per channel; override the file's metadata ``preprocessing``; without
        either, mean 0 and std 1 (with a warning)
    background : "dark" (light objects on black, as MNIST) or "light"
    input_shape : (H, W, C) for a graph exported with free image sizes
    name : the model's name (default: the graph's)

    Returns
    -------
    Sequential
        ending in logits (a trailing Softmax becomes ``predict_proba``'s), with ``classes`` and
        ``preprocessing`` set, ``metadata["imported_from"]`` saying where it came from.

    Raises
    ------
    OnnxImportError
        (a ValueError) for a file that is not a chain of the supported operators, naming the
        operator and the node, or a broken or hostile file.
    """
    proto, base = read_onnx(path)
    try:
        return model_from_proto(
            proto,
            base,
            classes=classes,
            mean=mean,
            std=std,
            background=background,
            input_shape=input_shape,
            name=name or _default_name(proto, path),
        )
    except OnnxImportError as exc:
        raise OnnxImportError(f"{path}: {exc}") from None


def compare_with_onnxruntime(model, onnx_path, x) -> float:
    """The largest difference between ONNX Runtime running the file ``onnx_path`` and ``model``
    (imported from it) on the normalised channels-last batch ``x``: probabilities where the
    graph ends in a softmax, logits otherwise."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(
            f"checking the import needs onnxruntime ({exc.name} is missing): "
            "pip install 'classic-cnn[onnx]'"
        ) from None
    info = model.metadata["imported_from"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    x = np.asarray(x, np.float32)
    feed = x.transpose(_TO_NCHW) if info["input_layout"] == "NCHW" else x
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph_input = session.get_inputs()[0]
        # a graph exported for a fixed batch size (often 1) is run that many images at a time
        batch = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else len(x)
        batch = batch if batch >= 1 and len(x) % batch == 0 else len(x)
        outs = [
            session.run(None, {graph_input.name: np.ascontiguousarray(feed[i : i + batch])})[0]
            for i in range(0, len(x), batch)
        ]
    except Exception as exc:  # ONNX Runtime's own exception types
        raise RuntimeError(
            f"ONNX Runtime cannot run {onnx_path} to check the import: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}"
        ) from None
    out = np.concatenate(outs).astype(np.float64)
    ours = model.predict_proba(x) if info["output"] == "probabilities" else model.forward(x)
    return float(np.abs(out.reshape(ours.shape) - ours).max())
