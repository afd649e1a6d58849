"""The math of a classic CNN as pure forward/backward pairs on NumPy arrays.

Every function here is a pure function of its arguments. A forward function returns
``(output, cache)``; its backward partner takes the gradient of the loss with respect to that
output and the cache, and returns the gradients with respect to the inputs and parameters.
This is the only module that plays speed tricks; ``reference.py`` holds plain loop versions
that slide the kernel exactly as a textbook describes, and the tests hold these to them.

Layout is channels-last throughout: images and feature maps are ``N×H×W×C``, convolution
kernels are ``KH×KW×C_in×C_out``, dense weights ``in×out``.

Output size of a sliding window (convolution or pooling) along one axis::

    H' = 1 + (H + pad_top + pad_bottom - KH) // stride
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

Pads = tuple[tuple[int, int], tuple[int, int]]


# --------------------------------------------------------------------------------------------
# Shapes and padding
# --------------------------------------------------------------------------------------------


def output_size(size: int, kernel: int, stride: int, pad_lo: int = 0, pad_hi: int = 0) -> int:
    """Number of window positions along one axis: ``1 + (size + pad_lo + pad_hi - kernel) //
    stride``."""
    return 1 + (size + pad_lo + pad_hi - kernel) // stride


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras's 'same' padding along one axis: the output has ``ceil(size / stride)`` positions.

    The total padding is what that output size needs; when it is odd the extra row or column
    goes at the end (bottom or right).
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve_padding(
    padding: str | int | tuple, in_hw: tuple[int, int], kernel: tuple[int, int], stride: int
) -> Pads:
    """Turn a padding spec into explicit ``((top, bottom), (left, right))`` amounts.

    ``padding`` is ``"valid"`` (none), ``"same"`` (Keras's), an int (the same on every side)
    or explicit amounts ``((top, bottom), (left, right))``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            return (
                same_padding(in_hw[0], kernel[0], stride),
                same_padding(in_hw[1], kernel[1], stride),
            )
        raise ValueError(
            f"padding must be 'valid', 'same' or an int. Received: padding={padding!r}"
        )
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return (p, p), (p, p)
    (pt, pb), (pl, pr) = padding
    return (int(pt), int(pb)), (int(pl), int(pr))


def _pad(x: np.ndarray, pads: Pads) -> np.ndarray:
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return x
    return np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))


# --------------------------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------------------------


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, pads: Pads) -> np.ndarray:
    """Gather every receptive-field patch of ``x`` into one row of a matrix.

    Parameters
    ----------
    x : (N, H, W, C) array
    kh, kw : kernel height and width
    stride : step between window positions, in both directions
    pads : ``((top, bottom), (left, right))`` zero padding

    Returns
    -------
    cols : (N, H', W', KH, KW, C) array, C-contiguous, so that
        ``cols.reshape(N*H'*W', KH*KW*C)`` is free and matches ``w.reshape(KH*KW*C, C_out)``.
    """
    n, h, w, c = x.shape
    xp = _pad(x, pads)
    oh = output_size(h, kh, stride, *pads[0])
    ow = output_size(w, kw, stride, *pads[1])
    s0, s1, s2, s3 = xp.strides
    # A read-only view whose element [n, i, j, di, dj, c] is xp[n, i*stride + di, j*stride + dj, c]
    # (no copy), then one copy that lays the patches out row by row.
    view = as_strided(
        xp, (n, oh, ow, kh, kw, c), (s0, s1 * stride, s2 * stride, s1, s2, s3), writeable=False
    )
    return np.ascontiguousarray(view)


def _im2col_offset_major(x: np.ndarray, kh: int, kw: int, stride: int, pads: Pads) -> np.ndarray:
    """The transpose of :func:`im2col`'s matrix: (KH·KW·C, N·H'·W'), one row per kernel offset.

    Built by one strided copy per kernel offset. Faster than :func:`im2col` when C is small
    (a first layer on grayscale images), where im2col's rows are made of tiny pieces.
    """
    n, h, w, c = x.shape
    xp = _pad(x, pads)
    oh = output_size(h, kh, stride, *pads[0])
    ow = output_size(w, kw, stride, *pads[1])
    cols = np.empty((kh, kw, c, n, oh, ow), dtype=x.dtype)
    for i, j, rows, colsl in _window_slices(kh, kw, stride, oh, ow):
        cols[i, j] = np.moveaxis(xp[:, rows, colsl, :], 3, 0)
    return cols.reshape(kh * kw * c, n * oh * ow)


