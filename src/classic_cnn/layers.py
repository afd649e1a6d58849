"""Layers: thin classes over the pure functions of ``ops.py``.

A layer stores its constructor arguments, creates its parameters in :meth:`Layer.build` once
the input shape is known, keeps what backward needs during :meth:`Layer.forward`, and fills
``self.grads`` (same keys as ``self.params``) in :meth:`Layer.backward`. Shapes given to and
returned by :meth:`Layer.output_shape` are per image, without the batch axis: ``(H, W, C)``
for feature maps, ``(D,)`` for vectors.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import ops
from .init import INITIALIZERS, initialize


def _fmt_shape(shape) -> str:
    return "×".join(str(s) for s in shape)


def _pair(value, arg: str, allow_zero: bool = False) -> tuple[int, int]:
    """Validate an int or (int, int) argument such as kernel_size."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    ok = (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair)
        and all(v >= (0 if allow_zero else 1) for v in pair)
    )
    if not ok:
        need = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{arg} must be a {need} int or a pair of them. Received: {arg}={value!r}")
    return int(pair[0]), int(pair[1])


def _positive_int(value, arg: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{arg} must be a positive int. Received: {arg}={value!r}")
    return int(value)


class Layer:
    """Base class. Subclasses set ``default_name`` and implement the forward/backward pair."""

    default_name = "layer"
    #: number of axes per image this layer accepts (3 for H×W×C, 1 for vectors, None for any)
    input_rank: int | None = None

    def __init__(self, name: str | None = None):
        self.name = name
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}  # state that is saved but not trained
        self.input_shape: tuple[int, ...] | None = None
        #: False when nothing needs dL/dx (a model's first layer while training): layers that
        #: can skip that work return None from backward
        self.input_grad = True
        self._cache = None

    # -- building ---------------------------------------------------------------------------
    def build(self, input_shape: tuple[int, ...], rng: np.random.Generator, dtype) -> None:
        """Create parameters for a per-image ``input_shape``; checks the shape first."""
        input_shape = tuple(int(s) for s in input_shape)
        self._check_shape(input_shape, f"input shape {input_shape} per image")
        self.input_shape = input_shape
        self._build(input_shape, rng, np.dtype(dtype))

    def _build(self, input_shape, rng, dtype) -> None:
        pass

    def _check_shape(self, shape: tuple[int, ...], received: str) -> None:
        """Raise ValueError naming the expected and the received shape."""
        if self.input_rank is not None and len(shape) != self.input_rank:
            want = "(H, W, C)" if self.input_rank == 3 else "(features,)"
            raise ValueError(
                f"{self._label()} expects each input to have shape {want}. Received: {received}"
            )

    def _label(self) -> str:
        return f"{type(self).__name__} layer '{self.name or self.default_name}'"

    def _check_input(self, x: np.ndarray) -> None:
        if not isinstance(x, np.ndarray) or x.ndim < 2:
            raise ValueError(
                f"{self._label()} expects a batch of inputs as an array (N, ...). "
                f"Received: {type(x).__name__} of shape {getattr(x, 'shape', None)}"
            )
        if self.input_rank is not None and x.ndim != self.input_rank + 1:
            want = "(N, H, W, C)" if self.input_rank == 3 else "(N, features)"
            hint = "; put a Flatten layer before it" if self.input_rank == 1 else ""
            raise ValueError(
                f"{self._label()} expects a batch of shape {want}{hint}. "
                f"Received: input shape {x.shape}"
            )
        if self.input_shape is None:  # used on its own: build from the first input
            self.build(x.shape[1:], np.random.default_rng(0), x.dtype)
            return
        self._check_shape(tuple(x.shape[1:]), f"input shape {x.shape}")

    # -- computing ----------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(input_shape)

    def macs(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates per image."""
        return 0

    def param_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters and buffers this layer would create, without creating them
        (a model file's tensors are checked against these before anything is allocated)."""
        return {}

    # -- description ------------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> Layer:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def _need_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{self._label()}: backward() called before forward()")
        return self._cache


class Conv2D(Layer):
    """2-D convolution: ``filters`` kernels of ``kernel_size × C_in`` slide over the input.

    Parameters
    ----------
    filters : number of kernels, i.e. of output feature maps (C_out)
    kernel_size : int or (KH, KW)
    stride : int ≥ 1, the same in both directions
    padding : 'valid' (no padding), 'same' (Keras's: output ceil(H / stride), the odd extra
        row/column at the bottom/right) or an int ≥ 0 of zeros on every side
    use_bias : add one bias per kernel
    kernel_initializer : 'he_normal', 'he_uniform', 'glorot_normal', 'glorot_uniform' or
        'fan_in_uniform'

    Input (N, H, W, C_in) → output (N, H', W', filters) with
    ``H' = 1 + (H + pad_top + pad_bottom − KH) // stride``. Params: ``kernel`` (KH, KW, C_in,
    filters) and ``bias`` (filters,).
    """

    default_name = "conv2d"
    input_rank = 3

    def __init__(
        self,
        filters: int,
        kernel_size,
        stride: int = 1,
        padding="valid",
        use_bias: bool = True,
        kernel_initializer: str = "he_normal",
        name: str | None = None,
    ):
        super().__init__(name)
        self.filters = _positive_int(filters, "filters")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _positive_int(stride, "stride")
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(
                    f"padding must be 'valid', 'same' or a non-negative int. "
                    f"Received: padding={padding!r}"
                )
        elif not isinstance(padding, numbers.Integral) or isinstance(padding, bool) or padding < 0:
            raise ValueError(
                "padding must be 'valid', 'same' or a non-negative int. "
                f"Received: padding={padding!r}"
            )
        else:
            padding = int(padding)
        self.padding = padding
        self.use_bias = bool(use_bias)
        if kernel_initializer not in INITIALIZERS:
            raise ValueError(
                f"kernel_initializer must be one of {INITIALIZERS}. "
                f"Received: kernel_initializer={kernel_initializer!r}"
            )
        self.kernel_initializer = kernel_initializer

    def pads(self, in_hw: tuple[int, int]) -> ops.Pads:
        """Explicit ``((top, bottom), (left, right))`` padding for an input of size ``in_hw``."""
        return ops.resolve_padding(self.padding, in_hw, self.kernel_size, self.stride)

    def _check_shape(self, shape, received):
        super()._check_shape(shape, received)
        h, w, c = shape
        if self.input_shape is not None and c != self.input_shape[2]:
            raise ValueError(
                f"{self._label()} expects {self.input_shape[2]} input channels "
                f"(input shape (N, H, W, {self.input_shape[2]})). Received: {received}"
            )
        (pt, pb), (pl, pr) = self.pads((h, w))
        kh, kw = self.kernel_size
        if h + pt + pb < kh or w + pl + pr < kw:
            raise ValueError(
                f"{self._label()}: the input is smaller than the {kh}×{kw} kernel "
                f"(padding {self.padding!r}). Received: {received}"
            )

    def _build(self, input_shape, rng, dtype):
        kh, kw = self.kernel_size
        shape = (kh, kw, input_shape[2], self.filters)
        self.params["kernel"] = initialize(self.kernel_initializer, shape, rng, dtype)
        if self.use_bias:
            self.params["bias"] = np.zeros(self.filters, dtype=dtype)

    def output_shape(self, input_shape):
        h, w, _ = input_shape
        (pt, pb), (pl, pr) = self.pads((h, w))
        kh, kw = self.kernel_size
        return (
            ops.output_size(h, kh, self.stride, pt, pb),
            ops.output_size(w, kw, self.stride, pl, pr),
            self.filters,
        )

    def param_shapes(self, input_shape):
        kh, kw = self.kernel_size
        shapes = {"kernel": (kh, kw, input_shape[-1], self.filters)}
        return shapes | ({"bias": (self.filters,)} if self.use_bias else {})

    def macs(self, input_shape):
        oh, ow, _ = self.output_shape(input_shape)
        kh, kw = self.kernel_size
        return oh * ow * self.filters * kh * kw * input_shape[2]

    def forward(self, x, training=False, relu=False, pool=None, moments=None):
        """``relu=True``: also apply the ReLU that follows, in the same pass (``Sequential``
        does so; :meth:`backward` then takes the gradient through both). ``pool``: the
        :class:`MaxPool2D` layer after that ReLU, run in the same step (its own cache filled
        as its forward pass fills it); the pooled output is returned. ``moments``: two
        (N, filters) float64 arrays to fill with each output image's statistics for the
        batch norm that follows (see ``ops.conv2d_forward``)."""
        self._check_input(x)
        w, b = self.params["kernel"], self.params.get("bias")
        if pool is not None:
            y, self._cache, pool._cache = ops.conv2d_maxpool_forward(
                x, w, b, self.stride, self.padding, relu, pool.pool_size, pool.stride
            )
            return y
        extra = {"relu": True} if relu else {}
        if moments is not None:
            extra["moments"] = moments
        y, self._cache = ops.conv2d_forward(x, w, b, self.stride, self.padding, **extra)
        return y

    def backward(self, dy, pool=None, after=None):
        """``pool``: the pooling layer run in the same forward step; dy is then the gradient
        of its output. ``after(dx, s, e)``: run as images s..e of dx are finished (the
        gradient sums of the batch norm before, see ``ops.conv2d_backward``)."""
        if pool is not None:
            dx, dw, db = ops.conv2d_maxpool_backward(
                dy, self._need_cache(), pool._need_cache(), self.input_grad
            )
        else:
            dx, dw, db = ops.conv2d_backward(dy, self._need_cache(), self.input_grad, after)
        self.grads["kernel"] = dw
        if self.use_bias:
            self.grads["bias"] = db
        return dx

    def get_config(self):
        kh, kw = self.kernel_size
        return {
            "filters": self.filters,
            "kernel_size": [kh, kw],
            "stride": self.stride,
            "padding": self.padding,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
            "name": self.name,
        }


class _Pool2D(Layer):
    """Shared checks of the pooling layers: a window of ``pool_size`` moved by ``stride``."""

    input_rank = 3

    def __init__(self, pool_size=2, stride: int | None = None, name: str | None = None):
        super().__init__(name)
        self.pool_size = _pair(pool_size, "pool_size")
        if stride is None:
            if self.pool_size[0] != self.pool_size[1]:
                raise ValueError(
                    f"stride must be given for a non-square pool_size. "
                    f"Received: pool_size={pool_size!r}, stride=None"
                )
            stride = self.pool_size[0]
        self.stride = _positive_int(stride, "stride")

    def _check_shape(self, shape, received):
        super()._check_shape(shape, received)
        h, w, _ = shape
        ph, pw = self.pool_size
        if h < ph or w < pw:
            raise ValueError(
                f"{self._label()}: the input is smaller than the {ph}×{pw} window. "
                f"Received: {received}"
            )

    def output_shape(self, input_shape):
        h, w, c = input_shape
        ph, pw = self.pool_size
        return ops.output_size(h, ph, self.stride), ops.output_size(w, pw, self.stride), c

    def get_config(self):
        return {"pool_size": list(self.pool_size), "stride": self.stride, "name": self.name}


class MaxPool2D(_Pool2D):
    """Max pooling: keep the largest number of each window (2×2 stride 2, 3×3 stride 1, 3×3
    stride 2, any window and stride; no padding).

    ``stride`` defaults to the window size. Ties: the first maximum in row-major order within
    the window receives the whole gradient; the others get none.
    """

    default_name = "max_pool2d"

    def forward(self, x, training=False):
        self._check_input(x)
        y, self._cache = ops.maxpool2d_forward(x, self.pool_size, self.stride)
        return y

    def backward(self, dy):
        return ops.maxpool2d_backward(dy, self._need_cache())


class AvgPool2D(_Pool2D):
    """Average pooling: the mean of each window; the gradient is shared equally."""

    default_name = "avg_pool2d"

    def forward(self, x, training=False):
        self._check_input(x)
        y, self._cache = ops.avgpool2d_forward(x, self.pool_size, self.stride)
        return y

    def backward(self, dy):
        return ops.avgpool2d_backward(dy, self._need_cache())


class Flatten(Layer):
    """(N, H, W, C) → (N, H·W·C), in channels-last (row-major) order."""

    default_name = "flatten"

    def forward(self, x, training=False):
        self._check_input(x)
        self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._need_cache())

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


