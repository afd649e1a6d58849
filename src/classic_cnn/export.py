"""ONNX export: a trained model as one ``.onnx`` file that any ONNX runtime can run.

The graph is built node by node with the ``onnx`` package's helpers (optional extra ``onnx``:
``pip install 'classic-cnn[onnx]'``), one or a few ONNX operators per layer:

=============  ==============================================================================
layer          ONNX
=============  ==============================================================================
Conv2D         ``Conv`` with explicit ``pads`` [top, left, bottom, right] (Keras's 'same' can
               be asymmetric: the odd extra row/column at the bottom/right); the kernel
               KH×KW×C_in×C_out is transposed to ONNX's C_out×C_in×KH×KW
MaxPool2D      ``MaxPool``, no padding, floor mode (windows that do not fit are dropped)
AvgPool2D      ``AveragePool``, likewise
Flatten        ``Transpose`` back to channels-last, then ``Flatten``: the dense weights that
               follow were trained on the H·W·C order
Dense          ``Gemm`` (``MatMul`` without a bias), the kernel in×out as it is
Dropout        ``Identity`` (inference)
BatchNorm      ``BatchNormalization`` with the running statistics (inference form)
ReLU …         ``Relu``, ``LeakyRelu``, ``Elu``, ``Sigmoid``, ``Tanh``, ``Softmax``
=============  ==============================================================================

ONNX's convolution and pooling work on N×C×H×W, so the graph transposes a channels-last input
once at the start (``layout="NHWC"``, the layout of the model file and of ``predict_proba``)
and back where channels-last order matters; ``layout="NCHW"`` takes N×C×H×W input directly.
The input is the *normalised* image, as for :meth:`~classic_cnn.model.Sequential.forward`:
``x = (image / 255 − mean) / std``; the preprocessing and the class names travel in the file's
``metadata_props`` as JSON strings. Weights are stored as float32 whatever the model's dtype.
"""

from __future__ import annotations

import json
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

#: the ONNX operator set the export targets unless told otherwise (ONNX 1.12+, ONNX Runtime 1.13+)
OPSET = 17
#: the oldest opset whose operators the export uses as written (Softmax over one axis: 13)
MIN_OPSET = 13
LAYOUTS = ("NHWC", "NCHW")
EXPORTABLE = (
    Conv2D,
    MaxPool2D,
    AvgPool2D,
    Flatten,
    Dense,
    Dropout,
    BatchNorm,
    ReLU,
    LeakyReLU,
    ELU,
    Sigmoid,
    Tanh,
    Softmax,
)
_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _need_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            f"ONNX export needs the 'onnx' extra ({exc.name or 'onnx'} is missing): "
            "pip install 'classic-cnn[onnx]'"
        ) from None
    return onnx