def _window_slices(kh: int, kw: int, stride: int, oh: int, ow: int):
    """Yield ``(i, j, rows, cols)``: for each offset inside a window, the strided slices of the
    input that this offset touches across all ``oh × ow`` window positions."""
    for i in range(kh):
        rows = slice(i, i + stride * (oh - 1) + 1, stride)
        for j in range(kw):
            yield i, j, rows, slice(j, j + stride * (ow - 1) + 1, stride)


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------


def conv2d_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1, padding="valid"
) -> tuple[np.ndarray, tuple]:
    """Convolution (cross-correlation, as every CNN library computes it).

    Each output number is the sum over one receptive field of kernel × input, plus the bias:
    ``y[n, i, j, k] = b[k] + Σ_{di, dj, c} x_pad[n, i*s + di, j*s + dj, c] · w[di, dj, c, k]``.
    All of them at once: the patches as rows of a matrix (im2col) times the kernels as columns.

    Parameters
    ----------
    x : (N, H, W, C_in) input
    w : (KH, KW, C_in, C_out) kernels
    b : (C_out,) biases, or None
    stride : int
    padding : 'valid', 'same', int, or ((top, bottom), (left, right))

    Returns
    -------
    y : (N, H', W', C_out) with ``H' = 1 + (H + pad_top + pad_bottom - KH) // stride``
    cache : what :func:`conv2d_backward` needs
    """
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    pads = resolve_padding(padding, (h, wd), (kh, kw), stride)
    oh = output_size(h, kh, stride, *pads[0])
    ow = output_size(wd, kw, stride, *pads[1])
    wmat = w.reshape(kh * kw * cin, cout)
    offset_major = cin < 4
    if offset_major:
        cols_t = _im2col_offset_major(x, kh, kw, stride, pads)
        y = cols_t.T @ wmat
    else:
        cols = im2col(x, kh, kw, stride, pads).reshape(n * oh * ow, kh * kw * cin)
        y = cols @ wmat
    if b is not None:
        y += b
    cache = (
        x.shape,
        w,
        b is not None,
        stride,
        pads,
        cols_t if offset_major else cols,
        offset_major,
    )
    return y.reshape(n, oh, ow, cout), cache


