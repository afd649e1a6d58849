"""Compiled loops (numba) behind the fast paths of ``ops.py``; nothing else imports this module.

Why compiled code: the benchmark showed that NumPy alone cannot keep up with PyTorch on small
classic networks. A 5×5 convolution over one or six channels is a matrix product with a
tiny inner dimension, and every way of writing it with NumPy calls (im2col copies, one product
per kernel offset, strided adds) spends its time moving short runs of memory. Each loop below
does one operation in one pass, with its innermost loop long and contiguous so that the compiler
vectorizes it.

The "wide row" trick of the stride-1 convolution: the padded input of one image is kept
channels-first, ``xp[c]`` a flat array of ``Hp·Wp`` numbers. Output ``(i, j)`` reads
``xp[c][(i + di)·Wp + (j + dj)]`` = ``xp[c][t + di·Wp + dj]`` with ``t = i·Wp + j``. Computing
every ``t`` from 0 to ``(H' − 1)·Wp + W'`` (the columns ``j ≥ W'`` are thrown away) turns the
convolution into, per kernel offset, one long multiply-add over contiguous memory.

Threads: each loop runs on the thread that calls it, without holding Python's GIL
(``nogil``), so that ``ops.py`` can run pieces of one batch on several threads at once (see
``ops.engine_threads``). Not numba's own ``prange``: measured (benchmark, 2 threads, LeNet-5
training batch 64), the same loops split over images with ``prange`` ran 0.14x PyTorch, serial
1.04x: numba's OpenMP pool, OpenBLAS's and PyTorch's spin-wait for work, and on two cores
pools of spinning threads starve each other (``OMP_WAIT_POLICY=PASSIVE`` confirms it: 1.57x).

Determinism: every output number is computed in a fixed order; a weight gradient is summed per
image, and the per-image sums are added in image order (the layout a parallel version would
need too). Compiled code is cached on disk (``cache=True``): the first
call in a fresh environment compiles (see README, "Speed"); later processes load it.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Reductions (sums of products) are vectorized only if the compiler may reorder the additions;
# the order is then fixed by the compiled code, so results stay bit-identical run to run.
_REDUCE = {"reassoc", "contract", "nsz", "arcp"}
#: multiply-adds fused into one rounding (FMA) where the CPU has it; nothing reordered
_CONTRACT = {"contract"}


@njit(cache=True, nogil=True)
def _tap_offsets(kh, kw, wp):
    """Where each kernel offset ``(di, dj)``, in row-major order, starts in a wide row."""
    offs = np.empty(kh * kw, dtype=np.int64)
    for di in range(kh):
        for dj in range(kw):
            offs[di * kw + dj] = di * wp + dj
    return offs


@njit(cache=True, nogil=True)
def _pad_wide(x, n, pt, pl, wp, xp):
    """Image n of x (H, W, C) into xp (C, Hp·Wp), channels first, inside its zero border (the
    border of xp is never written, so it stays as the caller zeroed it)."""
    h, wd, c_in = x.shape[1], x.shape[2], x.shape[3]
    if c_in == 1:  # a row is contiguous: a loop that vectorizes (measured 1.4 → 0.22 µs, 28×28)
        for r in range(h):
            src, dst = x[n, r, :, 0], xp[0, (r + pt) * wp + pl : (r + pt) * wp + pl + wd]
            for col in range(wd):
                dst[col] = src[col]
        return
    for r in range(h):
        for col in range(wd):
            base = (r + pt) * wp + col + pl
            for c in range(c_in):
                xp[c, base] = x[n, r, col, c]


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def _wide_accumulate(xp, wt, offs, b, k0, k1, span, acc):
    """The sums of :func:`conv2d_s1_forward` for one image: ``acc[k - k0, t]`` = ``b[k]`` plus
    every tap's product, over the wide rows ``t`` of the padded image ``xp`` (C, Hp·Wp)."""
    c_in, nt = xp.shape[0], offs.shape[0]
    for k in range(k0, k1):
        acc[k - k0, :] = b[k]
    for c in range(c_in):
        src = xp[c]
        q = 0
        while q + 4 <= nt and nt - q != 5:
            s0, s1 = src[offs[q] : offs[q] + span], src[offs[q + 1] : offs[q + 1] + span]
            s2, s3 = (
                src[offs[q + 2] : offs[q + 2] + span],
                src[offs[q + 3] : offs[q + 3] + span],
            )
            k = k0
            while k + 3 <= k1:
                w0, w1, w2, w3 = wt[q, c, k], wt[q + 1, c, k], wt[q + 2, c, k], wt[q + 3, c, k]
                v0, v1 = wt[q, c, k + 1], wt[q + 1, c, k + 1]
                v2, v3 = wt[q + 2, c, k + 1], wt[q + 3, c, k + 1]
                u0, u1 = wt[q, c, k + 2], wt[q + 1, c, k + 2]
                u2, u3 = wt[q + 2, c, k + 2], wt[q + 3, c, k + 2]
                a, a2, a3 = acc[k - k0], acc[k + 1 - k0], acc[k + 2 - k0]
                for t in range(span):
                    p0, p1, p2, p3 = s0[t], s1[t], s2[t], s3[t]
                    a[t] += w0 * p0 + w1 * p1 + w2 * p2 + w3 * p3
                    a2[t] += v0 * p0 + v1 * p1 + v2 * p2 + v3 * p3
                    a3[t] += u0 * p0 + u1 * p1 + u2 * p2 + u3 * p3
                k += 3
            while k < k1:
                w0, w1, w2, w3 = wt[q, c, k], wt[q + 1, c, k], wt[q + 2, c, k], wt[q + 3, c, k]
                a = acc[k - k0]
                for t in range(span):
                    a[t] += w0 * s0[t] + w1 * s1[t] + w2 * s2[t] + w3 * s3[t]
                k += 1
            q += 4
        if nt - q == 5:  # five taps left (5×5 and 3×3 kernels): one pass, not 4 + 1
            s0, s1 = src[offs[q] : offs[q] + span], src[offs[q + 1] : offs[q + 1] + span]
            s2, s3 = (
                src[offs[q + 2] : offs[q + 2] + span],
                src[offs[q + 3] : offs[q + 3] + span],
            )
            s4 = src[offs[q + 4] : offs[q + 4] + span]
            k = k0
            while k + 3 <= k1:
                w0, w1, w2, w3 = wt[q, c, k], wt[q + 1, c, k], wt[q + 2, c, k], wt[q + 3, c, k]
                v0, v1 = wt[q, c, k + 1], wt[q + 1, c, k + 1]
                v2, v3 = wt[q + 2, c, k + 1], wt[q + 3, c, k + 1]
                u0, u1 = wt[q, c, k + 2], wt[q + 1, c, k + 2]
                u2, u3 = wt[q + 2, c, k + 2], wt[q + 3, c, k + 2]
                w4, v4, u4 = wt[q + 4, c, k], wt[q + 4, c, k + 1], wt[q + 4, c, k + 2]
                a, a2, a3 = acc[k - k0], acc[k + 1 - k0], acc[k + 2 - k0]
                for t in range(span):
                    p0, p1, p2, p3, p4 = s0[t], s1[t], s2[t], s3[t], s4[t]
                    a[t] += w0 * p0 + w1 * p1 + w2 * p2 + w3 * p3 + w4 * p4
                    a2[t] += v0 * p0 + v1 * p1 + v2 * p2 + v3 * p3 + v4 * p4
                    a3[t] += u0 * p0 + u1 * p1 + u2 * p2 + u3 * p3 + u4 * p4
                k += 3
            while k < k1:
                w0, w1, w2, w3 = wt[q, c, k], wt[q + 1, c, k], wt[q + 2, c, k], wt[q + 3, c, k]
                w4 = wt[q + 4, c, k]
                a = acc[k - k0]
                for t in range(span):
                    a[t] += w0 * s0[t] + w1 * s1[t] + w2 * s2[t] + w3 * s3[t] + w4 * s4[t]
                k += 1
            q += 5
        while q < nt:  # the last taps, one at a time
            # slice first: an index from range() alone lets the loop vectorize
            s = src[offs[q] : offs[q] + span]
            for k in range(k0, k1):
                wv = wt[q, c, k]
                a = acc[k - k0]
                for t in range(span):
                    a[t] += wv * s[t]
            q += 1


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def conv2d_s1_forward(x, w, b, pt, pb, pl, pr, y, k0, k1, relu):
    """Stride-1 convolution: ``y[n, i, j, k] = b[k] + Σ x_pad[n, i+di, j+dj, c]·w[di, dj, c, k]``
    for the kernels ``k0 ≤ k < k1`` (each output's sum is the same whichever range it is in);
    with ``relu``, the ReLU that follows applied as y is written (a NaN stays NaN).

    x (N, H, W, C), w (KH, KW, C, K), b (K,) (zeros when the layer has no bias), y (N, H', W', K)
    written in place.

    Blocking: each pass over the accumulators adds four kernel offsets ("taps") of three kernels
    at once (the last pass five taps where five are left), so that a number read from the wide
    row serves three kernels and an accumulator is loaded and stored once per four taps instead
    of once per tap; the multiply-adds are fused where the CPU has FMA (``_CONTRACT``: each
    output's sum is still one fixed sequence of operations). The outputs are then written
    row by row, one kernel at a time (a row of y stays in the L1 cache while the kernels'
    accumulators are read in order). Measured against one tap and one kernel per pass with
    outputs written position by position (1 thread, interleaved medians, batch 64): LeNet-5's
    first convolution 1.8× faster, the article's 1.8×, TinyVGG's first and second 1.7× and
    1.8×, the fashion preset's first (batch 128, 32 kernels) 1.4×, with two kernels per pass
    and no fused multiply-adds; three kernels and fused multiply-adds took a further 20% off
    LeNet-5's and 25% off the article's (Xeon, AVX-512, batch 500).
    """
    n_img, h, wd, c_in = x.shape
    kh, kw = w.shape[0], w.shape[1]
    oh, ow = y.shape[1], y.shape[2]
    hp, wp = h + pt + pb, wd + pl + pr
    span = (oh - 1) * wp + ow
    zero = np.zeros(1, dtype=x.dtype)[0]
    nt = kh * kw
    offs = _tap_offsets(kh, kw, wp)
    wt = w.reshape(nt, c_in, w.shape[3])
    xp = np.zeros((c_in, hp * wp), dtype=x.dtype)
    acc = np.empty((k1 - k0, span), dtype=x.dtype)
    for n in range(n_img):
        _pad_wide(x, n, pt, pl, wp, xp)
        _wide_accumulate(xp, wt, offs, b, k0, k1, span, acc)
        for i in range(oh):
            yr = y[n, i]
            for k in range(k0, k1):
                a = acc[k - k0, i * wp : i * wp + ow]
                if relu:
                    for j in range(ow):
                        v = a[j]
                        yr[j, k] = zero if v < zero else v
                else:
                    for j in range(ow):
                        yr[j, k] = a[j]


