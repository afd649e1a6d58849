"""The arithmetic behind one number of a feature map, as a record.

:func:`explain` answers "why is this number of this feature map what it is?": for a
convolution, the patch of the layer's input under the kernel (padding zeros included), the
kernel, their element-wise product, its sum, the bias, and then each element-wise layer that
follows (batch norm, the activation) up to the value after activation; for a pooling layer, the
window and which element won. It also traces the unit back to the region of the original image
it sees (its receptive field). The numbers are computed with the plain loop arithmetic of
:mod:`classic_cnn.reference` (patch · kernel, summed), not the fast im2col path, so that the
record shows the textbook definition; the tests hold it to the forward pass.

The record is plain data (:class:`Explanation`, ``to_dict()`` for JSON), shared by the command
line (``cnn explain``), the pictures (:mod:`classic_cnn.viz`) and the report. Nothing here draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import ops
from .layers import (
    ELU,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dropout,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Tanh,
    _fmt_shape,
    _Pool2D,
)
from .reference import pad_input

#: layers that act on each number on its own (per channel at most), so a unit keeps its place
ELEMENTWISE = (BatchNorm, ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Dropout)
SPATIAL = (Conv2D, _Pool2D)


@dataclass
class Step:
    """One element-wise layer applied to the number: its name, the formula with the numbers
    put in, and the value it gives."""

    layer: str
    type: str
    formula: str
    value: float


@dataclass
class Explanation:
    """Everything behind ``output[row, col, channel]`` of layer ``layer`` for one image.

    For a convolution (``kind == "conv"``): ``patch`` (KH, KW, C_in) is the layer's input under
    the kernel, zeros where it lies in the padding (``padded`` marks them, KH×KW);
    ``kernel`` (KH, KW, C_in) is kernel ``channel``; ``products = patch * kernel``;
    ``total = products.sum()``; ``conv_value = total + bias``. For pooling (``"max_pool"``,
    ``"avg_pool"``): ``patch`` is the window (PH, PW) of channel ``channel``; ``winner`` the
    (row, col) of the maximum inside it (the first in row-major order); ``conv_value`` the
    pooled number. ``steps`` are the element-wise layers after it (batch norm, activation);
    ``value`` is the named layer's output and ``final`` the value after the last step.

    ``origin`` is the (row, col) of the patch's top-left corner in the layer's input (negative
    inside the top/left padding). ``receptive_field`` is ``(top, left, bottom, right)``, ends
    excluded, of the original input image that can influence this number (clipped to the
    image; ``receptive_field_full`` is before clipping, reaching into the padding).
    """

    layer: str
    layer_type: str
    kind: str
    position: tuple[int, int]
    channel: int
    channel_chosen: str  # "given" or "strongest"
    input_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    origin: tuple[int, int]
    patch: np.ndarray
    padded: np.ndarray
    kernel: np.ndarray | None = None
    products: np.ndarray | None = None
    total: float = 0.0
    bias: float = 0.0
    conv_value: float = 0.0
    winner: tuple[int, int] | None = None
    stride: int = 1
    steps: list[Step] = field(default_factory=list)
    value: float = 0.0
    final: float = 0.0
    base_layer: str = ""
    receptive_field: tuple[int, int, int, int] = (0, 0, 0, 0)
    receptive_field_full: tuple[int, int, int, int] = (0, 0, 0, 0)
    image_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        """Plain JSON-able data (arrays as nested lists)."""

        def plain(v):
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, (np.floating, np.integer)):
                return v.item()
            if isinstance(v, tuple):
                return list(v)
            return v

        d = {k: plain(v) for k, v in self.__dict__.items() if k != "steps"}
        d["steps"] = [s.__dict__.copy() for s in self.steps]
        return d

    def to_text(self, max_channels: int = 3) -> str:
        """The arithmetic as a plain-text table, as ``cnn explain`` prints it."""
        r, c = self.position
        lines = [
            f"{self.layer} ({self.layer_type}, output {_fmt_shape(self.output_shape)}), "
            f"position row {r}, col {c}, "
            + ("filter" if self.kind == "conv" else "channel")
            + f" {self.channel}"
            + (" (the strongest here)" if self.channel_chosen == "strongest" else ""),
            f"input: {self.input_name} ({_fmt_shape(self.input_shape)}); window rows "
            f"{self.origin[0]}..{self.origin[0] + self.patch.shape[0] - 1}, cols "
            f"{self.origin[1]}..{self.origin[1] + self.patch.shape[1] - 1}"
            + (f" ({int(self.padded.sum())} in the zero padding)" if self.padded.any() else ""),
        ]
        if self.kind == "conv":
            cin = self.patch.shape[2]
            shown = range(min(cin, max_channels))
            for ch in shown:
                lines.append("")
                lines.append(f"input channel {ch}:  patch  ×  kernel  =  product")
                lines.extend(
                    _side_by_side(
                        [self.patch[..., ch], self.kernel[..., ch], self.products[..., ch]],
                        ["×", "="],
                        self.padded,
                    )
                )
                lines.append(f"  channel sum {self.products[..., ch].sum():.6g}")
            if cin > len(shown):
                rest = self.products[..., len(shown) :].sum()
                lines.append(f"… {cin - len(shown)} more input channels, their sum {rest:.6g}")
            lines.append("")
            lines.append(
                f"sum of the {self.products.size} products = {self.total:.6g}; "
                f"+ bias {self.bias:.6g} = {self.conv_value:.6g}"
            )
        else:
            what = "maximum" if self.kind == "max_pool" else "mean"
            lines.append("")
            lines.append(
                f"window ({self.patch.shape[0]}×{self.patch.shape[1]}, stride {self.stride}):"
            )
            lines.extend(_side_by_side([self.patch], [], None, mark=self.winner))
            if self.winner is not None:
                wr, wc = self.winner
                lines.append(
                    f"{what} = {self.conv_value:.6g} (the element at window row {wr}, col {wc}; "
                    f"input row {self.origin[0] + wr}, col {self.origin[1] + wc})"
                )
            else:
                lines.append(f"{what} = {self.conv_value:.6g}")
        for s in self.steps:
            lines.append(f"{s.layer} ({s.type}): {s.formula} = {s.value:.6g}")
        lines.append(f"value of {self.layer} at ({r}, {c}, {self.channel}): {self.value:.6g}")
        t, left, b, right = self.receptive_field
        lines.append(
            f"receptive field: rows {t}..{b - 1}, cols {left}..{right - 1} of the "
            f"{_fmt_shape(self.image_shape)} input ({b - t}×{right - left} pixels)"
        )
        return "\n".join(lines)


def _side_by_side(grids, ops_, padded, mark=None) -> list[str]:
    """Small 2-D grids printed next to each other, padding cells in brackets, the winner
    starred."""
    cells = []
    for k, g in enumerate(grids):
        rows = []
        for i in range(g.shape[0]):
            row = []
            for j in range(g.shape[1]):
                text = f"{g[i, j]:.3g}"
                if k == 0 and padded is not None and padded[i, j]:
                    text = f"[{text}]"
                if mark is not None and (i, j) == tuple(mark):
                    text = f"*{text}*"
                row.append(text)
            rows.append(row)
        cells.append(rows)
    width = max(len(t) for rows in cells for row in rows for t in row)
    out = []
    for i in range(grids[0].shape[0]):
        parts = []
        for k, rows in enumerate(cells):
            parts.append(" ".join(t.rjust(width) for t in rows[i]))
            if k < len(ops_):
                parts.append(ops_[k] if i == grids[0].shape[0] // 2 else " ")
        out.append("  " + "  ".join(parts))
    return out


# --------------------------------------------------------------------------------------------
# Forward pass, layer by layer
# --------------------------------------------------------------------------------------------


def layer_outputs(model, x: np.ndarray) -> list[np.ndarray]:
    """Each layer's output for the batch ``x`` (float, already preprocessed), in order
    (inference mode: batch norm uses its running statistics, dropout passes through)."""
    x = model._as_batch(x)
    outs = []
    for layer in model.layers:
        x = layer.forward(x, training=False)
        outs.append(x)
    return outs


def feature_maps(model, x: np.ndarray, layers=None) -> list[dict]:
    """The feature maps of one image: a record per convolution, activation, batch-norm and
    pooling layer whose output is H×W×C.

    ``x`` is one preprocessed image (H, W, C) or a batch of one. Returns dicts with ``name``,
    ``type`` and ``maps`` (H', W', C'), in layer order; ``layers`` (names) keeps only those.
    """
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    wanted = _check_layer_names(model, layers, _map_layer_names(model)) if layers else None
    out = []
    for layer, y in zip(model.layers, layer_outputs(model, x[:1]), strict=True):
        if y.ndim != 4 or not isinstance(layer, (*SPATIAL, *ELEMENTWISE)):
            continue
        if wanted is not None and layer.name not in wanted:
            continue
        out.append({"name": layer.name, "type": type(layer).__name__, "maps": y[0]})
    return out


def _map_layer_names(model) -> list[str]:
    names, shape = [], model.input_shape
    for layer in model.layers:
        shape = layer.output_shape(shape)
        if len(shape) == 3 and isinstance(layer, (*SPATIAL, *ELEMENTWISE)):
            names.append(layer.name)
    return names


def _check_layer_names(model, names, valid) -> list[str]:
    if not valid:
        raise ValueError(
            f"model '{model.name}' has no convolution or pooling layers "
            f"(layers: {', '.join(layer.name for layer in model.layers)})"
        )
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(
            f"no layer named {bad[0]!r} with feature maps in model '{model.name}'; "
            f"valid: {', '.join(valid)}"
        )
    return list(names)


def conv_layer_names(model) -> list[str]:
    """Names of the model's Conv2D layers, in order."""
    return [layer.name for layer in model.layers if isinstance(layer, Conv2D)]


def explainable_layers(model) -> list[str]:
    """Layers whose numbers :func:`explain` can take apart: convolution and pooling layers and
    the element-wise layers (batch norm, activations) that follow them."""
    names = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, SPATIAL) or (
            isinstance(layer, ELEMENTWISE) and _base_index(model, i) is not None
        ):
            names.append(layer.name)
    return names