def conv2d_backward(
    dy: np.ndarray, cache: tuple, input_grad: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Gradients of :func:`conv2d_forward`.

    Returns ``(dx, dw, db)`` with the shapes of ``x``, ``w`` and ``b``; ``db`` is None when the
    forward pass had no bias, ``dx`` is None when ``input_grad`` is False (a first layer needs
    none). ``dw = colsᵀ · dy``: each kernel weight collects input × output gradient over all
    positions. ``dx``: each output's gradient flows back through the kernel to every input of its
    patch, ``dx_pad[n, i*s + di, j*s + dj, :] += w[di, dj] · dy[n, i, j, :]``; overlapping patches
    add up (the adjoint of im2col, "col2im").
    """
    x_shape, w, has_bias, stride, pads, cols, offset_major = cache
    kh, kw, cin, cout = w.shape
    dy2 = dy.reshape(-1, cout)
    dw = (cols @ dy2 if offset_major else cols.T @ dy2).reshape(w.shape)
    # a column sum as a product with ones: BLAS does it ~8× faster than ndarray.sum(axis=0)
    db = np.ones(len(dy2), dtype=dy2.dtype) @ dy2 if has_bias else None
    if not input_grad:
        return None, dw, db
    n, h, wd, _ = x_shape
    (pt, pb), (pl, pr) = pads
    oh, ow = dy.shape[1], dy.shape[2]
    dxp = np.zeros((n, h + pt + pb, wd + pl + pr, cin), dtype=dy.dtype)
    # One product per kernel offset, added where that offset's inputs sit. Cheaper than
    # forming the full patch gradient and scattering it, whose rows are tiny pieces.
    for i, j, rows, colsl in _window_slices(kh, kw, stride, oh, ow):
        dxp[:, rows, colsl, :] += (dy2 @ w[i, j].T).reshape(n, oh, ow, cin)
    return dxp[:, pt : pt + h, pl : pl + wd, :], dw, db


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


def maxpool2d_forward(
    x: np.ndarray, pool_size: tuple[int, int], stride: int
) -> tuple[np.ndarray, tuple]:
    """Max pooling: each output is the largest number in its window (no padding).

    Windows may overlap (stride < pool size). Walks the offsets inside the window, each a
    strided view over all windows at once, keeping the running maximum.

    Returns ``y`` of shape (N, H', W', C) and a cache ``(x, y, pool_size, stride)``.
    """
    ph, pw = pool_size
    h, w = x.shape[1:3]
    oh, ow = output_size(h, ph, stride), output_size(w, pw, stride)
    y = None
    for _, _, rows, cols in _window_slices(ph, pw, stride, oh, ow):
        if y is None:
            y = x[:, rows, cols, :].copy()
        else:
            np.maximum(y, x[:, rows, cols, :], out=y)
    return y, (x, y, pool_size, stride)


def maxpool2d_backward(dy: np.ndarray, cache: tuple) -> np.ndarray:
    """Gradient of max pooling: each output's gradient goes to its window's winner only.

    The winner is the element equal to the window's maximum; on a tie, the first such element
    in row-major order inside the window (as ``np.argmax`` picks it) takes the whole gradient.
    """
    x, y, (ph, pw), stride = cache
    oh, ow = dy.shape[1], dy.shape[2]
    dx = np.zeros(x.shape, dtype=dy.dtype)
    taken = np.zeros(y.shape, dtype=bool)  # windows whose winner is already found
    tiled = stride >= ph and stride >= pw  # windows do not overlap: assign, no need to add
    for _, _, rows, cols in _window_slices(ph, pw, stride, oh, ow):
        won = x[:, rows, cols, :] == y
        won &= ~taken
        taken |= won
        if tiled:
            np.multiply(dy, won, out=dx[:, rows, cols, :])
        else:
            dx[:, rows, cols, :] += dy * won
    return dx


def avgpool2d_forward(
    x: np.ndarray, pool_size: tuple[int, int], stride: int
) -> tuple[np.ndarray, tuple]:
    """Average pooling: each output is the mean of its window (no padding)."""
    ph, pw = pool_size
    n, h, w, c = x.shape
    oh, ow = output_size(h, ph, stride), output_size(w, pw, stride)
    y = np.zeros((n, oh, ow, c), dtype=x.dtype)
    for _, _, rows, cols in _window_slices(ph, pw, stride, oh, ow):
        y += x[:, rows, cols, :]
    y *= x.dtype.type(1.0 / (ph * pw))
    return y, (x.shape, pool_size, stride)


def avgpool2d_backward(dy: np.ndarray, cache: tuple) -> np.ndarray:
    """Gradient of average pooling: each window shares its output's gradient equally."""
    x_shape, (ph, pw), stride = cache
    oh, ow = dy.shape[1], dy.shape[2]
    share = dy * dy.dtype.type(1.0 / (ph * pw))
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for _, _, rows, cols in _window_slices(ph, pw, stride, oh, ow):
        dx[:, rows, cols, :] += share
    return dx


# --------------------------------------------------------------------------------------------
# Fully connected
# --------------------------------------------------------------------------------------------


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, tuple]:
    """Fully connected layer: ``y = x · w + b`` with x (N, in), w (in, out), b (out,)."""
    y = x @ w
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def dense_backward(dy: np.ndarray, cache: tuple):
    """Returns ``(dx, dw, db)``: ``dx = dy · wᵀ``, ``dw = xᵀ · dy``, ``db = Σ_n dy``."""
    x, w, has_bias = cache
    return dy @ w.T, x.T @ dy, (dy.sum(axis=0) if has_bias else None)


# --------------------------------------------------------------------------------------------
# Activations (each backward takes what its forward cached)
# --------------------------------------------------------------------------------------------