@njit(cache=True, nogil=True, fastmath=_REDUCE)
def conv2d_s1_backward(x, w, dy, y, relu, pt, pb, pl, pr, dw_parts, db_parts, dx, input_grad):
    """Gradients of :func:`conv2d_s1_forward`, per image; with ``relu`` (forward fused with its
    ReLU, y its output), dy counts only where ``y > 0``.

    dw_parts (N, KH, KW, C, K) and db_parts (N, K) receive each image's share of dw and db
    (summed by the caller in image order); dx (N, H, W, C) is written when ``input_grad``.

    Blocking as in the forward pass: a kernel weight's gradient is a sum over positions of
    input × output gradient, and one pass computes eight of them (four taps × two kernels)
    from four input rows and two gradient rows; dx adds four kernels' contributions per pass.
    The output gradient is laid out kernel by kernel, one output row at a time. Per image,
    the eight-sum pass measured 1.7× faster than one sum per pass on the fashion preset's first
    layer; the whole backward pass is dominated by reading dy and y (memory), so its gain is
    smaller (see the benchmark).
    """
    n_img, h, wd, c_in = x.shape
    kh, kw, _, c_out = w.shape
    oh, ow = dy.shape[1], dy.shape[2]
    hp, wp = h + pt + pb, wd + pl + pr
    span = (oh - 1) * wp + ow
    zero = np.zeros(1, dtype=x.dtype)[0]  # a 0 of x's dtype: float32 sums stay float32
    nt = kh * kw
    offs = _tap_offsets(kh, kw, wp)
    wt = w.reshape(nt, c_in, c_out)
    xp = np.zeros((c_in, hp * wp), dtype=x.dtype)
    # dy of one image in the same wide layout; the thrown-away columns hold zeros
    g = np.zeros((c_out, span), dtype=x.dtype)
    dxp = np.empty((c_in, hp * wp), dtype=x.dtype)
    row = np.empty(ow * c_out, dtype=x.dtype)
    for n in range(n_img):
        _pad_wide(x, n, pt, pl, wp, xp)
        for i in range(oh):
            # the ReLU's choice over a contiguous row first, where it vectorizes: taken per
            # number while transposing, it was a branch the CPU mispredicted half the time
            # (LeNet-5's first layer, batch 64: 1.57 → 0.53 ms for the whole backward pass)
            dyr = dy[n, i].ravel()
            if relu:
                yr = y[n, i].ravel()
                for u in range(ow * c_out):
                    row[u] = dyr[u] if yr[u] > zero else zero
            else:
                row[:] = dyr
            for k in range(c_out):
                gk = g[k, i * wp : i * wp + ow]
                for j in range(ow):
                    gk[j] = row[j * c_out + k]
        for k in range(c_out):
            s = zero
            gk = g[k]
            for t in range(span):
                s += gk[t]
            db_parts[n, k] = s
        dwn = dw_parts[n].reshape(nt, c_in, c_out)
        for c in range(c_in):
            src = xp[c]
            q = 0
            while q + 4 <= nt:
                x0, x1 = src[offs[q] : offs[q] + span], src[offs[q + 1] : offs[q + 1] + span]
                x2, x3 = (
                    src[offs[q + 2] : offs[q + 2] + span],
                    src[offs[q + 3] : offs[q + 3] + span],
                )
                k = 0
                while k + 2 <= c_out:
                    g0, g1 = g[k], g[k + 1]
                    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zero
                    for t in range(span):
                        u, v = g0[t], g1[t]
                        p0, p1, p2, p3 = x0[t], x1[t], x2[t], x3[t]
                        a0 += p0 * u
                        a1 += p1 * u
                        a2 += p2 * u
                        a3 += p3 * u
                        b0 += p0 * v
                        b1 += p1 * v
                        b2 += p2 * v
                        b3 += p3 * v
                    dwn[q, c, k], dwn[q + 1, c, k], dwn[q + 2, c, k], dwn[q + 3, c, k] = (
                        a0,
                        a1,
                        a2,
                        a3,
                    )
                    dwn[q, c, k + 1], dwn[q + 1, c, k + 1] = b0, b1
                    dwn[q + 2, c, k + 1], dwn[q + 3, c, k + 1] = b2, b3
                    k += 2
                if k < c_out:
                    g0 = g[k]
                    a0 = a1 = a2 = a3 = zero
                    for t in range(span):
                        u = g0[t]
                        a0 += x0[t] * u
                        a1 += x1[t] * u
                        a2 += x2[t] * u
                        a3 += x3[t] * u
                    dwn[q, c, k], dwn[q + 1, c, k], dwn[q + 2, c, k], dwn[q + 3, c, k] = (
                        a0,
                        a1,
                        a2,
                        a3,
                    )
                q += 4
            while q < nt:
                xs = src[offs[q] : offs[q] + span]
                for k in range(c_out):
                    gk = g[k]
                    s = zero
                    for t in range(span):
                        s += xs[t] * gk[t]
                    dwn[q, c, k] = s
                q += 1
        if input_grad:
            dxp[:, :] = zero
            for c in range(c_in):
                dst = dxp[c]
                for q in range(nt):
                    d = dst[offs[q] : offs[q] + span]
                    k = 0
                    while k + 4 <= c_out:
                        w0, w1, w2, w3 = (
                            wt[q, c, k],
                            wt[q, c, k + 1],
                            wt[q, c, k + 2],
                            wt[q, c, k + 3],
                        )
                        g0, g1, g2, g3 = g[k], g[k + 1], g[k + 2], g[k + 3]
                        for t in range(span):
                            d[t] += w0 * g0[t] + w1 * g1[t] + w2 * g2[t] + w3 * g3[t]
                        k += 4
                    while k < c_out:
                        wv = wt[q, c, k]
                        gk = g[k]
                        for t in range(span):
                            d[t] += wv * gk[t]
                        k += 1
            for r in range(h):
                for col in range(wd):
                    base = (r + pt) * wp + col + pl
                    for c in range(c_in):
                        dx[n, r, col, c] = dxp[c, base]


@njit(cache=True, nogil=True)
def maxpool2d_forward(x, ph, pw, stride, y, arg):
    """Max pooling; ``arg[n, i, j, c]`` = the winner's row-major index inside its window (the
    first maximum on a tie, as ``np.argmax`` picks it: only a strictly larger value replaces it).

    (Measured: this scalar loop beats one with the channels innermost, 0.40 against 1.2 ms for
    LeNet's first pooling at batch 64: the running maxima then stay in registers.)
    """
    n_img, _, _, ch = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for n in range(n_img):
        for i in range(oh):
            for j in range(ow):
                r0, c0 = i * stride, j * stride
                for c in range(ch):
                    best = x[n, r0, c0, c]
                    a = 0
                    for di in range(ph):
                        for dj in range(pw):
                            v = x[n, r0 + di, c0 + dj, c]
                            if v > best:
                                best = v
                                a = di * pw + dj
                    y[n, i, j, c] = best
                    arg[n, i, j, c] = a