class _Graph:
    """Collects nodes and initializers; names every tensor after the layer that makes it."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []
        self.initializers = []

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        self.initializers.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def build_onnx(model, *, layout: str = "NHWC", softmax: bool = True, opset: int = OPSET):
    """The ONNX ``ModelProto`` of ``model`` (checked by ``onnx.checker``).

    Parameters
    ----------
    model : Sequential
    layout : "NHWC" (default: channels-last, N×H×W×C, as the model file records) or "NCHW"
        (N×C×H×W, the usual layout of other frameworks). Outputs that are still feature maps
        come back in the same layout. Ignored for models on vectors (N×D).
    softmax : end in class probabilities, as ``predict_proba`` (output ``probabilities``);
        False gives the logits of ``forward`` (output ``logits``). A model that already ends in
        a Softmax layer is not given a second one.
    opset : ONNX operator set version, 13 or newer (default :data:`OPSET`)

    Raises
    ------
    ValueError
        for a layer with no ONNX translation (the message names it), a bad layout or opset.
    ImportError
        when the ``onnx`` package is missing (the message says how to install it).
    """
    layout = str(layout).upper()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NHWC' or 'NCHW'. Received: layout={layout!r}")
    onnx = _need_onnx()
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be an int from {MIN_OPSET} to {newest} (the newest this onnx "
            f"package knows). Received: opset={opset!r}"
        )
    for layer in model.layers:
        # exact types: a subclass may compute something else than its base's ONNX operator
        if type(layer) not in EXPORTABLE:
            raise ValueError(
                f"cannot export {type(layer).__name__} layer '{layer.name}' of model "
                f"'{model.name}' to ONNX: it has no ONNX translation (exportable layers: "
                f"{', '.join(cls.__name__ for cls in EXPORTABLE)})"
            )

    helper, TensorProto = onnx.helper, onnx.TensorProto
    g = _Graph(onnx)
    images = len(model.input_shape) == 3
    if images:
        h, w, c = model.input_shape
        in_dims = ["N", h, w, c] if layout == "NHWC" else ["N", c, h, w]
    else:
        in_dims = ["N", *model.input_shape]
    x = "input"
    graph_input = helper.make_tensor_value_info(x, TensorProto.FLOAT, in_dims)
    # where the running tensor is: "NCHW" (feature maps, as ONNX's Conv wants them), "NHWC"
    # (feature maps, channels-last order needed by Flatten) or "vector" (N×D)
    at = layout if images else "vector"

    def to(want: str, name: str) -> str:
        nonlocal x, at
        if at != want:
            perm = _TO_NCHW if want == "NCHW" else _TO_NHWC
            x = g.node("Transpose", [x], f"{name}_{want.lower()}", f"{name}/to_{want}", perm=perm)
            at = want
        return x

    shape = model.input_shape
    ends_in_softmax = isinstance(model.layers[-1], Softmax)
    for layer in model.layers:
        n = layer.name
        out = f"{n}_out"
        p = {k: np.asarray(v, np.float32) for k, v in (layer.params | layer.buffers).items()}
        if isinstance(layer, Conv2D):
            to("NCHW", n)
            (pt, pb), (pl, pr) = layer.pads(shape[:2])
            inputs = [x, g.const(f"{n}.kernel", p["kernel"].transpose(3, 2, 0, 1))]
            if layer.use_bias:
                inputs.append(g.const(f"{n}.bias", p["bias"]))
            x = g.node(
                "Conv",
                inputs,
                out,
                n,
                kernel_shape=list(layer.kernel_size),
                strides=[layer.stride, layer.stride],
                pads=[pt, pl, pb, pr],
                dilations=[1, 1],
                group=1,
            )
        elif isinstance(layer, (MaxPool2D, AvgPool2D)):
            to("NCHW", n)
            op = "MaxPool" if isinstance(layer, MaxPool2D) else "AveragePool"
            x = g.node(
                op,
                [x],
                out,
                n,
                kernel_shape=list(layer.pool_size),
                strides=[layer.stride, layer.stride],
                pads=[0, 0, 0, 0],
                ceil_mode=0,
            )
        elif isinstance(layer, Flatten):
            if at != "vector":
                to("NHWC", n)  # the dense weights after it were trained on H·W·C order
            x = g.node("Flatten", [x], out, n, axis=1)
            at = "vector"
        elif isinstance(layer, Dense):
            kernel = g.const(f"{n}.kernel", p["kernel"])
            if layer.use_bias:
                x = g.node("Gemm", [x, kernel, g.const(f"{n}.bias", p["bias"])], out, n)
            else:
                x = g.node("MatMul", [x, kernel], out, n)
        elif isinstance(layer, Dropout):
            x = g.node("Identity", [x], out, n)
        elif isinstance(layer, BatchNorm):
            if at == "NHWC":
                to("NCHW", n)  # BatchNormalization normalises axis 1
            names = ("gamma", "beta", "running_mean", "running_var")
            stats = [g.const(f"{n}.{k}", p[k]) for k in names]
            x = g.node("BatchNormalization", [x, *stats], out, n, epsilon=layer.eps)
        elif isinstance(layer, ELU):  # before LeakyReLU: ELU subclasses it
            x = g.node("Elu", [x], out, n, alpha=layer.alpha)
        elif isinstance(layer, LeakyReLU):
            x = g.node("LeakyRelu", [x], out, n, alpha=layer.alpha)
        elif isinstance(layer, Softmax):
            # over the channels, the last axis of the channels-last tensor
            x = g.node("Softmax", [x], out, n, axis=1 if at == "NCHW" else -1)
        else:
            op = {ReLU: "Relu", Sigmoid: "Sigmoid", Tanh: "Tanh"}[type(layer)]
            x = g.node(op, [x], out, n)
        shape = layer.output_shape(shape)

    if at in LAYOUTS:
        to(layout, "output")  # feature maps come out in the input's layout
    if softmax and not ends_in_softmax:
        x = g.node("Softmax", [x], "softmax_out", "softmax", axis=1 if at == "NCHW" else -1)
    output_name = "probabilities" if softmax or ends_in_softmax else "logits"
    g.node("Identity", [x], output_name, "output")
    if len(shape) == 3:
        oh, ow, oc = shape
        out_dims = ["N", oh, ow, oc] if at == "NHWC" else ["N", oc, oh, ow]
    else:
        out_dims = ["N", *shape]
    graph_output = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_dims)

    graph = helper.make_graph(
        g.nodes,
        model.name,
        [graph_input],
        [graph_output],
        initializer=g.initializers,
        doc_string=f"classic-cnn model '{model.name}', input {layout if images else 'N×D'}",
    )
    from . import __version__

    proto = helper.make_model(
        graph,
        producer_name="classic-cnn",
        producer_version=__version__,
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string=(
            "Input: the normalised image x = (image / 255 - mean) / std per channel, "
            f"{'N×H×W×C' if layout == 'NHWC' else 'N×C×H×W'} float32 (see metadata "
            f"'preprocessing'). Output: {output_name}."
        ),
    )
    # the oldest IR version that carries this opset, so that older runtimes load the file
    proto.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    helper.set_model_props(proto, metadata(model, layout, output_name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def metadata(model, layout: str, output: str) -> dict[str, str]:
    """The ``metadata_props`` of an exported model: JSON strings where structured."""
    prep = model.preprocessing.to_dict() if model.preprocessing is not None else None
    from . import __version__

    return {
        "classes": json.dumps(model.classes),
        "preprocessing": json.dumps(prep),
        "input_layout": layout if len(model.input_shape) == 3 else "ND",
        "input_shape": json.dumps(list(model.input_shape)),  # per image, channels-last
        "output": output,
        "architecture": json.dumps(model.get_config()),
        "dataset": json.dumps(model.metadata.get("dataset")),
        "classic_cnn_version": __version__,
    }


def export_onnx(
    model, path, *, layout: str = "NHWC", softmax: bool = True, opset: int = OPSET
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically); returns the path.

    The graph's input ``input`` is the normalised image batch in ``layout`` (default channels-
    last, N×H×W×C, as ``predict_proba`` takes it); its output is ``probabilities`` (softmax, as
    ``predict_proba``) or, with ``softmax=False``, ``logits`` (as ``forward``). The batch size
    is free. Class names and preprocessing are in the file's metadata. See :func:`build_onnx`
    for the parameters and errors.
    """
    from .io import atomic_write_bytes

    proto = build_onnx(model, layout=layout, softmax=softmax, opset=opset)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def compare_with_onnxruntime(model, onnx_model, x, *, layout: str = "NHWC", softmax=True):
    """Run ``x`` (normalised N×H×W×C float input) through ONNX Runtime and through ``model``
    (``predict_proba``, or ``forward`` with ``softmax=False``); returns ``(ort_out, ours)``,
    the ONNX output put back in channels-last order where it is feature maps."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(
            f"checking the export needs onnxruntime ({exc.name} is missing): "
            "pip install 'classic-cnn[onnx]'"
        ) from None
    if not isinstance(onnx_model, (str, Path)):
        onnx_model = onnx_model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    x = np.asarray(x, np.float32)
    images = x.ndim == 4
    feed = x.transpose(_TO_NCHW) if images and layout.upper() == "NCHW" else x
    (out,) = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(feed)})
    if out.ndim == 4 and layout.upper() == "NCHW":
        out = out.transpose(_TO_NHWC)
    ours = model.predict_proba(x) if softmax else model.forward(x)
    return out, ours