def relu_forward(x):
    """ReLU: ``max(x, 0)``. Its gradient at exactly 0 is taken as 0."""
    y = np.maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    return dy * (y > 0)


def leaky_relu_forward(x, alpha: float = 0.01):
    """Leaky ReLU: ``x`` where positive, ``alpha·x`` elsewhere."""
    pos = x > 0
    return np.where(pos, x, x * x.dtype.type(alpha)), (pos, alpha)


def leaky_relu_backward(dy, cache):
    pos, alpha = cache
    return np.where(pos, dy, dy * dy.dtype.type(alpha))


def elu_forward(x, alpha: float = 1.0):
    """ELU: ``x`` where positive, ``alpha·(eˣ − 1)`` elsewhere."""
    a = x.dtype.type(alpha)
    neg = a * np.expm1(np.minimum(x, 0))
    return np.where(x > 0, x, neg), (x > 0, neg, a)


def elu_backward(dy, cache):
    pos, neg, a = cache
    return np.where(pos, dy, dy * (neg + a))


def sigmoid(x):
    """Numerically stable logistic function ``1 / (1 + e⁻ˣ)``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def sigmoid_forward(x):
    y = sigmoid(x)
    return y, y


def sigmoid_backward(dy, y):
    return dy * y * (1 - y)


def tanh_forward(x):
    y = np.tanh(x)
    return y, y


def tanh_backward(dy, y):
    return dy * (1 - y * y)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax ``e^{z_k} / Σ_j e^{z_j}``, shifted by the maximum so that large logits do not
    overflow."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log softmax(z)`` computed as ``z - max - log Σ e^{z - max}``: finite for logits of ±1e4."""
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_forward(x):
    y = softmax(x)
    return y, y


def softmax_backward(dy, y):
    """Jacobian-vector product of softmax: ``y ⊙ (dy − Σ_k dy_k y_k)``."""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# Batch normalisation and dropout
# --------------------------------------------------------------------------------------------


def batchnorm_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
):
    """Batch normalisation over every axis but the last (channels), PyTorch's conventions.

    Training: normalise with the batch's mean and biased variance, and update the running
    statistics in place: ``running ← (1 − momentum)·running + momentum·batch`` with the
    *unbiased* batch variance. Inference: normalise with the running statistics.

    Returns ``(y, cache)``; ``y = gamma · (x − mean) / sqrt(var + eps) + beta``.
    """
    axes = tuple(range(x.ndim - 1))
    if training:
        m = x.size // x.shape[-1]
        mean = x.mean(axis=axes)
        xc = x - mean
        var = (xc * xc).mean(axis=axes)
        unbiased = var * (m / max(m - 1, 1))
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * unbiased
    else:
        xc = x - running_mean
        var = running_var
    inv_std = (1.0 / np.sqrt(var + eps)).astype(x.dtype, copy=False)
    xhat = xc * inv_std
    y = xhat * gamma + beta
    return y, (xhat, gamma, inv_std, training, axes)


def batchnorm_backward(dy: np.ndarray, cache: tuple):
    """Returns ``(dx, dgamma, dbeta)``.

    In training the batch statistics depend on every input, which gives the compact form
    ``dx = inv_std · (dxhat − mean(dxhat) − xhat · mean(dxhat · xhat))``.
    """
    xhat, gamma, inv_std, training, axes = cache
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dxhat = dy * gamma
    if not training:
        return dxhat * inv_std, dgamma, dbeta
    m = dy.size // dy.shape[-1]
    dx = inv_std * (dxhat - dbeta * gamma / m - xhat * (dgamma * gamma / m))
    return dx, dgamma, dbeta


def dropout_forward(x: np.ndarray, rate: float, rng: np.random.Generator, training: bool):
    """Inverted dropout: in training each element is zeroed with probability ``rate`` and the
    survivors are scaled by ``1 / (1 − rate)``, so nothing changes at inference."""
    if not training or rate == 0:
        return x, None
    keep = rng.random(x.shape, dtype=np.float64) >= rate
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - rate))
    return x * mask, mask


def dropout_backward(dy: np.ndarray, mask):
    return dy if mask is None else dy * mask