@njit(cache=True, nogil=True)
def maxpool2d_backward(dy, arg, pw, stride, dx):
    """Each output's gradient added to its window's winner; dx must start at zero."""
    n_img, oh, ow, ch = dy.shape
    for n in range(n_img):
        for i in range(oh):
            for j in range(ow):
                for c in range(ch):
                    a = arg[n, i, j, c]
                    dx[n, i * stride + a // pw, j * stride + a % pw, c] += dy[n, i, j, c]


@njit(cache=True, nogil=True)
def maxpool2x2_forward(x, stride, y, arg):
    """:func:`maxpool2d_forward` for 2×2 windows (any stride), the same numbers and winners.

    The four taps of a window are four rows of C channels; the channel loop then runs over
    contiguous memory with the maxima in registers, and vectorizes. Measured against the loop
    above (1 thread, float32): LeNet's first pooling (batch 64, 28×28×6) 0.43 → 0.15 ms, the
    fashion preset's first (batch 128, 28×28×32) 7.2 → 0.6 ms. (Any window size written this
    way, its running maxima in arrays instead of registers, lost at 6 channels: 0.45 ms.)
    """
    n_img, _, _, ch = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for n in range(n_img):
        for i in range(oh):
            r0 = i * stride
            for j in range(ow):
                c0 = j * stride
                p00, p01 = x[n, r0, c0], x[n, r0, c0 + 1]
                p10, p11 = x[n, r0 + 1, c0], x[n, r0 + 1, c0 + 1]
                yy, aa = y[n, i, j], arg[n, i, j]
                for c in range(ch):
                    best = p00[c]
                    a = 0
                    v = p01[c]
                    if v > best:
                        best = v
                        a = 1
                    v = p10[c]
                    if v > best:
                        best = v
                        a = 2
                    v = p11[c]
                    if v > best:
                        best = v
                        a = 3
                    yy[c] = best
                    aa[c] = a


@njit(cache=True, nogil=True)
def conv2d_s1_maxpool_forward(
    x, w, b, pt, pb, pl, pr, relu, out, keep, chunk, ph, pw, stride, y, arg
):
    """:func:`conv2d_s1_forward` (all kernels) then max pooling (``ph × pw`` windows, any
    stride) into y and arg, ``chunk`` images at a time: images a..c are convolved into
    ``out[a:c]`` (``keep``: out is the whole feature map) or into the start of ``out`` (a
    scratch array of ``chunk`` images), and pooled from there while they are in the cache.
    One call for a thread's whole share, so that the thread stays in compiled code, off
    Python's GIL, from chunk to chunk."""
    n, k = x.shape[0], w.shape[3]
    for a in range(0, n, chunk):
        c = min(n, a + chunk)
        dst = out[a:c] if keep else out[: c - a]
        conv2d_s1_forward(x[a:c], w, b, pt, pb, pl, pr, dst, 0, k, relu)
        if ph == 2 and pw == 2:
            maxpool2x2_forward(dst, stride, y[a:c], arg[a:c])
        else:
            maxpool2d_forward(dst, ph, pw, stride, y[a:c], arg[a:c])


@njit(cache=True, nogil=True)
def conv2d_s1_pooled(x, w, b, pt, pb, pl, pr, relu, oh, ow, ph, pw, stride, y):
    """:func:`conv2d_s1_forward` then max pooling (``ph × pw`` windows, any stride) into y, for
    inference: each window's maximum is taken straight from the image's sums in the wide rows,
    so that the convolution's output is never written (nor the winners, which only the backward
    pass needs). The same numbers as the two steps apart: every value is the same fused sum,
    the ReLU is applied to each before the comparisons, and the comparisons run in the same
    order as :func:`maxpool2d_forward`'s (a NaN in a window's first place wins, elsewhere it
    loses). Measured (LeNet-5's first convolution and pooling, batch 500, 1 thread, Xeon
    AVX-512): 5.0 ms through the feature map, 3.4 ms this way."""
    n_img, h, wd, c_in = x.shape
    kh, kw, k_out = w.shape[0], w.shape[1], w.shape[3]
    hp, wp = h + pt + pb, wd + pl + pr
    span = (oh - 1) * wp + ow
    zero = np.zeros(1, dtype=x.dtype)[0]
    nt = kh * kw
    offs = _tap_offsets(kh, kw, wp)
    wt = w.reshape(nt, c_in, k_out)
    xp = np.zeros((c_in, hp * wp), dtype=x.dtype)
    poh, pow_ = y.shape[1], y.shape[2]
    # the common case (2×2 windows at stride 2, ReLU): the windows starting at every column c
    # of the even rows 2i, g[k, i·wp + c], in loops over c that vectorize (the comparisons
    # of the odd columns and of the wide rows' extra columns are thrown away: twice the work,
    # 2.6× faster than the windows alone, whose stride of 2 kept the loop scalar)
    common = ph == 2 and pw == 2 and stride == 2 and relu
    acc = np.zeros((k_out, max(span, 2 * poh * wp + 1)), dtype=x.dtype)
    g = np.empty((k_out, poh * wp), dtype=x.dtype)
    for n in range(n_img):
        _pad_wide(x, n, pt, pl, wp, xp)
        _wide_accumulate(xp, wt, offs, b, 0, k_out, span, acc)
        if common:
            for k in range(k_out):
                for i in range(poh):
                    a = acc[k, 2 * i * wp : 2 * i * wp + 2 * wp + 1]
                    gk = g[k, i * wp : i * wp + wp]
                    for c in range(wp):
                        best, v1, v2, v3 = a[c], a[c + 1], a[c + wp], a[c + wp + 1]
                        # the ReLU of the first only: once best ≥ +0 (or NaN), a negative
                        # v never wins, as its ReLU (+0) would not: same result
                        best = zero if best < zero else best
                        best = v1 if v1 > best else best
                        best = v2 if v2 > best else best
                        gk[c] = v3 if v3 > best else best
            for i in range(poh):
                for j in range(pow_):
                    yy, m = y[n, i, j], i * wp + 2 * j
                    for k in range(k_out):
                        yy[k] = g[k, m]
            continue
        for k in range(k_out):
            a = acc[k]
            for i in range(poh):
                yr, r0 = y[n, i], i * stride * wp
                for j in range(pow_):
                    t = r0 + j * stride
                    best = a[t]
                    if relu:
                        best = zero if best < zero else best
                    for di in range(ph):
                        for dj in range(pw):
                            v = a[t + di * wp + dj]
                            if relu:
                                v = zero if v < zero else v
                            best = v if v > best else best
                    yr[j, k] = best


@njit(cache=True, nogil=True)
def maxpool2x2s2_backward(dy, arg, dx):
    """:func:`maxpool2d_backward` for 2×2 windows at stride 2, which do not overlap: every
    element of dx is written once, its window's gradient or 0 (no zeroed dx needed, no
    scatter). dx rows and columns past the last window are zeroed.

    Measured against zeroing and scattering (1 thread, float32): LeNet's first pooling
    0.24 → 0.14 ms, the fashion preset's first 3.0 → 1.0 ms.
    """
    n_img, oh, ow, ch = dy.shape
    h, w = dx.shape[1], dx.shape[2]
    zero = np.zeros(1, dtype=dx.dtype)[0]
    for n in range(n_img):
        for i in range(oh):
            for di in range(2):
                r = 2 * i + di
                k0 = 2 * di
                for j in range(ow):
                    g, aa = dy[n, i, j], arg[n, i, j]
                    d0, d1 = dx[n, r, 2 * j], dx[n, r, 2 * j + 1]
                    for c in range(ch):
                        v = g[c]
                        a = aa[c]
                        d0[c] = v if a == k0 else zero
                        d1[c] = v if a == k0 + 1 else zero
                for col in range(2 * ow, w):
                    for c in range(ch):
                        dx[n, r, col, c] = zero
        for r in range(2 * oh, h):
            for col in range(w):
                for c in range(ch):
                    dx[n, r, col, c] = zero


@njit(cache=True, nogil=True)
def im2col(x, kh, kw, stride, pt, pl, oh, ow, cols):
    """Patches of x (N, H, W, C), zero-padded by ``pt`` rows on top and ``pl`` columns on the
    left (and as many at the bottom and right as the output size needs), as the rows of cols
    (N·H'·W', KH·KW·C). The padding is never materialised: positions outside x read as 0.

    Each (image, output position, kernel row) is one contiguous run of KW·C numbers in both.
    """
    n_img, h, wd, c_in = x.shape
    run = kw * c_in
    flat = x.reshape(n_img, h, wd * c_in)
    if pt == 0 and pl == 0 and (oh - 1) * stride + kh <= h and (ow - 1) * stride + kw <= wd:
        # every patch inside x ("valid"): plain copies, no bounds to test (LeNet-5's second
        # convolution, 17 images on 1 thread: 4.0 → 3.05 µs per image)
        xf, cf = x.reshape(-1), cols.reshape(-1)
        patch, line = kh * run, wd * c_in
        for n in range(n_img):
            for i in range(oh):
                for j in range(ow):
                    q = ((n * oh + i) * ow + j) * patch
                    p = (n * h + i * stride) * line + j * stride * c_in
                    for di in range(kh):
                        src = xf[p + di * line : p + di * line + run]
                        dst = cf[q + di * run : q + di * run + run]
                        for t in range(run):
                            dst[t] = src[t]
        return
    for n in range(n_img):
        for i in range(oh):
            for j in range(ow):
                row = cols[(n * oh + i) * ow + j]
                c0 = j * stride - pl
                lo = max(0, -c0) * c_in  # the part of each run inside x: [lo, hi)
                hi = min(kw, wd - c0) * c_in
                for di in range(kh):
                    r = i * stride - pt + di
                    base = di * run
                    if r < 0 or r >= h or hi <= lo:
                        for t in range(run):
                            row[base + t] = 0
                        continue
                    for t in range(lo):
                        row[base + t] = 0
                    # both sides sliced first, the copy indexed from 0: 4× faster (measured:
                    # the compiler then sees two plain contiguous runs and vectorizes)
                    src = flat[n, r, c0 * c_in + lo : c0 * c_in + hi]
                    dst = row[base + lo : base + hi]
                    for t in range(hi - lo):
                        dst[t] = src[t]
                    for t in range(hi, run):
                        row[base + t] = 0


@njit(cache=True, nogil=True)
def col2im(dcols, kh, kw, stride, pt, pl, oh, ow, dx):
    """The adjoint of :func:`im2col`: each patch row of dcols added back where it came from,
    into dx (N, H, W, C), which must start at zero; the parts of a patch in the padding are
    dropped."""
    n_img, h, wd, c_in = dx.shape
    run = kw * c_in
    flat = dx.reshape(n_img, h, wd * c_in)
    for n in range(n_img):
        for i in range(oh):
            for j in range(ow):
                row = dcols[(n * oh + i) * ow + j]
                c0 = j * stride - pl
                lo = max(0, -c0) * c_in
                hi = min(kw, wd - c0) * c_in
                if hi <= lo:
                    continue
                for di in range(kh):
                    r = i * stride - pt + di
                    if r < 0 or r >= h:
                        continue
                    dst = flat[n, r, c0 * c_in + lo : c0 * c_in + hi]
                    src = row[di * run + lo : di * run + hi]
                    for t in range(hi - lo):
                        dst[t] += src[t]


# --------------------------------------------------------------------------------------------
# Winograd F(2×2, 3×3): the stride-1 3×3 convolution with 2.25× fewer multiplications
# --------------------------------------------------------------------------------------------
# Each 2×2 block ("tile") of outputs reads a 4×4 block d of the padded input. Winograd's
# minimal filtering writes the tile as Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A, with
#   Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
#   G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]],  Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]:
# 16 products per tile and channel pair instead of 36. Summed over the input channels, the
# 16 element-wise products become 16 matrix products (tiles × C_in)·(C_in × C_out), done by
# BLAS. The loops below are the transforms (and the output transform's adjoint, for the
# kernels' gradient), each vectorized along the channels (contiguous in NHWC). Each loop
# touches at most a dozen rows: with more, the compiler gives up vectorizing (it cannot prove
# that so many rows do not overlap). Every number is computed in one fixed order, so results
# are bit-identical run to run.
#
# Layouts: V (16, T, C_in) and M (16, T, C_out), T the tiles of a piece of images, tile
# t = ((n - s)·TH + a)·TW + b covering outputs (2a..2a+1, 2b..2b+1) of image n.


@njit(cache=True, nogil=True, inline="always")
def _wino_in_tile(
    d00, d01, d02, d03, d10, d11, d12, d13, d20, d21, d22, d23, d30, d31, d32, d33, v, t, c
):
    """``v[:, t, c] = Bᵀ d B`` for one tile's 4×4 input block d: rows of Bᵀ d are d0 − d2,
    d1 + d2, d2 − d1, d1 − d3; a row (t0..t3) times B is (t0 − t2, t1 + t2, t2 − t1, t1 − t3).
    Sixteen numbers in, sixteen out, all in registers."""
    t00, t01, t02, t03 = d00 - d20, d01 - d21, d02 - d22, d03 - d23
    t10, t11, t12, t13 = d10 + d20, d11 + d21, d12 + d22, d13 + d23
    t20, t21, t22, t23 = d20 - d10, d21 - d11, d22 - d12, d23 - d13
    t30, t31, t32, t33 = d10 - d30, d11 - d31, d12 - d32, d13 - d33
    v[0, t, c], v[1, t, c], v[2, t, c], v[3, t, c] = t00 - t02, t01 + t02, t02 - t01, t01 - t03
    v[4, t, c], v[5, t, c], v[6, t, c], v[7, t, c] = t10 - t12, t11 + t12, t12 - t11, t11 - t13
    v[8, t, c], v[9, t, c], v[10, t, c], v[11, t, c] = t20 - t22, t21 + t22, t22 - t21, t21 - t23
    v[12, t, c], v[13, t, c] = t30 - t32, t31 + t32
    v[14, t, c], v[15, t, c] = t32 - t31, t31 - t33


@njit(cache=True, nogil=True)
def _zero(a):
    """Every number of the C-contiguous array a set to 0."""
    flat = a.reshape(-1)
    for k in range(flat.size):
        flat[k] = 0


@njit(cache=True, nogil=True)
def _copy_block(src, r0, c0, dst, d0, e0, rows, cols):
    """``dst[d0:d0+rows, e0:e0+cols] = src[r0:r0+rows, c0:c0+cols]`` for (H, W, C) arrays, one
    contiguous run of cols·C numbers per row (numba's own slice assignment goes number by
    number)."""
    run = cols * src.shape[2]
    for r in range(rows):
        a = src[r0 + r].reshape(-1)[c0 * src.shape[2] : c0 * src.shape[2] + run]
        b = dst[d0 + r].reshape(-1)[e0 * dst.shape[2] : e0 * dst.shape[2] + run]
        for k in range(run):
            b[k] = a[k]


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def winograd_input(x, s, e, pt, pl, th, tw, v, xp):
    """``v[:, t] = Bᵀ d B`` for every tile t of images s..e of x (N, H, W, C), d its 4×4
    input block (zeros in the padding: pt rows on top, pl columns on the left).

    Each image is first copied into the zero-padded scratch image xp (2·TH + 2, 2, TW + 1, C),
    its even columns apart from its odd ones: tile b reads columns 2b..2b+3, that is even and
    odd columns b and b + 1, so that along a row of tiles every input lies at a fixed offset
    from the output (output ``f = b·C + c``, inputs ``f`` and ``f + C`` of a row's even and
    odd halves). Row i of Bᵀ d (from two input rows) times B is then one loop over a whole
    row of tiles and channels: long, and vectorized (four outputs and eight inputs, few
    enough for the compiler to check that they do not overlap). The arrays are indexed flat,
    with unsigned offsets: no array views made in the loops (each costs more than a short
    loop), and no index that might be negative (numba would wrap it around, and the
    compiler then gathers the numbers one by one). Measured against one loop per tile along
    the channels, on the fashion preset's second convolution (28×28×32): 1.7× faster, copy
    included. Scratch arrays come from the caller."""
    h, wd, c_in = x.shape[1], x.shape[2], x.shape[3]
    _zero(xp)
    rows, cols = min(h, 2 * th + 2 - pt), min(wd, 2 * tw + 2 - pl)  # what the tiles read
    one = np.ones(1, dtype=x.dtype)[0]  # the signs in x's own type (no float64 detour)
    xf, pf, vf = x.reshape(-1), xp.reshape(-1), v.reshape(-1)
    c = np.uint64(c_in)
    half = np.uint64(tw + 1) * c  # one parity of one padded row
    row = half + half
    run, plane = np.uint64(tw) * c, np.uint64(v.shape[1]) * c
    for n in range(s, e):
        for r in range(rows):  # columns q of the image, of each parity, one after another
            for par in range(2):
                q0 = (par - pl) % 2
                src = np.uint64((n * h + r) * wd + q0) * c
                dst = np.uint64((2 * (pt + r) + par) * (tw + 1) + (pl + q0) // 2) * c
                for j in range((cols - q0 + 1) // 2):
                    d, sj = dst + np.uint64(j) * c, src + np.uint64(2 * j) * c
                    for k in range(c):
                        pf[d + k] = xf[sj + k]
        for a in range(th):
            t0 = np.uint64(((n - s) * th + a) * tw) * c
            for i in range(4):  # rows of Bᵀ d: d0 − d2, d1 + d2, d2 − d1, d1 − d3
                if i == 0:
                    ra, rb, sg = 0, 2, -one
                elif i == 1:
                    ra, rb, sg = 1, 2, one
                elif i == 2:
                    ra, rb, sg = 2, 1, -one
                else:
                    ra, rb, sg = 1, 3, -one
                ea, eb = np.uint64(2 * a + ra) * row, np.uint64(2 * a + rb) * row
                oa, ob = ea + half, eb + half  # the odd columns
                ea1, eb1, oa1, ob1 = ea + c, eb + c, oa + c, ob + c  # column pairs b + 1
                o0 = np.uint64(4 * i) * plane + t0
                o1, o2, o3 = o0 + plane, o0 + plane + plane, o0 + plane + plane + plane
                for f in range(run):
                    t_0 = pf[ea + f] + sg * pf[eb + f]
                    t_1 = pf[oa + f] + sg * pf[ob + f]
                    t_2 = pf[ea1 + f] + sg * pf[eb1 + f]
                    t_3 = pf[oa1 + f] + sg * pf[ob1 + f]
                    vf[o0 + f] = t_0 - t_2
                    vf[o1 + f] = t_1 + t_2
                    vf[o2 + f] = t_2 - t_1
                    vf[o3 + f] = t_1 - t_3


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def winograd_output(m, s, e, th, tw, b, relu, y):
    """Images s..e of y (N, H', W', K) from M: each tile's Aᵀ M A plus the bias b (K,), with
    ``relu`` the ReLU applied as it is written (a NaN stays NaN, as ``np.maximum`` keeps
    it). Rows of Aᵀ M are M0 + (M1 + M2) and M1 − (M2 + M3), and a row (s0..s3) times A is
    (s0 + s1 + s2, s1 − s2 − s3). A row of tiles at a time, each output row in one loop
    along the channels (vectorized); a tile half past the edge (H' or W' odd) writes its
    inside outputs only."""
    oh, ow, k_out = y.shape[1], y.shape[2], y.shape[3]
    zero = np.zeros(1, dtype=y.dtype)[0]
    one = np.ones(1, dtype=y.dtype)[0]
    full = ow // 2  # tiles with both columns inside
    for n in range(s, e):
        for a in range(th):
            t0 = ((n - s) * th + a) * tw
            i = 2 * a
            for r in range(2 if i + 1 < oh else 1):
                q, sg = (0, one) if r == 0 else (4, -one)
                yr = y[n, i + r]
                m0, m1 = m[q, t0 : t0 + tw], m[q + 1, t0 : t0 + tw]
                m2, m3 = m[q + 2, t0 : t0 + tw], m[q + 3, t0 : t0 + tw]
                m4, m5 = m[q + 4, t0 : t0 + tw], m[q + 5, t0 : t0 + tw]
                m6, m7 = m[q + 6, t0 : t0 + tw], m[q + 7, t0 : t0 + tw]
                m8, m9 = m[q + 8, t0 : t0 + tw], m[q + 9, t0 : t0 + tw]
                m10, m11 = m[q + 10, t0 : t0 + tw], m[q + 11, t0 : t0 + tw]
                for bb in range(tw):
                    j = 2 * bb
                    if bb < full:
                        for k in range(k_out):
                            s0 = m0[bb, k] + sg * (m4[bb, k] + m8[bb, k])
                            s1 = m1[bb, k] + sg * (m5[bb, k] + m9[bb, k])
                            s2 = m2[bb, k] + sg * (m6[bb, k] + m10[bb, k])
                            s3 = m3[bb, k] + sg * (m7[bb, k] + m11[bb, k])
                            p = s0 + s1 + s2 + b[k]
                            p1 = s1 - s2 - s3 + b[k]
                            if relu:
                                p = zero if p < zero else p
                                p1 = zero if p1 < zero else p1
                            yr[j, k] = p
                            yr[j + 1, k] = p1
                    else:  # the last column of an odd width: its left output only
                        for k in range(k_out):
                            s0 = m0[bb, k] + sg * (m4[bb, k] + m8[bb, k])
                            s1 = m1[bb, k] + sg * (m5[bb, k] + m9[bb, k])
                            s2 = m2[bb, k] + sg * (m6[bb, k] + m10[bb, k])
                            p = s0 + s1 + s2 + b[k]
                            if relu:
                                p = zero if p < zero else p
                            yr[j, k] = p


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def winograd_output_grad(dy, s, e, th, tw, m, gp):
    """The adjoint of :func:`winograd_output` (bias and ReLU aside): ``m[:, t] = A dY Aᵀ`` for
    every tile of images s..e of dy (N, H', W', K), zeros for outputs past the edge. Rows of
    A dY are dY0, dY0 + dY1, dY0 − dY1, −dY1; a row (u0, u1) times Aᵀ is (u0, u0 + u1,
    u0 − u1, −u1).

    Each image's gradient is copied into the scratch image gp (2·TH, 2, TW, K) of whole tiles
    (zeros past the edge), its even columns apart from its odd ones (as in
    :func:`winograd_input`); then, a row of tiles at a time, eight rows of M per loop over
    the whole row of tiles and channels, indexed flat with unsigned offsets (vectorized)."""
    oh, ow, k_out = dy.shape[1], dy.shape[2], dy.shape[3]
    _zero(gp)
    yf, gf, mf = dy.reshape(-1), gp.reshape(-1), m.reshape(-1)
    k = np.uint64(k_out)
    half = np.uint64(tw) * k  # one parity of one row of gp
    run, plane = half, np.uint64(m.shape[1]) * k
    for n in range(s, e):
        for r in range(oh):
            for par in range(2):
                src = np.uint64((n * oh + r) * ow + par) * k
                dst = np.uint64(2 * r + par) * half
                for j in range((ow - par + 1) // 2):
                    d, sj = dst + np.uint64(j) * k, src + np.uint64(2 * j) * k
                    for q in range(k):
                        gf[d + q] = yf[sj + q]
        for a in range(th):
            t0 = np.uint64(((n - s) * th + a) * tw) * k
            e0 = np.uint64(2 * a) * (half + half)  # row 2a: even columns, then odd ones
            o0, e1 = e0 + half, e0 + half + half  # row 2a + 1
            o1 = e1 + half
            for part in range(2):  # rows 0, 1 of A dY (M0..M7), then rows 2, 3 (M8..M15)
                d0 = np.uint64(8 * part) * plane + t0
                d1, d2, d3 = d0 + plane, d0 + plane + plane, d0 + plane + plane + plane
                d4 = d3 + plane
                d5, d6, d7 = d4 + plane, d4 + plane + plane, d4 + plane + plane + plane
                for f in range(run):
                    g00, g01, g10, g11 = gf[e0 + f], gf[o0 + f], gf[e1 + f], gf[o1 + f]
                    if part == 0:  # rows dY0 and dY0 + dY1
                        u0, u1, w0, w1 = g00, g01, g00 + g10, g01 + g11
                    else:  # rows dY0 − dY1 and −dY1
                        u0, u1, w0, w1 = g00 - g10, g01 - g11, -g10, -g11
                    mf[d0 + f] = u0
                    mf[d1 + f] = u0 + u1
                    mf[d2 + f] = u0 - u1
                    mf[d3 + f] = -u1
                    mf[d4 + f] = w0
                    mf[d5 + f] = w0 + w1
                    mf[d6 + f] = w0 - w1
                    mf[d7 + f] = -w1


@njit(cache=True, nogil=True)
def bias_relu(y, b, relu):
    """``y += b`` on every row of y (M, K), and with ``relu`` then ``y = max(y, 0)``, in one
    pass (a NaN stays NaN, as ``np.maximum`` keeps it): the same numbers as the two NumPy
    passes."""
    m, k = y.shape
    zero = np.zeros(1, dtype=y.dtype)[0]
    for r in range(m):
        yr = y[r]
        if relu:
            for j in range(k):
                v = yr[j] + b[j]
                yr[j] = zero if v < zero else v
        else:
            for j in range(k):
                yr[j] += b[j]


@njit(cache=True, nogil=True)
def fold_batch_norm(w, bias, has_bias, gamma, beta, mean, var, eps, w_out, b_out):
    """Kernels w (P, K) and biases of the convolution followed by inference-time batch norm:
    ``s = gamma / sqrt(var + eps)`` (in float64), ``w_out = w·s`` per column,
    ``b_out = (bias − mean)·s + beta``."""
    p, k = w.shape
    scale = np.empty(k, dtype=w.dtype)
    for j in range(k):
        s = np.float64(gamma[j]) / np.sqrt(np.float64(var[j]) + eps)
        b = np.float64(bias[j]) if has_bias else 0.0
        b_out[j] = (b - np.float64(mean[j])) * s + np.float64(beta[j])
        scale[j] = s
    for r in range(p):
        for j in range(k):
            w_out[r, j] = w[r, j] * scale[j]


@njit(cache=True, nogil=True, inline="always")
def _splitmix64(z):
    """The splitmix64 finaliser on a uint64 (``reference.splitmix64``)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def dropout_hash(x, key, start, threshold, scale, y):
    """Inverted dropout over the flat elements ``start …`` of an array (x and y hold them):
    ``y = x·scale`` where element t's draw ``splitmix64(key + (t + 1)·γ) >> 32`` reaches
    ``threshold`` (``reference.dropout_keep``), else ``y = x·0``. The forward pass runs it on
    the input, the backward pass on the output's gradient: no mask is stored."""
    zero = np.zeros(1, dtype=y.dtype)[0]
    gamma = np.uint64(0x9E3779B97F4A7C15)
    base = np.uint64(key) + np.uint64(start + 1) * gamma
    thr = np.uint64(threshold)
    for t in range(x.size):
        h = _splitmix64(base + np.uint64(t) * gamma)
        y[t] = x[t] * (scale if (h >> np.uint64(32)) >= thr else zero)


@njit(cache=True, nogil=True)
def scale_channels(x, scale, shift, y):
    """``y = x·scale − shift`` per channel over flat uint8 x and float y of channels-last
    images (``C = scale.size``): NumPy's ``x.astype(dtype) * scale - shift`` bit for bit. x is
    converted to y's dtype in one pass, then scaled in a second over y (still in the cache);
    one and three channels have loops of their own, which vectorize (the general loop over 3
    channels ran 5x slower)."""
    for t in range(x.size):
        y[t] = x[t]
    c = scale.size
    if c == 1:
        s0, h0 = scale[0], shift[0]
        for t in range(y.size):
            y[t] = y[t] * s0 - h0
    elif c == 3:
        s0, s1, s2 = scale[0], scale[1], scale[2]
        h0, h1, h2 = shift[0], shift[1], shift[2]
        for i in range(y.size // 3):
            b = 3 * i
            y[b] = y[b] * s0 - h0
            y[b + 1] = y[b + 1] * s1 - h1
            y[b + 2] = y[b + 2] * s2 - h2
    else:
        for t in range(y.size):
            k = t % c
            y[t] = y[t] * scale[k] - shift[k]


@njit(cache=True, nogil=True)
def sgd_momentum_step(p, g, v, lr, mu, wd, nesterov, tiny):
    """One SGD step with momentum over flat arrays, in one pass, PyTorch's form:
    ``g ← g + wd·p`` (when wd ≠ 0), ``v ← μ·v + g``, ``p ← p − lr·(g + μ·v if nesterov else
    v)``; each operation rounded as NumPy rounds it (lr, μ and wd are of p's dtype), except
    that a velocity smaller in size than ``tiny`` (the dtype's smallest normal number) becomes
    0: a unit that no longer gets a gradient would otherwise see its velocity shrink by μ each
    step into subnormal numbers, on which the CPU computes about 30 times slower."""
    zero = np.zeros(1, dtype=v.dtype)[0]
    for t in range(p.size):
        gt = g[t]
        if wd != 0:
            gt = gt + wd * p[t]
        vt = v[t] * mu + gt
        if -tiny < vt < tiny:
            vt = zero
        v[t] = vt
        step = gt + mu * vt if nesterov else vt
        p[t] = p[t] - lr * step


@njit(cache=True, nogil=True)
def relu_backward(dy, y, dx):
    """``dx = dy`` where ``y > 0``, else 0 (flat, contiguous arrays), in one pass."""
    for t in range(dy.size):
        dx[t] = dy[t] if y[t] > 0 else 0


#: rows summed in x's own dtype before the sum is added into float64 (batch norm's sums): float32
#: arithmetic on 16 numbers keeps float32's precision, runs twice as wide as float64's, and
#: float64 gathers the rest. Measured on 64×28×28×32 float32, one thread: the gradient sums
#: 0.86 → 0.65 ms.
SHORT_ROWS = 16


@njit(cache=True, nogil=True)
def channel_block_moments(x, rows, sums, m2):
    """Per block of ``rows`` rows of x (M, C), per channel: Σ x into sums and Σ (x − block
    mean)² into m2 (blocks, C), float64. The first pass adds ``SHORT_ROWS`` rows at a time in
    x's dtype; the second reads the block from the cache, not from memory, in float64, and
    corrects both with the residual r = Σ (x − block mean) (the corrected two-pass algorithm:
    sum + r, and M2 − r²/n), so their precision depends neither on the block's length nor on
    the first pass's rounding. Combining fixed blocks in order gives the same numbers however
    the blocks are shared among threads."""
    m, c = x.shape
    part = np.zeros(c, dtype=x.dtype)
    for b in range(sums.shape[0]):
        lo, hi = b * rows, min(m, (b + 1) * rows)
        s = np.zeros(c)
        for r0 in range(lo, hi, SHORT_ROWS):
            part[:] = 0
            for r in range(r0, min(hi, r0 + SHORT_ROWS)):
                row = x[r]
                for k in range(c):
                    part[k] += row[k]
            for k in range(c):
                s[k] += part[k]
        mean = s / (hi - lo)
        q = np.zeros(c)
        res = np.zeros(c)
        for r in range(lo, hi):
            row = x[r]
            for k in range(c):
                d = row[k] - mean[k]
                q[k] += d * d
                res[k] += d
        sums[b] = s + res
        m2[b] = q - res * res / (hi - lo)


@njit(cache=True, nogil=True)
def batchnorm_apply(x, mean, inv_std, gamma, beta, y, relu):
    """``y = xhat·gamma + beta`` with ``xhat = (x − mean)·inv_std``, in one pass over x (M, C);
    with ``relu``, the ReLU that follows in the same pass: ``y = 0`` where ``y < 0`` (a NaN
    stays NaN, as ``np.maximum`` keeps it). xhat is not stored: the backward pass recomputes
    it with the same arithmetic."""
    m, c = x.shape
    zero = np.zeros(1, dtype=x.dtype)[0]
    for r in range(m):
        xr, yr = x[r], y[r]
        if relu:
            for k in range(c):
                v = (xr[k] - mean[k]) * inv_std[k] * gamma[k] + beta[k]
                yr[k] = zero if v < zero else v
        else:
            for k in range(c):
                yr[k] = (xr[k] - mean[k]) * inv_std[k] * gamma[k] + beta[k]


@njit(cache=True, nogil=True)
def batchnorm_grad_sums(dy, x, mean, inv_std, gamma, beta, relu, rows, sb, sg):
    """Per block of ``rows`` rows of (M, C) arrays, per channel: ``Σ dy`` into sb and
    ``Σ dy·xhat`` into sg (blocks, C), float64 sums of ``SHORT_ROWS``-row sums in dy's dtype,
    with ``xhat = (x − mean)·inv_std`` recomputed as the forward pass computed it. With
    ``relu`` (batch norm fused with the ReLU after it), dy counts only where the forward
    pass's ``xhat·gamma + beta > 0``: the ReLU's gradient, recomputed with the forward pass's
    very arithmetic instead of stored."""
    m, c = dy.shape
    zero = np.zeros(1, dtype=dy.dtype)[0]
    p1, p2 = np.zeros(c, dtype=dy.dtype), np.zeros(c, dtype=dy.dtype)
    for b in range(sb.shape[0]):
        s1 = np.zeros(c)
        s2 = np.zeros(c)
        lo, hi = b * rows, min(m, (b + 1) * rows)
        for r0 in range(lo, hi, SHORT_ROWS):
            p1[:] = 0
            p2[:] = 0
            for r in range(r0, min(hi, r0 + SHORT_ROWS)):
                dr, xr = dy[r], x[r]
                if relu:
                    for k in range(c):
                        h = (xr[k] - mean[k]) * inv_std[k]
                        d = dr[k] if h * gamma[k] + beta[k] > zero else zero
                        p1[k] += d
                        p2[k] += d * h
                else:
                    for k in range(c):
                        p1[k] += dr[k]
                        p2[k] += dr[k] * ((xr[k] - mean[k]) * inv_std[k])
            for k in range(c):
                s1[k] += p1[k]
                s2[k] += p2[k]
        sb[b] = s1
        sg[b] = s2


@njit(cache=True, nogil=True)
def batchnorm_dx(dy, x, mean, inv_std, gamma, beta, relu, scale, shift, slope, dx):
    """``dx = scale·dy − shift − xhat·slope`` per channel, one pass over (M, C), xhat
    recomputed as in :func:`batchnorm_grad_sums`; with ``relu``, dy masked as there."""
    m, c = dy.shape
    zero = np.zeros(1, dtype=dy.dtype)[0]
    for r in range(m):
        dr, xr, out = dy[r], x[r], dx[r]
        if relu:
            for k in range(c):
                h = (xr[k] - mean[k]) * inv_std[k]
                d = dr[k] if h * gamma[k] + beta[k] > zero else zero
                out[k] = scale[k] * d - shift[k] - h * slope[k]
        else:
            for k in range(c):
                h = (xr[k] - mean[k]) * inv_std[k]
                out[k] = scale[k] * dr[k] - shift[k] - h * slope[k]


# --------------------------------------------------------------------------------------------
# Products from compiled code: a thread's whole share of the im2col path in one call
# --------------------------------------------------------------------------------------------
#
# Python's GIL is taken back after every call that released it. Two threads that each make
# many short calls (gather the patches, multiply, add the bias, pool: four per piece) keep
# finding it held by the other: the one that waits sleeps, and waking a sleeping thread costs
# 40-100 µs on the 2-core virtual machines measured. There, the im2col path's products ran
# 1.25x slower per thread with two threads than with one (two processes: not slower), a whole
# prediction 1.45x. So the piece loop runs here, and calls the product itself: oneMKL's
# ``cblas_sgemm``, at the address ``_blas.gemm_address`` gives (the same function the Python
# path calls, with the same arguments: the same bits). The address is an argument, not a
# constant of the compiled code, so the code is cached like the rest.


@intrinsic
def _gemm(typingctx, fn, m, n, k, a, b, c, trans_a, trans_b, beta):
    """``c = a·b`` (or ``c = beta·c + a·b``), row-major, through the ``cblas_?gemm`` at
    address fn (LP64 ints); ``trans_a``/``trans_b``: the operand is given transposed. The
    leading dimensions are the arrays' row lengths (C-contiguous arrays)."""
    if not all(isinstance(t, types.Array) for t in (a, b, c)):
        return None
    if not a.dtype == b.dtype == c.dtype or a.dtype not in (types.float32, types.float64):
        return None
    sig = types.void(fn, m, n, k, a, b, c, trans_a, trans_b, beta)

    def codegen(context, builder, signature, args):
        fn_, m_, n_, k_, a_, b_, c_, ta_, tb_, beta_ = args
        aty, bty, cty = signature.args[4:7]
        flt = ir.FloatType() if aty.dtype == types.float32 else ir.DoubleType()
        i32, ptr = ir.IntType(32), flt.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32] * 6 + [flt, ptr, i32, ptr, i32, flt, ptr, i32])
        f = builder.inttoptr(fn_, fnty.as_pointer())

        def int32(v):
            return builder.trunc(v, i32) if v.type.width > 32 else builder.sext(v, i32)

        def operand(val, ty):
            ary = context.make_array(ty)(context, builder, val)
            ld = builder.extract_value(ary.shape, 1)
            return builder.bitcast(ary.data, ptr), int32(ld)

        (pa, lda), (pb, ldb), (pc, ldc) = operand(a_, aty), operand(b_, bty), operand(c_, cty)
        trans = [
            builder.select(t, ir.Constant(i32, 112), ir.Constant(i32, 111)) for t in (ta_, tb_)
        ]
        beta_v = context.cast(builder, beta_, signature.args[9], aty.dtype)
        row_major, one = ir.Constant(i32, 101), ir.Constant(flt, 1.0)
        dims = [int32(m_), int32(n_), int32(k_)]
        builder.call(f, [row_major, *trans, *dims, one, pa, lda, pb, ldb, beta_v, pc, ldc])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def im2col_conv_pieces(
    gemm,
    x,
    starts,
    step,
    kh,
    kw,
    stride,
    pt,
    pl,
    oh,
    ow,
    wmat,
    b,
    has_bias,
    relu,
    cols,
    y,
    keep,
    ph,
    pw,
    pool_stride,
    pooled,
    arg,
):
    """The im2col path's forward pass over the pieces of x starting at ``starts`` (``step``
    images each; the last may be shorter): each piece's patches into cols, times the kernels
    wmat (KH·KW·C_in, K) by the product at address ``gemm``, the bias b and the ReLU, into
    images s..e of y (N·H'·W', K) (``keep``) or into the start of y (a scratch array of one
    piece); with ``ph > 0`` then max pooling (``ph × pw`` windows) into pooled and arg. The
    same numbers as ``ops._im2col_forward``'s loop in Python, step by step."""
    n, per = x.shape[0], oh * ow
    patch, k_out = wmat.shape[0], wmat.shape[1]
    zero = np.zeros(1, dtype=y.dtype)[0]
    for s in starts:
        e = min(n, s + step)
        rows = (e - s) * per
        piece = cols[:rows]
        im2col(x[s:e], kh, kw, stride, pt, pl, oh, ow, piece)
        out = y[s * per : e * per] if keep else y[:rows]
        _gemm(gemm, rows, k_out, patch, piece, wmat, out, False, False, 0.0)
        if has_bias:
            bias_relu(out, b, relu)
        elif relu:
            for r in range(rows):
                for j in range(k_out):
                    v = out[r, j]
                    out[r, j] = zero if v < zero else v
        if ph > 0:
            src = out.reshape((e - s, oh, ow, k_out))
            if ph == 2 and pw == 2:
                maxpool2x2_forward(src, pool_stride, pooled[s:e], arg[s:e])
            else:
                maxpool2d_forward(src, ph, pw, pool_stride, pooled[s:e], arg[s:e])


@njit(cache=True, nogil=True)
def im2col_conv_backward_pieces(
    gemm,
    x,
    dy,
    y,
    relu,
    dym,
    mine,
    starts,
    step,
    held_first,
    kh,
    kw,
    stride,
    pt,
    pl,
    wmat,
    has_bias,
    ones,
    db_parts,
    dw_parts,
    cols,
    dcols,
    input_grad,
    dx,
    route,
    dp,
    arg,
    ph,
    pw,
    pool_stride,
):
    """The im2col path's backward pass over this thread's pieces ``mine`` (indices into
    ``starts``, in the order taken), the same steps as ``ops._im2col_backward``'s loop in
    Python: with ``route`` 1 or 2, the pooling's gradient dp routed to its winners first
    (into images s..e of dy (N, H', W', K); 1: 2×2 windows at stride 2); with ``relu``, dy
    kept where the output y was positive, into dym; the piece's bias gradient (ones·dy) and
    kernel gradient (patchesᵀ·dy) into its parts; with ``input_grad``, the patches' gradient
    dy·wmatᵀ added back into dx. The patches are gathered again, except the first piece's
    when ``held_first`` (the thread's buffer still holds them from the forward pass)."""
    n, oh, ow, k_out = dy.shape
    per, patch = oh * ow, wmat.shape[0]
    dy2, dym2 = dy.reshape((n * per, k_out)), dym.reshape((n * per, k_out))
    yf, dyf, dymf = y.reshape(-1), dy.reshape(-1), dym.reshape(-1)
    for q in range(len(mine)):
        i = mine[q]
        s = starts[i]
        e = min(n, s + step)
        rows = (e - s) * per
        if route == 1:
            maxpool2x2s2_backward(dp[s:e], arg[s:e], dy[s:e])
        elif route == 2:
            dy[s:e] = 0
            maxpool2d_backward(dp[s:e], arg[s:e], pw, pool_stride, dy[s:e])
        if relu:
            lo, hi = s * per * k_out, e * per * k_out
            relu_backward(dyf[lo:hi], yf[lo:hi], dymf[lo:hi])
        dy_piece = dym2[s * per : e * per] if relu else dy2[s * per : e * per]
        if has_bias:
            _gemm(
                gemm,
                1,
                k_out,
                rows,
                ones[:rows].reshape((1, rows)),
                dy_piece,
                db_parts[i : i + 1],
                False,
                False,
                0.0,
            )
        piece = cols[:rows]
        if q > 0 or not held_first:
            im2col(x[s:e], kh, kw, stride, pt, pl, oh, ow, piece)
        _gemm(gemm, patch, k_out, rows, piece, dy_piece, dw_parts[i], True, False, 0.0)
        if input_grad:
            dpiece = dcols[:rows]
            _gemm(gemm, rows, patch, k_out, dy_piece, wmat, dpiece, False, True, 0.0)
            col2im(dpiece, kh, kw, stride, pt, pl, oh, ow, dx[s:e])


@njit(cache=True, nogil=True)
def winograd_conv_pieces(
    gemm,
    x,
    starts,
    step,
    pt,
    pl,
    th,
    tw,
    u,
    b,
    relu,
    v,
    m,
    xp,
    y,
    keep,
    ph,
    pw,
    pool_stride,
    pooled,
    arg,
    moments,
    sums,
    m2,
):
    """The Winograd path's forward pass over the pieces of x starting at ``starts`` (``step``
    images each), the same steps as ``ops._winograd_forward``'s loop in Python: the inputs'
    transform into v, the 16 products V·U by the product at address ``gemm``, the outputs'
    transform (bias b, ReLU) into images s..e of y (``keep``) or into the start of y (a
    scratch array of one piece); then with ``ph > 0`` max pooling into pooled and arg, with
    ``moments`` each image's statistics into sums and m2 (``ops.image_moments``)."""
    n = x.shape[0]
    oh, ow, k_out = y.shape[1], y.shape[2], y.shape[3]
    for s in starts:
        e = min(n, s + step)
        tiles = (e - s) * th * tw
        winograd_input(x, s, e, pt, pl, th, tw, v, xp)
        for i in range(16):
            _gemm(
                gemm, tiles, k_out, u.shape[1], v[i, :tiles], u[i], m[i, :tiles], False, False, 0.0
            )
        if keep:
            winograd_output(m, s, e, th, tw, b, relu, y)
            out = y[s:e]
        else:
            out = y[: e - s]
            winograd_output(m, 0, e - s, th, tw, b, relu, out)
        if ph > 0:
            if ph == 2 and pw == 2:
                maxpool2x2_forward(out, pool_stride, pooled[s:e], arg[s:e])
            else:
                maxpool2d_forward(out, ph, pw, pool_stride, pooled[s:e], arg[s:e])
        if moments:
            per = oh * ow
            channel_block_moments(out.reshape(((e - s) * per, k_out)), per, sums[s:e], m2[s:e])


@njit(cache=True, nogil=True)
def winograd_conv_backward_pieces(
    gemm,
    x,
    dy,
    y,
    relu,
    dym,
    mine,
    starts,
    step,
    pt,
    pl,
    th,
    tw,
    has_bias,
    ones,
    db_parts,
    v,
    m,
    xp,
    gp,
    du_piece,
    du_sum,
    input_grad,
    hh,
    hw,
    u,
    v2,
    m2,
    xp2,
    zero_bias,
    dx,
    route,
    dp,
    arg,
    ph,
    pw,
    pool_stride,
    sums,
    bn_x,
    bn_mean,
    bn_inv_std,
    bn_gamma,
    bn_beta,
    bn_relu,
    sb,
    sg,
    pend,
    p_dy,
    p_x,
    p_mean,
    p_inv_std,
    p_gamma,
    p_beta,
    p_relu,
    p_scale,
    p_shift,
    p_slope,
):
    """The Winograd path's backward pass over this thread's pieces ``mine`` (indices into
    ``starts``, in the order taken), the same steps as ``ops._winograd_backward``'s loop in
    Python, its products by the product at address ``gemm``: with ``route`` 1 or 2 the
    pooling's gradient dp routed to its winners first (as in
    :func:`im2col_conv_backward_pieces`); with ``relu``, dy kept where the output y was
    positive, into dym; the piece's bias gradient (ones·dy) into its part; the inputs'
    transform V (again) and the output gradient's dM, the 16 products Vᵀ·dM into du_piece,
    added to du_sum; with ``input_grad``, dx as the forward convolution of dy (padded by 2 −
    p) with the turned kernels' transforms u; with ``sums``, then the gradient sums of the
    batch norm before (``batchnorm_grad_sums`` of images s..e of dx, its cache's x, mean,
    inv_std, gamma, beta and ReLU) into sb and sg, while dx is in the cache. With ``pend``,
    each piece of dy is first written as the batch norm after the convolution computes its
    input gradient (``batchnorm_dx`` of p_dy, p_x and the coefficients: ``ops.PendingGradient``)."""
    n, oh, ow, k_out = dy.shape
    cin = x.shape[3]
    per, per_in = oh * ow, x.shape[1] * x.shape[2]
    dyf, yf, dymf = dy.reshape(-1), y.reshape(-1), dym.reshape(-1)
    dy2 = dy.reshape((n * per, k_out))
    src = dym if relu else dy
    src2 = src.reshape((n * per, k_out))
    dx2 = dx.reshape((dx.shape[0] * per_in, dx.shape[3]))
    for q in range(len(mine)):
        i = mine[q]
        s = starts[i]
        e = min(n, s + step)
        rows, tiles = (e - s) * per, (e - s) * th * tw
        if tiles == 0:  # no output at all (a product over nothing may leave its output as is)
            db_parts[i] = 0
            if input_grad:
                dx[s:e] = 0
                if sums:
                    lo, hi = s * per_in, e * per_in
                    batchnorm_grad_sums(
                        dx2[lo:hi],
                        bn_x[lo:hi],
                        bn_mean,
                        bn_inv_std,
                        bn_gamma,
                        bn_beta,
                        bn_relu,
                        per_in,
                        sb[s:e],
                        sg[s:e],
                    )
            continue
        if pend:
            lo, hi = s * per, e * per
            batchnorm_dx(
                p_dy[lo:hi],
                p_x[lo:hi],
                p_mean,
                p_inv_std,
                p_gamma,
                p_beta,
                p_relu,
                p_scale,
                p_shift,
                p_slope,
                dy2[lo:hi],
            )
        if route == 1:
            maxpool2x2s2_backward(dp[s:e], arg[s:e], dy[s:e])
        elif route == 2:
            dy[s:e] = 0
            maxpool2d_backward(dp[s:e], arg[s:e], pw, pool_stride, dy[s:e])
        if relu:
            lo, hi = s * per * k_out, e * per * k_out
            relu_backward(dyf[lo:hi], yf[lo:hi], dymf[lo:hi])
        if has_bias:
            dyp = src2[s * per : e * per]
            _gemm(
                gemm,
                1,
                k_out,
                rows,
                ones[:rows].reshape((1, rows)),
                dyp,
                db_parts[i : i + 1],
                False,
                False,
                0.0,
            )
        winograd_input(x, s, e, pt, pl, th, tw, v, xp)
        winograd_output_grad(src, s, e, th, tw, m, gp)
        for k in range(16):
            _gemm(
                gemm, cin, k_out, tiles, v[k, :tiles], m[k, :tiles], du_piece[k], True, False, 0.0
            )
        duf, dsf = du_piece.reshape(-1), du_sum.reshape(-1)
        for j in range(len(dsf)):
            dsf[j] += duf[j]
        if input_grad:
            tiles2 = (e - s) * hh * hw
            winograd_input(src, s, e, 2 - pt, 2 - pl, hh, hw, v2, xp2)
            for k in range(16):
                _gemm(
                    gemm,
                    tiles2,
                    cin,
                    k_out,
                    v2[k, :tiles2],
                    u[k],
                    m2[k, :tiles2],
                    False,
                    False,
                    0.0,
                )
            winograd_output(m2, s, e, hh, hw, zero_bias, False, dx)
            if sums:
                lo, hi = s * per_in, e * per_in
                batchnorm_grad_sums(
                    dx2[lo:hi],
                    bn_x[lo:hi],
                    bn_mean,
                    bn_inv_std,
                    bn_gamma,
                    bn_beta,
                    bn_relu,
                    per_in,
                    sb[s:e],
                    sg[s:e],
                )


# --------------------------------------------------------------------------------------------
# The second thread's handoff (ops._Handoff): flags in an int64 array, read and written with
# sequentially consistent atomics, so that each side can wait for the other without the GIL
# --------------------------------------------------------------------------------------------

#: the handoff's slots: the task posted, the task done, the worker asleep (waiting on an Event)
POSTED, DONE, SLEEPING = 0, 1, 2


@intrinsic
def _atomic_load(typingctx, arr, idx):
    """``arr[idx]`` of an int64 array, as a sequentially consistent atomic load."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        from numba.core import cgutils

        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def _atomic_store(typingctx, arr, idx, val):
    """``arr[idx] = val`` of an int64 array, as a sequentially consistent atomic store."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        from numba.core import cgutils

        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, ptr, "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(arr, idx, val), codegen


@njit(cache=True, nogil=True)
def handoff_post(ctl, task):
    """The caller posts task number ``task``; returns whether the worker had gone to sleep
    (then the caller must wake it: it may not see the post otherwise)."""
    _atomic_store(ctl, POSTED, task)
    return _atomic_load(ctl, SLEEPING) != 0


@njit(cache=True, nogil=True)
def handoff_wait_done(ctl, task, spins):
    """The caller waits, spinning without the GIL, for task ``task`` to be done; False if
    ``spins`` checks went by first (the caller then waits on an Event instead)."""
    for _ in range(spins):
        if _atomic_load(ctl, DONE) == task:
            return True
    return _atomic_load(ctl, DONE) == task


@njit(cache=True, nogil=True)
def handoff_next(ctl, seen, spins, done):
    """The worker, without the GIL: with ``done``, says task ``seen`` is done; then waits,
    spinning, for a task other than ``seen`` and returns its number. After ``spins`` checks
    it marks itself asleep, looks once more (a post made meanwhile is seen by one side or the
    other: both use sequentially consistent atomics), and returns 0 if there is none (it
    then sleeps on an Event the caller sets)."""
    _atomic_store(ctl, SLEEPING, 0)  # awake
    if done:
        _atomic_store(ctl, DONE, seen)
    for _ in range(spins):
        task = _atomic_load(ctl, POSTED)
        if task != seen:
            return task
    _atomic_store(ctl, SLEEPING, 1)
    task = _atomic_load(ctl, POSTED)
    if task != seen:
        _atomic_store(ctl, SLEEPING, 0)
        return task
    return 0