class Dense(Layer):
    """Fully connected layer: every output is a weighted sum of all inputs plus a bias.

    Input (N, in) → output (N, units). Params: ``kernel`` (in, units), ``bias`` (units,).
    """

    default_name = "dense"
    input_rank = 1

    def __init__(
        self,
        units: int,
        use_bias: bool = True,
        kernel_initializer: str = "he_normal",
        name: str | None = None,
    ):
        super().__init__(name)
        self.units = _positive_int(units, "units")
        self.use_bias = bool(use_bias)
        if kernel_initializer not in INITIALIZERS:
            raise ValueError(
                f"kernel_initializer must be one of {INITIALIZERS}. "
                f"Received: kernel_initializer={kernel_initializer!r}"
            )
        self.kernel_initializer = kernel_initializer

    def _check_shape(self, shape, received):
        if len(shape) != 1:
            raise ValueError(
                f"{self._label()} expects (N, features) inputs; put a Flatten layer before it. "
                f"Received: {received}"
            )
        if self.input_shape is not None and shape != self.input_shape:
            raise ValueError(
                f"{self._label()} expects {self.input_shape[0]} input features. "
                f"Received: {received}"
            )

    def _build(self, input_shape, rng, dtype):
        shape = (input_shape[0], self.units)
        self.params["kernel"] = initialize(self.kernel_initializer, shape, rng, dtype)
        if self.use_bias:
            self.params["bias"] = np.zeros(self.units, dtype=dtype)

    def output_shape(self, input_shape):
        return (self.units,)

    def param_shapes(self, input_shape):
        shapes = {"kernel": (input_shape[0], self.units)}
        return shapes | ({"bias": (self.units,)} if self.use_bias else {})

    def macs(self, input_shape):
        return input_shape[0] * self.units

    def forward(self, x, training=False):
        self._check_input(x)
        y, self._cache = ops.dense_forward(x, self.params["kernel"], self.params.get("bias"))
        return y

    def backward(self, dy):
        dx, dw, db = ops.dense_backward(dy, self._need_cache())
        self.grads["kernel"] = dw
        if self.use_bias:
            self.grads["bias"] = db
        return dx

    def get_config(self):
        return {
            "units": self.units,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
            "name": self.name,
        }


