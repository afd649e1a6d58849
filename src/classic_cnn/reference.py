"""Plain loop versions of convolution and pooling, written as the textbook describes them.

A kernel slides over the (padded) input; at each position it multiplies element-wise with the
patch under it and sums the products into one number of the feature map. These loops are slow
on purpose: they are the definition. The fast functions in ``ops.py`` are held to them by the
tests, and the explain pictures use them to show the arithmetic of a single number. Dropout's
mask is defined here too, as NumPy arithmetic on counters.
"""

from __future__ import annotations

import numpy as np

from .ops import Pads, output_size, resolve_padding


def pad_input(x: np.ndarray, pads: Pads) -> np.ndarray:
    """Surround each (N, H, W, C) image with zeros: ``((top, bottom), (left, right))``."""
    (pt, pb), (pl, pr) = pads
    n, h, w, c = x.shape
    out = np.zeros((n, h + pt + pb, w + pl + pr, c), dtype=x.dtype)
    out[:, pt : pt + h, pl : pl + w, :] = x
    return out


def conv2d_forward(x, w, b, stride=1, padding="valid"):
    """Slide each of the C_out kernels (KH×KW×C_in) over the input; one number per position.

    Returns the (N, H', W', C_out) feature maps.
    """
    n, h, wd, _ = x.shape
    kh, kw, _, cout = w.shape
    pads = resolve_padding(padding, (h, wd), (kh, kw), stride)
    xp = pad_input(x, pads)
    oh = output_size(h, kh, stride, *pads[0])
    ow = output_size(wd, kw, stride, *pads[1])
    y = np.zeros((n, oh, ow, cout), dtype=x.dtype)
    for img in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = xp[img, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
                for k in range(cout):
                    total = np.sum(patch * w[:, :, :, k])  # multiply element-wise, then sum
                    y[img, i, j, k] = total + (b[k] if b is not None else 0)
    return y


def conv2d_backward(dy, x, w, stride=1, padding="valid"):
    """Chain rule through every multiply of the forward loop.

    Each output ``y[n,i,j,k]`` used ``patch · w[..., k]``, so it sends ``dy[n,i,j,k] · w[..., k]``
    back to the patch and ``dy[n,i,j,k] · patch`` to the kernel. Returns ``(dx, dw, db)``.
    """
    n, h, wd, _ = x.shape
    kh, kw, _, cout = w.shape
    pads = resolve_padding(padding, (h, wd), (kh, kw), stride)
    xp = pad_input(x, pads)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    db = np.zeros(cout, dtype=x.dtype)
    oh, ow = dy.shape[1], dy.shape[2]
    for img in range(n):
        for i in range(oh):
            for j in range(ow):
                r, c = i * stride, j * stride
                patch = xp[img, r : r + kh, c : c + kw, :]
                for k in range(cout):
                    g = dy[img, i, j, k]
                    dw[:, :, :, k] += g * patch
                    dxp[img, r : r + kh, c : c + kw, :] += g * w[:, :, :, k]
                    db[k] += g
    (pt, _), (pl, _) = pads
    return dxp[:, pt : pt + h, pl : pl + wd, :], dw, db


def _pool_windows(x, pool_size, stride):
    ph, pw = pool_size
    n, h, w, c = x.shape
    oh, ow = output_size(h, ph, stride), output_size(w, pw, stride)
    for img in range(n):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    window = x[img, i * stride : i * stride + ph, j * stride : j * stride + pw, ch]
                    yield (img, i, j, ch), window, (oh, ow)


def maxpool2d_forward(x, pool_size, stride):
    """Each output is the largest number in its window."""
    n, h, w, c = x.shape
    ph, pw = pool_size
    y = np.zeros((n, output_size(h, ph, stride), output_size(w, pw, stride), c), dtype=x.dtype)
    for idx, window, _ in _pool_windows(x, pool_size, stride):
        y[idx] = window.max()
    return y


def maxpool2d_backward(dy, x, pool_size, stride):
    """The gradient goes to the window's winner: the first maximum in row-major order."""
    dx = np.zeros_like(x)
    pw = pool_size[1]
    for (img, i, j, ch), window, _ in _pool_windows(x, pool_size, stride):
        a = int(np.argmax(window))
        dx[img, i * stride + a // pw, j * stride + a % pw, ch] += dy[img, i, j, ch]
    return dx


def avgpool2d_forward(x, pool_size, stride):
    """Each output is the mean of its window."""
    n, h, w, c = x.shape
    ph, pw = pool_size
    y = np.zeros((n, output_size(h, ph, stride), output_size(w, pw, stride), c), dtype=x.dtype)
    for idx, window, _ in _pool_windows(x, pool_size, stride):
        y[idx] = window.mean()
    return y


def avgpool2d_backward(dy, x, pool_size, stride):
    """Every element of a window gets an equal share of its output's gradient."""
    dx = np.zeros_like(x)
    ph, pw = pool_size
    for (img, i, j, ch), _, _ in _pool_windows(x, pool_size, stride):
        dx[img, i * stride : i * stride + ph, j * stride : j * stride + pw, ch] += dy[
            img, i, j, ch
        ] / (ph * pw)
    return dx


SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea and Flood 2014) on uint64 counters: a bijection
    whose outputs behave as independent uniform 64-bit numbers."""
    z = z.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_keep(key: int, size: int, rate: float) -> np.ndarray:
    """Which of ``size`` elements dropout keeps for one draw ``key``: element t draws the
    uniform number u = (splitmix64(key + (t + 1)·γ) >> 32) / 2³² (the splitmix64 stream seeded
    with ``key``), and is kept where u ≥ rate, i.e. where the 32 high bits reach
    ``dropout_threshold(rate)``. Every element's draw depends on its index alone, so any thread
    can compute any part of the mask, in the forward pass and again in the backward pass."""
    with np.errstate(over="ignore"):
        t = np.arange(1, size + 1, dtype=np.uint64)
        h = splitmix64(np.uint64(key) + t * SPLITMIX_GAMMA)
    return (h >> np.uint64(32)) >= dropout_threshold(rate)


def dropout_threshold(rate: float) -> np.uint64:
    """The least 32-bit draw that dropout keeps: ⌈rate·2³²⌉."""
    return np.uint64(np.ceil(rate * 2.0**32))
