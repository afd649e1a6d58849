"""The Sequential model: layers applied one after another, ending in logits.

``forward`` runs the layers in order; ``backward`` runs the chain rule through them in reverse,
each layer filling its own gradients; ``parameters()`` and ``gradients()`` hand both to an
optimizer under names such as ``"conv2d_1.kernel"``.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np

from . import ops
from .layers import (
    BatchNorm,
    Conv2D,
    Dropout,
    Layer,
    MaxPool2D,
    ReLU,
    Softmax,
    _fmt_shape,
    layer_from_config,
)
from .losses import CrossEntropyLoss, Loss


def name_layers(layers: list[Layer]) -> None:
    """Give every unnamed layer a unique name such as ``conv2d_1``, in order."""
    seen: dict[str, int] = {}
    names = set()
    for layer in layers:
        if layer.name is None:
            base = layer.default_name
            seen[base] = seen.get(base, 0) + 1
            while f"{base}_{seen[base]}" in names or any(
                other.name == f"{base}_{seen[base]}" for other in layers
            ):
                seen[base] += 1
            layer.name = f"{base}_{seen[base]}"
        if layer.name in names:
            raise ValueError(f"layer names must be unique. Received: {layer.name!r} twice")
        names.add(layer.name)


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor a model of ``config`` holds, computed from the
    architecture alone, without allocating anything."""
    layers = [layer_from_config(spec) for spec in config["layers"]]
    name_layers(layers)
    shape = tuple(int(s) for s in config["input_shape"])
    out = {}
    for layer in layers:
        layer._check_shape(shape, f"input shape {shape} per image")
        out.update({f"{layer.name}.{k}": v for k, v in layer.param_shapes(shape).items()})
        shape = layer.output_shape(shape)
    return out


#: images per forward pass when predicting or evaluating. Pieces keep each layer's working set
#: (im2col patches, feature maps) near the CPU caches and out of fresh pages, while large enough
#: that each layer's per-call costs are spread over many images. Measured with
#: ``benchmarks/tune_inference_batch.py`` (1,000 images through predict_proba, 2 threads, medians
#: of 5), pieces of 256 against 64: LeNet-5 1.43×, the article's network 1.20×, the fashion
#: preset 1.07×, TinyVGG 0.97× (within its spread); one piece of 1,000 ran the fashion preset
#: at 0.41× and TinyVGG at 0.61×. The best size depends on the network, so a model takes as
#: many images as keep its largest feature map within :data:`INFERENCE_PIECE_BYTES`, at most
#: this many (:attr:`Sequential.inference_batch`). Measured again (same script's method,
#: 1,000 images, 2 threads): LeNet-5 and the article's network run fastest in pieces of
#: 512-1,000 (LeNet-5 16.3 ms against 18.2 for 256), TinyVGG in pieces of 64 (175 against
#: 183 ms), the fashion preset in pieces of 128-256 (271 ms; 285 for 64, 341 for 1,000).
INFERENCE_BATCH = 512
#: the largest feature map of one piece of images (see :data:`INFERENCE_BATCH`): LeNet-5 and
#: the article's network get 512 images, the fashion preset 125, TinyVGG 81
INFERENCE_PIECE_BYTES = 12 << 20


def _conv_then_batch_norm(steps, i: int) -> bool:
    """Whether step i is a convolution on its own whose output goes to a batch norm (which
    then takes its statistics from the convolution, image by image as they are written)."""
    return (
        isinstance(steps[i][0], Conv2D)
        and i + 1 < len(steps)
        and isinstance(steps[i + 1][0], BatchNorm)
    )


def _bare_conv(steps, i: int) -> bool:
    """Whether step i is a convolution with nothing fused after it (its backward pass can
    then take batch norm's input gradient as ``ops.PendingGradient``)."""
    return i >= 0 and isinstance(steps[i][0], Conv2D) and not steps[i][1] and steps[i][2] is None


def _batch_norm_then_conv(steps, i: int) -> bool:
    """Whether step i is a convolution on its own whose input came from a batch norm's step
    without pooling (the convolution's backward pass then takes batch norm's gradient sums,
    image by image as it writes them)."""
    return (
        isinstance(steps[i][0], Conv2D)
        and steps[i][2] is None
        and i > 0
        and isinstance(steps[i - 1][0], BatchNorm)
        and steps[i - 1][2] is None
    )


def _at(layers: list[Layer], i: int) -> Layer | None:
    return layers[i] if i < len(layers) else None