class Dropout(Layer):
    """Inverted dropout: while training, zero each element with probability ``rate`` and scale
    the rest by ``1 / (1 − rate)``; at inference, pass the input through unchanged.

    The random masks come from ``self.rng``, which a model replaces with its dropout
    Generator so that one seed decides every mask.
    """

    default_name = "dropout"

    def __init__(self, rate: float, seed: int | None = None, name: str | None = None):
        super().__init__(name)
        if not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be a number in [0, 1). Received: rate={rate!r}")
        self.rate = float(rate)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def forward(self, x, training=False):
        self._check_input(x)
        y, self._cache = ops.dropout_forward(x, self.rate, self.rng, training)
        return y

    def backward(self, dy):
        return ops.dropout_backward(dy, self._cache)

    def get_config(self):
        return {"rate": self.rate, "seed": self.seed, "name": self.name}


class BatchNorm(Layer):
    """Batch normalisation of each channel (conv inputs N×H×W×C) or feature (dense inputs N×D).

    Training normalises with the batch's statistics and updates running statistics
    (``running ← 0.9·running + 0.1·batch``, unbiased variance); inference uses the running
    statistics. Params: ``gamma`` (scale), ``beta`` (shift); buffers: ``running_mean``,
    ``running_var``.
    """

    default_name = "batch_norm"

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, name: str | None = None):
        super().__init__(name)
        if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1]. Received: momentum={momentum!r}")
        if not isinstance(eps, numbers.Real) or eps <= 0:
            raise ValueError(f"eps must be a positive number. Received: eps={eps!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)

    def _check_shape(self, shape, received):
        if len(shape) not in (1, 3):
            raise ValueError(
                f"{self._label()} expects (N, H, W, C) or (N, features) inputs. "
                f"Received: {received}"
            )
        if self.input_shape is not None and shape[-1] != self.input_shape[-1]:
            raise ValueError(
                f"{self._label()} expects {self.input_shape[-1]} channels. Received: {received}"
            )

    def param_shapes(self, input_shape):
        c = (input_shape[-1],)
        return {"gamma": c, "beta": c, "running_mean": c, "running_var": c}

    def _build(self, input_shape, rng, dtype):
        c = input_shape[-1]
        self.params["gamma"] = np.ones(c, dtype=dtype)
        self.params["beta"] = np.zeros(c, dtype=dtype)
        self.buffers["running_mean"] = np.zeros(c, dtype=dtype)
        self.buffers["running_var"] = np.ones(c, dtype=dtype)

    def forward(self, x, training=False, relu=False, pool=None, moments=None):
        """``relu=True``: also apply the ReLU that follows, in the same pass (``Sequential``
        does so; :meth:`backward` then takes the gradient through both). ``pool``: the
        :class:`MaxPool2D` layer after that ReLU, run in the same step (its own cache filled
        as its forward pass fills it); the pooled output is returned. ``moments``: x's
        per-image statistics, taken by the convolution that wrote x (see
        ``ops.batchnorm_forward``)."""
        self._check_input(x)
        args = (
            x,
            self.params["gamma"],
            self.params["beta"],
            self.buffers["running_mean"],
            self.buffers["running_var"],
            training,
            self.momentum,
            self.eps,
        )
        if pool is not None:
            y, self._cache, pool._cache = ops.batchnorm_maxpool_forward(
                *args, pool.pool_size, pool.stride, moments=moments
            )
            return y
        extra = {"relu": True} if relu else {}
        if moments is not None:
            extra["moments"] = moments
        y, self._cache = ops.batchnorm_forward(*args, **extra)
        return y

    def backward(self, dy, pool=None, sums=None, defer=False):
        """``pool``: the pooling layer run in the same forward step; dy is then the gradient
        of its output. ``sums``: dy's sums, taken by the convolution's backward pass that
        wrote dy (see ``ops.batchnorm_grad_sums_taker``). ``defer``: return dx as an
        ``ops.PendingGradient``, for the convolution before to write piece by piece."""
        if pool is not None:
            dx, dgamma, dbeta = ops.batchnorm_maxpool_backward(
                dy, self._need_cache(), pool._need_cache(), defer
            )
        else:
            dx, dgamma, dbeta = ops.batchnorm_backward(dy, self._need_cache(), sums, defer)
        self.grads["gamma"], self.grads["beta"] = dgamma, dbeta
        return dx

    def get_config(self):
        return {"momentum": self.momentum, "eps": self.eps, "name": self.name}


class _Activation(Layer):
    """An element-wise function; subclasses name the ops pair."""

    _forward = staticmethod(ops.relu_forward)
    _backward = staticmethod(ops.relu_backward)

    def forward(self, x, training=False):
        self._check_input(x)
        y, self._cache = self._forward(x)
        return y

    def backward(self, dy):
        return self._backward(dy, self._need_cache())


class ReLU(_Activation):
    """``max(x, 0)``."""

    default_name = "relu"


class Sigmoid(_Activation):
    """``1 / (1 + e⁻ˣ)``."""

    default_name = "sigmoid"
    _forward = staticmethod(ops.sigmoid_forward)
    _backward = staticmethod(ops.sigmoid_backward)


class Tanh(_Activation):
    """``tanh(x)``."""

    default_name = "tanh"
    _forward = staticmethod(ops.tanh_forward)
    _backward = staticmethod(ops.tanh_backward)


class Softmax(_Activation):
    """Softmax over the last axis: turns scores into probabilities that sum to 1.

    Models trained here end in logits (losses apply softmax themselves); use this layer only
    for a model whose output must be probabilities, and train it with no softmax in the loss.
    """

    default_name = "softmax"
    _forward = staticmethod(ops.softmax_forward)
    _backward = staticmethod(ops.softmax_backward)


class LeakyReLU(_Activation):
    """``x`` where positive, ``alpha·x`` elsewhere."""

    default_name = "leaky_relu"

    def __init__(self, alpha: float = 0.01, name: str | None = None):
        super().__init__(name)
        if not isinstance(alpha, numbers.Real) or alpha < 0:
            raise ValueError(f"alpha must be a non-negative number. Received: alpha={alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x, training=False):
        self._check_input(x)
        y, self._cache = ops.leaky_relu_forward(x, self.alpha)
        return y

    def backward(self, dy):
        return ops.leaky_relu_backward(dy, self._need_cache())

    def get_config(self):
        return {"alpha": self.alpha, "name": self.name}


class ELU(LeakyReLU):
    """``x`` where positive, ``alpha·(eˣ − 1)`` elsewhere."""

    default_name = "elu"

    def __init__(self, alpha: float = 1.0, name: str | None = None):
        super().__init__(alpha, name)

    def forward(self, x, training=False):
        self._check_input(x)
        y, self._cache = ops.elu_forward(x, self.alpha)
        return y

    def backward(self, dy):
        return ops.elu_backward(dy, self._need_cache())


LAYERS: dict[str, type[Layer]] = {
    cls.__name__: cls
    for cls in (
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
}


def layer_from_config(spec: dict) -> Layer:
    """Rebuild a layer from ``{"class_name": ..., "config": {...}}``."""
    if not isinstance(spec, dict) or "class_name" not in spec:
        raise ValueError(
            f"a layer spec is a dict with 'class_name' and 'config'. Received: {spec!r}"
        )
    name = spec["class_name"]
    if name not in LAYERS:
        raise ValueError(
            f"unknown layer class {name!r}; known: {', '.join(sorted(LAYERS))}. "
            f"Received: class_name={name!r}"
        )
    config = dict(spec.get("config", {}))
    if "kernel_size" in config and isinstance(config["kernel_size"], list):
        config["kernel_size"] = tuple(config["kernel_size"])
    if "pool_size" in config and isinstance(config["pool_size"], list):
        config["pool_size"] = tuple(config["pool_size"])
    try:
        return LAYERS[name].from_config(config)
    except TypeError as exc:
        raise ValueError(f"bad config for layer {name!r}: {exc}. Received: {config!r}") from None