def _base_index(model, i: int) -> int | None:
    """The convolution or pooling layer whose numbers layer ``i`` passes on element-wise."""
    while i >= 0 and isinstance(model.layers[i], ELEMENTWISE):
        i -= 1
    return i if i >= 0 and isinstance(model.layers[i], SPATIAL) else None


# --------------------------------------------------------------------------------------------
# The explanation
# --------------------------------------------------------------------------------------------


def parse_position(text: str) -> tuple[int, int]:
    """``"ROW,COL"`` → (row, col)."""
    try:
        r, c = (int(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise ValueError(
            f"position must be ROW,COL (two integers, e.g. 3,4). Received: {text!r}"
        ) from None
    return r, c


def explain(model, x: np.ndarray, layer: str, at, channel: int | None = None) -> Explanation:
    """The arithmetic behind ``output[row, col, channel]`` of ``layer`` for one image.

    Parameters
    ----------
    model : a :class:`~classic_cnn.model.Sequential`
    x : one image as the model's float input (H, W, C) or a batch of one (1, H, W, C);
        uint8 images go through the model's preprocessing
    layer : the layer's name (a convolution, a pooling layer, or a batch-norm / activation
        layer after one)
    at : (row, col) in the layer's output
    channel : the filter (convolution) or channel; default: the strongest at that position

    Raises ValueError naming what is valid for an unknown layer, a position outside the map
    or a channel out of range.
    """
    valid = explainable_layers(model)
    if not valid:
        raise ValueError(
            f"model '{model.name}' has no convolution or pooling layers to explain "
            f"(layers: {', '.join(lyr.name for lyr in model.layers)})"
        )
    names = [lyr.name for lyr in model.layers]
    if layer not in valid:
        why = "no layer named" if layer not in names else "cannot explain layer"
        raise ValueError(f"{why} {layer!r} in model '{model.name}'; valid: {', '.join(valid)}")
    index = names.index(layer)
    base = _base_index(model, index)

    x = np.asarray(x)
    if x.ndim == len(model.input_shape):
        x = x[None]
    x = model._as_batch(x[:1])
    outs = layer_outputs(model, x)
    y = outs[index][0]
    oh, ow, oc = y.shape
    r, c = (int(v) for v in at)
    if not (0 <= r < oh and 0 <= c < ow):
        raise ValueError(
            f"position ({r}, {c}) is outside {layer}'s {oh}×{ow}×{oc} output; valid: rows "
            f"0..{oh - 1}, cols 0..{ow - 1}"
        )
    chosen = "given"
    if channel is None:
        channel, chosen = int(np.argmax(y[r, c])), "strongest"
    elif not (0 <= int(channel) < oc):
        what = "filter" if isinstance(model.layers[base], Conv2D) else "channel"
        raise ValueError(
            f"{what} {channel} is out of range for {layer} ({oc} channels); valid: 0..{oc - 1}"
        )
    k = int(channel)

    base_layer = model.layers[base]
    inp = (x if base == 0 else outs[base - 1])[0].astype(np.float64)
    e = Explanation(
        layer=layer,
        layer_type=type(model.layers[index]).__name__,
        kind="conv",
        position=(r, c),
        channel=k,
        channel_chosen=chosen,
        input_name=names[base - 1] if base else _input_name(model),
        input_shape=inp.shape,
        output_shape=y.shape,
        origin=(0, 0),
        patch=np.zeros((0, 0)),
        padded=np.zeros((0, 0), bool),
        base_layer=base_layer.name,
        image_shape=tuple(x.shape[1:]),
    )
    s = base_layer.stride
    e.stride = s
    if isinstance(base_layer, Conv2D):
        kh, kw = base_layer.kernel_size
        pads = base_layer.pads(inp.shape[:2])
        (pt, _), (pl, _) = pads
        xp = pad_input(inp[None], pads)[0]
        mask = np.ones(inp.shape[:2], bool)
        mask = ~pad_input(mask[None, :, :, None], pads)[0, :, :, 0]
        e.patch = xp[r * s : r * s + kh, c * s : c * s + kw, :]
        e.padded = mask[r * s : r * s + kh, c * s : c * s + kw]
        e.origin = (r * s - pt, c * s - pl)
        e.kernel = base_layer.params["kernel"][:, :, :, k].astype(np.float64)
        e.products = e.patch * e.kernel  # multiply element-wise (as reference.conv2d_forward)
        e.total = float(np.sum(e.products))  # ... then sum
        bias = base_layer.params.get("bias")
        e.bias = float(bias[k]) if bias is not None else 0.0
        e.conv_value = e.total + e.bias
    else:
        ph, pw = base_layer.pool_size
        e.kind = "max_pool" if isinstance(base_layer, MaxPool2D) else "avg_pool"
        e.patch = inp[r * s : r * s + ph, c * s : c * s + pw, k]
        e.padded = np.zeros((ph, pw), bool)
        e.origin = (r * s, c * s)
        if isinstance(base_layer, AvgPool2D):
            e.conv_value = float(e.patch.mean())
        else:
            a = int(np.argmax(e.patch))  # first maximum in row-major order, as the backward pass
            e.winner = (a // pw, a % pw)
            e.conv_value = float(e.patch.max())

    value = e.conv_value
    e.value = value
    j = base + 1
    while j < len(model.layers) and isinstance(model.layers[j], ELEMENTWISE):
        step = _elementwise_step(model.layers[j], value, k)
        e.steps.append(step)
        value = step.value
        if j == index:
            e.value = value
        j += 1
    e.final = value
    e.receptive_field_full = receptive_field(model, index, (r, c))
    t, left, b, right = e.receptive_field_full
    h, w = model.input_shape[:2]
    e.receptive_field = (max(t, 0), max(left, 0), min(b, h), min(right, w))
    return e


def _input_name(model) -> str:
    prep = model.preprocessing
    if prep is None:
        return "the input image"
    return "the input image, normalised ((pixel/255 − mean)/std)"


def _elementwise_step(layer, v: float, k: int) -> Step:
    name, kind = layer.name, type(layer).__name__
    if isinstance(layer, BatchNorm):
        g, b = float(layer.params["gamma"][k]), float(layer.params["beta"][k])
        mu, var = float(layer.buffers["running_mean"][k]), float(layer.buffers["running_var"][k])
        out = g * (v - mu) / np.sqrt(var + layer.eps) + b
        formula = (
            f"γ·(x − μ)/√(σ² + ε) + β = {g:.4g}·({v:.6g} − {mu:.4g})/√({var:.4g} + "
            f"{layer.eps:g}) + {b:.4g}"
        )
        return Step(name, kind, formula, float(out))
    if isinstance(layer, Dropout):
        return Step(name, kind, f"x (dropout passes numbers through at inference) = {v:.6g}", v)
    arr = np.array([v], dtype=np.float64)
    if isinstance(layer, ELU):
        out, formula = (
            ops.elu_forward(arr, layer.alpha)[0],
            f"x if x > 0 else {layer.alpha:g}·(eˣ − 1)",
        )
    elif isinstance(layer, LeakyReLU):
        out, formula = ops.leaky_relu_forward(arr, layer.alpha)[0], f"max(x, {layer.alpha:g}·x)"
    elif isinstance(layer, Sigmoid):
        out, formula = ops.sigmoid_forward(arr)[0], "1 / (1 + e⁻ˣ)"
    elif isinstance(layer, Tanh):
        out, formula = ops.tanh_forward(arr)[0], "tanh(x)"
    else:
        out, formula = ops.relu_forward(arr)[0], "max(x, 0)"
    return Step(name, kind, f"{formula} at x = {v:.6g}", float(out[0]))


def receptive_field(model, index: int, at) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)``, ends excluded, of the model's input that can change
    ``output[row, col]`` of layer ``index``; not clipped, so it may reach into the padding
    (negative, or beyond the image)."""
    shapes = [model.input_shape]
    for layer in model.layers[: index + 1]:
        shapes.append(layer.output_shape(shapes[-1]))
    r0 = r1 = int(at[0])
    c0 = c1 = int(at[1])
    for i in range(index, -1, -1):
        layer = model.layers[i]
        if isinstance(layer, Conv2D):
            (kh, kw), s = layer.kernel_size, layer.stride
            (pt, _), (pl, _) = layer.pads(shapes[i][:2])
        elif isinstance(layer, _Pool2D):
            (kh, kw), s, pt, pl = layer.pool_size, layer.stride, 0, 0
        else:
            continue
        r0, r1 = r0 * s - pt, r1 * s - pt + kh - 1
        c0, c1 = c0 * s - pl, c1 * s - pl + kw - 1
    return r0, c0, r1 + 1, c1 + 1


# --------------------------------------------------------------------------------------------
# Image files → the model's input
# --------------------------------------------------------------------------------------------


def prepare_image(model, image: np.ndarray, invert: str | bool = "auto"):
    """An image (uint8, any size, gray or RGB) as the model sees it.

    ``invert``: True/False, or "auto" (invert when the image's border says it has the other
    polarity than the training data, as ``cnn predict`` does). Returns ``(seen, x, inverted)``:
    the uint8 image at the model's size and channels, the float input (1, H, W, C), and whether
    it was inverted.
    """
    from .data.images import border_background, to_input

    prep = model.preprocessing
    if prep is None:
        raise ValueError(f"model '{model.name}' records no preprocessing; it cannot take images")
    if invert == "auto":
        flip = border_background(image) != prep.background
    else:
        flip = invert in (True, "yes")
    seen = to_input(image, prep.size, prep.channels, invert=flip)
    return seen, prep.apply(seen[None], model.dtype), flip