def _fold_batch_norm(conv: Conv2D, bn: BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """Kernels and biases of the one convolution that computes ``bn(conv(x))`` at inference."""
    p, buf = bn.params, bn.buffers
    return ops.fold_batch_norm(
        conv.params["kernel"],
        conv.params.get("bias"),
        p["gamma"],
        p["beta"],
        buf["running_mean"],
        buf["running_var"],
        bn.eps,
    )


class Sequential:
    """A stack of layers for images of ``input_shape`` (H, W, C).

    Parameters
    ----------
    layers : list of :class:`~classic_cnn.layers.Layer`
    input_shape : (H, W, C) of one image (or (D,) for vector inputs)
    seed : seeds the initialisation and dropout Generators (independent streams)
    dtype : 'float32' (default) or 'float64'
    name : the model's name
    """

    def __init__(self, layers, input_shape, seed: int | None = 0, dtype="float32", name=None):
        layers = list(layers)
        if not layers or not all(isinstance(layer, Layer) for layer in layers):
            raise ValueError(
                f"layers must be a non-empty list of Layer objects. Received: {layers!r}"
            )
        try:
            shape = tuple(int(s) for s in input_shape)
        except TypeError:
            shape = ()
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ValueError(
                f"input_shape must be (H, W, C) or (features,) of positive ints. "
                f"Received: input_shape={input_shape!r}"
            )
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64. Received: dtype={dtype!r}")
        self.layers = layers
        self.input_shape = shape
        self.seed = seed
        self.name = name or "sequential"
        #: set by training or loading: class names, and how uint8 images become inputs
        self.classes: list[str] | None = None
        self.preprocessing = None  # a classic_cnn.data.batches.Preprocessing
        self.metadata: dict = {}
        init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
        self.init_rng = np.random.default_rng(init_seq)
        self.dropout_rng = np.random.default_rng(dropout_seq)
        self._name_layers()
        self._build()

    def _name_layers(self):
        name_layers(self.layers)

    def _build(self):
        shape = self.input_shape
        largest, macs = math.prod(shape), 0
        for layer in self.layers:
            layer.build(shape, self.init_rng, self.dtype)
            if isinstance(layer, Dropout):
                layer.rng = self.dropout_rng
            macs += layer.macs(shape)
            shape = layer.output_shape(shape)
            largest = max(largest, math.prod(shape))
        self.output_shape = shape
        self._largest_map = largest
        self._macs = macs

    @property
    def inference_batch(self) -> int:
        """Images per forward pass when predicting or evaluating: as many as keep the largest
        feature map within :data:`INFERENCE_PIECE_BYTES`, between 16 and
        :data:`INFERENCE_BATCH`."""
        per_image = self._largest_map * np.dtype(self.dtype).itemsize
        return max(16, min(INFERENCE_BATCH, INFERENCE_PIECE_BYTES // per_image))

    # -- computing --------------------------------------------------------------------------
    def _as_batch(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == np.uint8 and self.preprocessing is not None:
            # raw images (N×H×W×C, 0–255): convert and normalise as in training
            from .data.batches import convert_images

            if x.ndim == 3:
                x = x[..., None]
            if x.ndim == 4:
                prep = self.preprocessing
                x = prep.apply(convert_images(x, prep.input_shape, prep.background), self.dtype)
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise ValueError(
                f"model '{self.name}' expects a batch of shape "
                f"(N, {', '.join(map(str, self.input_shape))}). Received: input shape {x.shape}"
            )
        return x.astype(self.dtype, copy=False)

    def _steps(self) -> list[tuple[Layer, bool, MaxPool2D | None]]:
        """The layers as run: ``(layer, fused, pool)``, a convolution or batch norm followed by
        a ReLU as one step (the ReLU applied as the outputs are written, and its gradient in
        the layer's backward pass: no passes of its own over the activations; the same bits,
        see ``ops.conv2d_forward``, ``ops.batchnorm_forward``), and a convolution or batch
        norm + ReLU followed by max pooling with the pooling layer in ``pool`` (each thread
        takes its images through both: ``ops.conv2d_maxpool_forward``,
        ``ops.batchnorm_maxpool_forward``). Layers run on their own (the
        explorer's activation maps) still show each layer's own output."""
        steps, i, layers = [], 0, self.layers
        while i < len(layers):
            fused = (
                isinstance(layers[i], (Conv2D, BatchNorm))
                and i + 1 < len(layers)
                and type(layers[i + 1]) is ReLU
            )
            pool = _at(layers, i + 2) if fused else None
            pool = pool if type(pool) is MaxPool2D else None
            steps.append((layers[i], fused, pool))
            i += 1 + fused + (pool is not None)
        return steps

    def forward(self, x, training: bool = False) -> np.ndarray:
        """Logits (N, classes) for a batch x (N, H, W, C)."""
        x = self._as_batch(x)
        steps = self._run_steps = self._steps()
        moments = None  # a convolution's output statistics, for the batch norm after it
        with ops.engine_threads():
            for i, (layer, fused, pool) in enumerate(steps):
                extra = {"relu": True} if fused else {}
                if pool is not None:
                    extra["pool"] = pool
                if moments is not None:
                    extra["moments"], moments = moments, None
                elif training and not extra and _conv_then_batch_norm(steps, i):
                    moments = extra["moments"] = (
                        np.empty((len(x), layer.filters)),
                        np.empty((len(x), layer.filters)),
                    )
                x = layer.forward(x, training, **extra)
        return x

    __call__ = forward

    def backward(self, dlogits: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Back-propagate dL/dlogits through every layer in reverse, filling each layer's
        gradients; returns dL/dx, or None with ``input_grad=False`` (training needs no dL/dx,
        and the first layer then skips computing it)."""
        self.layers[0].input_grad = input_grad
        d = dlogits
        steps = getattr(self, "_run_steps", None) or self._steps()
        sums = None  # the gradient sums a convolution took for the batch norm before it
        with ops.engine_threads():
            for i in reversed(range(len(steps))):
                layer, _, pool = steps[i]
                extra = {} if pool is None else {"pool": pool}
                if sums is not None:
                    extra["sums"], sums = sums, None
                elif _batch_norm_then_conv(steps, i) and layer.input_grad:
                    sums, extra["after"] = ops.batchnorm_grad_sums_taker(
                        steps[i - 1][0]._need_cache()
                    )
                if isinstance(layer, BatchNorm) and _bare_conv(steps, i - 1):
                    extra["defer"] = True  # its dx written piece by piece by the convolution
                d = layer.backward(d, **extra)
        return d

    def predict_proba(self, x, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities (softmax of the logits), N×classes, computed in pieces of
        ``batch_size`` images (default :attr:`inference_batch`)."""
        z = self.predict_logits(x, batch_size)
        return z if self.ends_in_softmax or not len(z) else _softmax(z)

    def predict_logits(self, x, batch_size: int | None = None) -> np.ndarray:
        """The logits at inference, N×classes, computed in pieces of ``batch_size`` images
        (default :attr:`inference_batch`): :meth:`forward`'s numbers (to rounding: batch norm
        after a convolution is folded into it). For back-propagation use :meth:`forward`."""
        batch_size = batch_size or self.inference_batch
        x = self._as_batch(x)
        if not len(x):
            return np.zeros((0, *self.output_shape), dtype=self.dtype)
        # the images split over the threads, each thread taking its share through the whole
        # network (the work changes hands once, not once per layer; each share stays in its
        # own core's caches from layer to layer)
        out = {}

        def share(s, e):
            out[s] = [
                self._inference_logits(x[i : min(e, i + batch_size)])
                for i in range(s, e, batch_size)
            ]

        with ops.engine_threads():
            ops.split_whole(len(x), len(x) * self._macs, share, ops.NS_PER_MAC_BLAS)
        return np.concatenate([z for s in sorted(out) for z in out[s]])

    def _inference_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits at inference, as :meth:`forward` gives them, with every batch norm that follows
        a convolution folded into it: with running statistics the pair is one convolution of
        kernels ``w·s`` and biases ``(b − mean)·s + beta``, ``s = gamma / sqrt(var + eps)``
        (the same numbers to rounding, one pass over the feature maps instead of two); a
        following ReLU and max pooling run in the same step, as in :meth:`forward`. The
        layers keep their own weights."""
        i, layers = 0, self.layers
        with ops.engine_threads():
            while i < len(layers):
                layer, j = layers[i], i + 1
                if isinstance(layer, Conv2D):  # + batch norm, folded; + ReLU; + max pooling
                    w, b = layer.params["kernel"], layer.params.get("bias")
                    if isinstance(_at(layers, j), BatchNorm):
                        w, b = _fold_batch_norm(layer, layers[j])
                        j += 1
                    relu = type(_at(layers, j)) is ReLU
                    j += relu
                    pool = _at(layers, j) if relu and type(_at(layers, j)) is MaxPool2D else None
                    if pool is not None:
                        x = ops.conv2d_maxpool_forward(
                            x,
                            w,
                            b,
                            layer.stride,
                            layer.padding,
                            relu,
                            pool.pool_size,
                            pool.stride,
                            keep=False,
                        )[0]
                        j += 1
                    else:
                        x = ops.conv2d_forward(x, w, b, layer.stride, layer.padding, relu=relu)[0]
                    i = j
                    continue
                fused = isinstance(layer, BatchNorm) and type(_at(layers, j)) is ReLU
                x = layer.forward(x, False, relu=True) if fused else layer.forward(x, False)
                i = j + fused
        return x

    def predict(self, x, batch_size: int | None = None) -> np.ndarray:
        """The most probable class index for each image."""
        return self.predict_proba(x, batch_size).argmax(axis=-1)

    @property
    def ends_in_softmax(self) -> bool:
        return isinstance(self.layers[-1], Softmax)

    def check_loss(self, loss: Loss) -> None:
        """Refuse a loss that applies softmax itself on a model that already ends in one."""
        if loss.applies_softmax and self.ends_in_softmax:
            raise ValueError(
                f"{type(loss).__name__} applies softmax to the logits itself, but model "
                f"'{self.name}' already ends in a Softmax layer: remove that layer (models end "
                f"in logits; predict_proba applies softmax)"
            )

    def train_step(self, x, y, loss: Loss, optimizer) -> float:
        """One step of training: forward, loss, backward, update. Returns the loss value."""
        self.check_loss(loss)
        value = loss.forward(self.forward(x, training=True), y)
        self.backward(loss.backward(), input_grad=False)
        optimizer.step(self.parameters(), self.gradients())
        return value

    # -- parameters ---------------------------------------------------------------------
    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable arrays by name (``"layer.param"``); updating them updates the model."""
        return {f"{lyr.name}.{k}": v for lyr in self.layers for k, v in lyr.params.items()}

    def gradients(self) -> dict[str, np.ndarray]:
        """The gradients of the last backward pass, same names as :meth:`parameters`."""
        return {f"{lyr.name}.{k}": v for lyr in self.layers for k, v in lyr.grads.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers (batch-norm running statistics): all a trained model holds."""
        sd = self.parameters()
        sd.update({f"{lyr.name}.{k}": v for lyr in self.layers for k, v in lyr.buffers.items()})
        return {k: v.copy() for k, v in sd.items()}

    def load_state_dict(self, sd: dict[str, np.ndarray]) -> None:
        """Copy arrays into the model; names and shapes must match exactly."""
        targets = {
            f"{lyr.name}.{k}": (lyr, d, k)
            for lyr in self.layers
            for d in (lyr.params, lyr.buffers)
            for k in d
        }
        missing, extra = set(targets) - set(sd), set(sd) - set(targets)
        if missing or extra:
            raise ValueError(
                f"weights do not match model '{self.name}': missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        for key, (_, d, k) in targets.items():
            value = np.asarray(sd[key])
            if value.shape != d[k].shape:
                raise ValueError(
                    f"weight {key!r} should have shape {d[k].shape}. Received: shape {value.shape}"
                )
            d[k] = value.astype(self.dtype, copy=True)

    def count_params(self) -> int:
        return int(sum(v.size for v in self.parameters().values()))

    def astype(self, dtype) -> Sequential:
        """A copy of the model (weights included) computing in ``dtype``."""
        clone = Sequential.from_config(self.get_config() | {"dtype": np.dtype(dtype).name})
        clone.load_state_dict(self.state_dict())
        return clone

    def copy(self) -> Sequential:
        return copy.deepcopy(self)

    # -- description ------------------------------------------------------------------------
    def get_config(self) -> dict:
        """Plain JSON-able data from which :meth:`from_config` rebuilds the same model."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "seed": self.seed,
            "dtype": self.dtype.name,
            "layers": [
                {"class_name": type(layer).__name__, "config": layer.get_config()}
                for layer in self.layers
            ],
        }

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        if not isinstance(config, dict) or "layers" not in config or "input_shape" not in config:
            raise ValueError(
                "a model config is a dict with 'layers' and 'input_shape'. "
                f"Received: {json.dumps(config)[:200] if isinstance(config, dict) else config!r}"
            )
        return cls(
            [layer_from_config(spec) for spec in config["layers"]],
            input_shape=tuple(config["input_shape"]),
            seed=config.get("seed", 0),
            dtype=config.get("dtype", "float32"),
            name=config.get("name"),
        )

    def summary_rows(self) -> list[dict]:
        """One dict per layer: name, type, output shape, parameters, MACs per image."""
        rows, shape = [], self.input_shape
        for layer in self.layers:
            out = layer.output_shape(shape)
            rows.append(
                {
                    "name": layer.name,
                    "type": type(layer).__name__,
                    "output_shape": out,
                    "params": int(sum(v.size for v in layer.params.values())),
                    "macs": int(layer.macs(shape)),
                }
            )
            shape = out
        return rows

    def summary(self, print_fn=print) -> str:
        """Print and return a table of each layer's output shape, parameters and MACs/image."""
        rows = self.summary_rows()
        head = ("Layer", "Type", "Output shape", "Params", "MACs/image")
        body = [
            (
                r["name"],
                r["type"],
                _fmt_shape(r["output_shape"]),
                f"{r['params']:,}",
                f"{r['macs']:,}",
            )
            for r in rows
        ]
        total = (
            "Total",
            "",
            "",
            f"{sum(r['params'] for r in rows):,}",
            f"{sum(r['macs'] for r in rows):,}",
        )
        table = [head, ("Input", "", _fmt_shape(self.input_shape), "", ""), *body, total]
        widths = [max(len(r[i]) for r in table) for i in range(5)]

        def fmt(r):
            return "  ".join(
                c.rjust(w) if i >= 3 else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()

        rule = "-" * len(fmt(head))
        lines = [f"Model: {self.name}", fmt(head), rule, *map(fmt, table[1:-1]), rule, fmt(total)]
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    def __repr__(self):
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return (
            f"Sequential(name={self.name!r}, input_shape={self.input_shape}, layers=[\n{inner}\n])"
        )


def _softmax(z):
    from .ops import softmax

    return softmax(z)


# --------------------------------------------------------------------------------------------
# Whole-model gradient check
# --------------------------------------------------------------------------------------------


class GradientCheck(list):
    """Rows of a gradient check, one per parameter (and one for the input); prints as a table."""

    @property
    def max_error(self) -> float:
        return max(r["rel_error"] for r in self)

    def __str__(self):
        lines = [f"{'layer':<16} {'param':<14} {'checked':>8} {'rel. error':>12}"]
        for r in self:
            lines.append(
                f"{r['layer']:<16} {r['param']:<14} {r['checked']:>8} {r['rel_error']:>12.3e}"
            )
        return "\n".join(lines)


def relative_error(a: np.ndarray, n: np.ndarray) -> float:
    """``max|a − n| / max(max|a|, max|n|, 1e-8)``."""
    a, n = np.asarray(a, np.float64), np.asarray(n, np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0), 1e-8)
    return float(np.abs(a - n).max(initial=0.0) / scale)


def gradient_check(
    model: Sequential,
    x,
    y,
    loss: Loss | None = None,
    eps: float = 1e-6,
    max_checks: int = 40,
    training: bool = True,
    seed: int = 0,
) -> GradientCheck:
    """Compare back-propagated gradients with central finite differences, in float64.

    A float64 copy of ``model`` is used, so the model itself is not changed. For each parameter
    (and the input) up to ``max_checks`` elements, chosen with ``seed``, are nudged by ±eps and
    ``(L(w + eps) − L(w − eps)) / 2eps`` is compared with the analytic gradient. Dropout masks are
    held fixed across the nudged passes. Returns one row per parameter with its relative error
    ``max|a − n| / max(|a|, |n|, 1e-8)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"gradient_check needs finite inputs. Received: {int(np.sum(~np.isfinite(x)))} "
            f"NaN or infinite values in x"
        )
    loss = loss or CrossEntropyLoss()
    m = model.astype(np.float64)
    m.check_loss(loss)
    dropout_state = m.dropout_rng.bit_generator.state
    bn_state = {k: v.copy() for k, v in m.state_dict().items()}

    def loss_at(xx):
        m.dropout_rng.bit_generator.state = dropout_state
        value = loss.forward(m.forward(xx, training=training), y)
        return value

    loss_at(x)
    dx = m.backward(loss.backward())
    analytic = {f"{k}": g.copy() for k, g in m.gradients().items()}
    rng = np.random.default_rng(seed)
    rows = GradientCheck()

    def check(name, arr, grad, layer, param):
        flat = arr.reshape(-1)
        idx = rng.choice(flat.size, size=min(max_checks, flat.size), replace=False)
        num = np.empty(len(idx))
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + eps
            lp = loss_at(xin)
            flat[i] = old - eps
            lm = loss_at(xin)
            flat[i] = old
            num[j] = (lp - lm) / (2 * eps)
        rows.append(
            {
                "layer": layer,
                "param": param,
                "checked": len(idx),
                "rel_error": relative_error(grad.reshape(-1)[idx], num),
            }
        )

    xin = x.copy()
    params = m.parameters()
    for name, arr in params.items():
        layer, param = name.split(".", 1)
        check(name, arr, analytic[name], layer, param)
    check("input", xin, dx, "input", "x")
    # nudged passes in training mode moved batch-norm running statistics; put them back
    m.load_state_dict(bn_state)
    return rows
