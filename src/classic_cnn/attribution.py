"""Why this class? Maps of which input pixels pushed the network to a class.

:mod:`classic_cnn.explain` shows *how* one number is computed; this module answers *why* the
network chose a class, with three classic methods, for any model the engine runs:

- :func:`saliency` (Simonyan et al., 2013): the gradient of the class's score (its logit) with
  respect to every input number, ``d score / d x``, by the model's own backward pass. The map is
  ``|d score / d x|`` (the largest over the colour channels); :func:`gradient_x_input` maps
  ``Σ_c x · d score / d x`` instead (signed: which pixels, as they are, add to the score).
- :func:`gradcam` (Selvaraju et al., 2017) on a convolution / activation layer with maps
  A (h×w×K): each channel weighted by the mean of its gradient,
  ``α_k = mean_ij d score / d A_ijk``, then ``cam = max(Σ_k α_k A_k, 0)``, resized to the input
  (bilinear). Default layer: the last convolution or activation before flattening.
- :func:`occlusion` (Zeiler & Fergus, 2014): a grey patch slid over the image (``patch`` and
  ``stride`` given); at each position the drop in the class's probability,
  ``p(image) − p(image with the patch)``; each pixel's value is the mean drop of the patches
  covering it.

Each returns an :class:`Attribution`: the map at the input's size (H×W), the class it explains
(the top class by default, or the one named) and its probability, plus the method's own arrays.
They run in the model's dtype (float32 unless the model is float64) under the engine's threads
(:func:`classic_cnn.ops.engine_threads`), on a detached view of the model: the layers' weights
are shared, but the caches and gradients a backward pass leaves behind go to copies of the
layer objects, so nothing of the model changes (a later ``fit`` is unaffected, and concurrent
calls do not share state).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import ops
from .layers import (
    ELU,
    BatchNorm,
    Conv2D,
    Dropout,
    LeakyReLU,
    ReLU,
    Sigmoid,
    Softmax,
    Tanh,
    _Pool2D,
)

METHODS = ("gradcam", "saliency", "gradient-x-input", "occlusion")
#: layers whose maps Grad-CAM may use (any layer with an H×W×C output)
GRADCAM_LAYERS = (Conv2D, ReLU, LeakyReLU, ELU, Sigmoid, Tanh, BatchNorm, Dropout, _Pool2D)
#: layers the default Grad-CAM layer is chosen from: convolutions and activations
_DEFAULT_LAYERS = (Conv2D, ReLU, LeakyReLU, ELU, Sigmoid, Tanh)
#: a mid-grey pixel (0–255) for the occlusion patch
GREY = 127.5
#: the fields of :meth:`Attribution.record`
RECORD_FIELDS = (
    "method", "map", "class_index", "class_name", "chosen", "probability", "score", "signed",
    "layer", "weights", "cam", "drops", "patch", "stride", "fill", "vmin", "vmax", "scale",
)  # fmt: skip


@dataclass
class Attribution:
    """One attribution map and what it explains.

    ``map`` (H, W) has the input's height and width. ``class_index`` / ``class_name``: the class
    explained; ``chosen``: ``"top"`` (the most probable) or ``"given"``; ``probability`` and
    ``score`` (its logit) for the unchanged input. ``signed``: whether the map has both signs
    (gradient × input) or is ≥ 0 (the others, whose colour scale then starts at 0).

    Method-specific arrays: ``gradient`` (H, W, C) for the saliency methods; ``layer``,
    ``layer_maps`` (h, w, K), ``weights`` (K,) and ``cam`` (h, w, before resizing) for Grad-CAM;
    ``drops`` (rows, cols, one per patch position), ``patch``, ``stride``, ``fill`` (the
    patch's value per channel) for occlusion.
    """

    method: str
    map: np.ndarray
    class_index: int
    class_name: str
    chosen: str
    probability: float
    score: float
    signed: bool = False
    gradient: np.ndarray | None = None
    layer: str | None = None
    layer_maps: np.ndarray | None = None
    weights: np.ndarray | None = None
    cam: np.ndarray | None = None
    drops: np.ndarray | None = None
    patch: int | None = None
    stride: int | None = None
    fill: list[float] | None = None
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def scale(self) -> tuple[float, float]:
        """``(vmin, vmax)`` of the map's colour scale: 0..max for maps ≥ 0, symmetric around 0
        for signed ones (never an empty range)."""
        top = float(np.abs(self.map).max(initial=0.0)) or 1.0
        if self.signed or self.map.min(initial=0.0) < 0:
            return -top, top
        return 0.0, top

    def scale_text(self) -> str:
        lo, hi = self.scale
        what = {
            "saliency": "|d score / d pixel|",
            "gradient-x-input": "pixel × d score / d pixel",
            "gradcam": f"Grad-CAM of {self.layer}",
            "occlusion": f"drop in p({self.class_name}) under a {self.patch}×{self.patch} patch",
        }[self.method]
        return f"{what}, colour scale {lo:.3g} to {hi:.3g}"

    def record(self) -> dict:
        """:meth:`to_dict` without the large arrays (the input's gradient, Grad-CAM's layer maps,
        the probabilities): what ``cnn explain --why --json`` prints and ``/api/why`` answers."""
        return {k: v for k, v in self.to_dict().items() if k in RECORD_FIELDS}

    def to_dict(self) -> dict:
        """Plain JSON-able data (arrays as nested lists)."""
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, (np.floating, np.integer)):
                v = v.item()
            out[k] = v
        out["vmin"], out["vmax"] = self.scale
        out["scale"] = self.scale_text()
        return out


# --------------------------------------------------------------------------------------------
# The model, detached, and one pass through it
# --------------------------------------------------------------------------------------------


def _detached(model):
    """A shallow copy of ``model`` whose layers are copies sharing the weights (params,
    buffers) but not the per-call state (caches, gradients), so forward and backward passes on
    it leave the model as it was."""
    m = copy.copy(model)
    m.__dict__.pop("_run_steps", None)
    m.layers = []
    for layer in model.layers:
        c = copy.copy(layer)
        c.grads = {}
        c._cache = None
        c.input_grad = True
        m.layers.append(c)
    return m


def _one_image(model, x) -> np.ndarray:
    """One image as the model's float input, (1, H, W, C)."""
    x = np.asarray(x)
    if x.ndim == len(model.input_shape):
        x = x[None]
    x = model._as_batch(x)
    if len(x) != 1:
        raise ValueError(
            f"attribution explains one image at a time. Received: a batch of {len(x)} images"
        )
    return np.ascontiguousarray(x)


def class_names(model) -> list[str]:
    return list(model.classes or [str(i) for i in range(model.output_shape[-1])])


def resolve_class(model, target) -> int | None:
    """A class given by name or index → its index (None stays None: the top class)."""
    if target is None:
        return None
    names = class_names(model)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if 0 <= int(target) < len(names):
            return int(target)
        raise ValueError(
            f"class index must be 0..{len(names) - 1} for model '{model.name}'. "
            f"Received: {int(target)}"
        )
    if isinstance(target, str):
        if target in names:
            return names.index(target)
        folded = [n.casefold() for n in names]
        if target.casefold() in folded:
            return folded.index(target.casefold())
        raise ValueError(
            f"class must be one of the model's classes ({', '.join(names)}). Received: {target!r}"
        )
    raise ValueError(f"class must be a class name or an index. Received: {target!r}")


class _Pass:
    """One image through a detached model, layer by layer at inference, keeping each layer's
    output; :meth:`grad` back-propagates d score / d logits down to a layer's output."""

    def __init__(self, model, x, target):
        self.model = _detached(model)
        self.layers = self.model.layers
        # the score is a logit: before a closing Softmax layer, if the model has one
        self.n_score = len(self.layers) - isinstance(self.layers[-1], Softmax)
        self.x = _one_image(model, x)
        self.outputs = [self.x]
        for layer in self.layers[: self.n_score]:
            self.outputs.append(layer.forward(self.outputs[-1], training=False))
        logits = self.outputs[-1][0]
        self.probabilities = ops.softmax(logits[None].astype(np.float64))[0]
        index = resolve_class(model, target)
        self.chosen = "given" if index is not None else "top"
        self.index = int(np.argmax(logits)) if index is None else index
        self.score = float(logits[self.index])
        self.name = class_names(model)[self.index]

    def grad(self, down_to: int) -> np.ndarray:
        """d score / d (output of layer ``down_to − 1``), i.e. of ``outputs[down_to]``
        (``down_to = 0``: of the input)."""
        d = np.zeros_like(self.outputs[self.n_score])
        d[0, self.index] = 1
        for layer in reversed(self.layers[down_to : self.n_score]):
            d = layer.backward(d)
        return d

    def result(self, method: str, amap: np.ndarray, **kw) -> Attribution:
        return Attribution(
            method=method,
            map=amap,
            class_index=self.index,
            class_name=self.name,
            chosen=self.chosen,
            probability=float(self.probabilities[self.index]),
            score=self.score,
            probabilities=self.probabilities,
            **kw,
        )


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def saliency(model, x, target=None) -> Attribution:
    """Gradient saliency: ``map = max_c |d score / d x[..., c]|`` (H, W), where ``score`` is the
    logit of class ``target`` (a name or index; default: the top class). ``gradient`` holds
    d score / d x itself (H, W, C).

    ``x``: one image, the model's float input (H, W, C) or (1, H, W, C), or uint8 pixels that
    go through the model's preprocessing."""
    with ops.engine_threads():
        p = _Pass(model, x, target)
        g = p.grad(0)[0]
    # images: the largest over the colour channels; vector inputs: each number's own
    amap = np.abs(g).max(axis=-1) if g.ndim == 3 else np.abs(g)
    return p.result("saliency", amap, gradient=g)


def gradient_x_input(model, x, target=None) -> Attribution:
    """Gradient × input: ``map = Σ_c x[..., c] · d score / d x[..., c]`` (H, W), signed: where
    the pixels, as they are, raise (> 0) or lower (< 0) the class's score. Arguments as
    :func:`saliency`."""
    with ops.engine_threads():
        p = _Pass(model, x, target)
        g = p.grad(0)[0]
    gx = g * p.x[0]
    amap = gx.sum(axis=-1) if g.ndim == 3 else gx
    return p.result("gradient-x-input", amap, gradient=g, signed=True)


def gradcam_layers(model) -> list[str]:
    """Layers Grad-CAM can use: those with H×W×C outputs (convolution, activation, batch norm,
    pooling, dropout)."""
    names, shape = [], model.input_shape
    for layer in model.layers:
        shape = layer.output_shape(shape)
        if len(shape) == 3 and isinstance(layer, GRADCAM_LAYERS):
            names.append(layer.name)
    return names


def default_gradcam_layer(model) -> str:
    """The last convolution or activation layer with H×W×C maps (the last before flattening)."""
    shape, best = model.input_shape, None
    for layer in model.layers:
        shape = layer.output_shape(shape)
        if len(shape) != 3:
            break
        if isinstance(layer, _DEFAULT_LAYERS):
            best = layer.name
    if best is None:
        raise ValueError(
            f"Grad-CAM needs a convolution or activation layer with H×W×C maps; model "
            f"'{model.name}' has none (layers: {', '.join(lyr.name for lyr in model.layers)})"
        )
    return best


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map resized to ``size`` (H, W) by bilinear interpolation (Pillow's, on float32
    pixels, pixel centres aligned); returned unchanged when it has that size already."""
    h, w = size
    if m.shape == (h, w):
        return m
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=m.dtype)


def gradcam(model, x, target=None, layer: str | None = None) -> Attribution:
    """Grad-CAM on ``layer`` (default: :func:`default_gradcam_layer`): with that layer's maps
    A (h, w, K) and the score's gradient dA, ``weights = mean_ij dA`` (K,), ``cam = max(A ·
    weights, 0)`` (h, w), and ``map`` the cam resized to the input's H×W (bilinear).
    Arguments as :func:`saliency`."""
    valid = gradcam_layers(model)
    if layer is None:
        layer = default_gradcam_layer(model)
    elif layer not in valid:
        names = [lyr.name for lyr in model.layers]
        why = "no layer named" if layer not in names else "Grad-CAM needs H×W×C maps, not layer"
        raise ValueError(f"{why} {layer!r} in model '{model.name}'; valid: {', '.join(valid)}")
    index = [lyr.name for lyr in model.layers].index(layer)
    with ops.engine_threads():
        p = _Pass(model, x, target)
        a = p.outputs[index + 1][0]
        da = p.grad(index + 1)[0]
    weights = da.mean(axis=(0, 1))
    cam = np.maximum(a @ weights, 0)
    amap = resize_map(cam, model.input_shape[:2])
    return p.result(
        "gradcam", amap, layer=layer, layer_maps=a, weights=weights, cam=cam.astype(a.dtype)
    )


def _positions(size: int, patch: int, stride: int) -> list[int]:
    """Top (or left) edges of the patches: every ``stride``, and one flush with the far edge so
    that every pixel is covered."""
    last = size - patch
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def grey_fill(model) -> np.ndarray:
    """A mid-grey pixel (127.5 of 255) as the model's input numbers, one per channel (after the
    model's normalisation of each channel; 0 for a model without preprocessing)."""
    channels = model.input_shape[-1]
    prep = model.preprocessing
    if prep is None:
        return np.zeros(channels)
    mean = np.broadcast_to(np.asarray(prep.mean, np.float64), (channels,))
    std = np.broadcast_to(np.asarray(prep.std, np.float64), (channels,))
    return (GREY / 255.0 - mean) / std


def occlusion(model, x, target=None, patch: int = 4, stride: int = 2, fill=None) -> Attribution:
    """Occlusion sensitivity: a ``patch``×``patch`` square of ``fill`` (a number, or one per
    channel; default: mid-grey as the model's input, :func:`grey_fill`) put at every ``stride``
    pixels (and flush with the far edges); ``drops[i, j] = p(x) − p(x with the patch at
    position i, j)`` for the class; each pixel of ``map`` is the mean of the drops of the
    patches covering it (> 0: hiding it costs the class probability). The occluded images go
    through the model's inference path in one batch, with the unchanged image. Arguments as
    :func:`saliency`."""
    for name, v in (("patch", patch), ("stride", stride)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int. Received: {name}={v!r}")
    if len(model.input_shape) != 3:
        raise ValueError(
            f"occlusion needs image inputs (H, W, C). Received: a model of input shape "
            f"{model.input_shape}"
        )
    h, w = model.input_shape[:2]
    if patch > min(h, w):
        raise ValueError(f"patch must fit in the model's {h}×{w} input. Received: patch={patch}")
    m = _detached(model)
    x1 = _one_image(model, x)
    channels = model.input_shape[-1]
    fill = grey_fill(model) if fill is None else np.asarray(fill, np.float64).reshape(-1)
    if fill.size not in (1, channels) or not np.isfinite(fill).all():
        raise ValueError(
            f"fill must be one finite number or {channels} (one per channel). "
            f"Received: fill={fill.tolist()}"
        )
    fill = np.broadcast_to(fill, (channels,))
    rows, cols = _positions(h, patch, stride), _positions(w, patch, stride)
    batch = np.repeat(x1, 1 + len(rows) * len(cols), axis=0)
    k = 1
    for r in rows:
        for c in cols:
            batch[k, r : r + patch, c : c + patch, :] = fill
            k += 1
    index = resolve_class(model, target)
    with ops.engine_threads():
        probs = m.predict_proba(batch).astype(np.float64)
    base = probs[0]
    chosen = "given" if index is not None else "top"
    index = int(np.argmax(base)) if index is None else index
    drops = (base[index] - probs[1:, index]).reshape(len(rows), len(cols))
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            total[r : r + patch, c : c + patch] += drops[i, j]
            count[r : r + patch, c : c + patch] += 1
    logits = m.predict_logits(x1)[0] if not m.ends_in_softmax else np.log(base)
    return Attribution(
        method="occlusion",
        map=(total / count).astype(x1.dtype),
        class_index=index,
        class_name=class_names(model)[index],
        chosen=chosen,
        probability=float(base[index]),
        score=float(logits[index]),
        signed=True,
        drops=drops,
        patch=int(patch),
        stride=int(stride),
        fill=fill.tolist(),
        probabilities=base,
    )


def attribute(model, x, method: str = "gradcam", target=None, **options) -> Attribution:
    """One of :data:`METHODS` by name: ``"gradcam"`` (option ``layer``), ``"saliency"``,
    ``"gradient-x-input"``, ``"occlusion"`` (options ``patch``, ``stride``, ``fill``)."""
    functions = {
        "gradcam": gradcam,
        "saliency": saliency,
        "gradient-x-input": gradient_x_input,
        "occlusion": occlusion,
    }
    if method not in functions:
        raise ValueError(f"method must be one of {', '.join(METHODS)}. Received: {method!r}")
    return functions[method](model, x, target, **options)
