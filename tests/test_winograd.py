"""The Winograd F(2×2, 3×3) path of the stride-1 3×3 convolution, held to the loop reference:
forward, input and kernel gradients, every padding, odd sizes, pieces, threads, and the fused
ReLU and max pooling."""

from __future__ import annotations

import numpy as np
import pytest

from classic_cnn import ops
from classic_cnn import reference as ref

from .conftest import rel_error

pytestmark = pytest.mark.determinism

# (input N×H×W×C, C_out, padding): C_in ≥ 15 so that 3·3·C_in ≥ DIRECT_MAX_PATCH
CASES = [
    ((3, 8, 8, 16), 5, "same"),  # whole tiles
    ((3, 7, 9, 16), 4, "same"),  # odd height and width: tiles half past the edge
    ((2, 9, 6, 20), 17, "valid"),  # no padding, odd output height
    ((2, 5, 6, 16), 3, ((2, 0), (1, 2))),  # uneven padding, 2 on one side
    ((2, 6, 5, 16), 3, ((0, 1), (2, 0))),
    ((2, 1, 1, 16), 3, "same"),  # a single pixel: one tile, mostly padding
    ((2, 3, 3, 16), 2, "valid"),  # one output
    ((2, 2, 2, 16), 2, "valid"),  # no output at all: zero gradients
    ((2, 6, 7, 16), 4, 3),  # padding 3: the input gradient falls back to col2im
    ((4, 14, 14, 32), 64, "same"),  # the fashion preset's third convolution
]


def _data(rng, shape, cout, dtype, bias=True):
    x = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=(3, 3, shape[3], cout)).astype(dtype)
    b = rng.normal(size=cout).astype(dtype) if bias else None
    return x, w, b


def test_the_path_is_taken_by_stride_1_3x3_convolutions_too_wide_for_the_direct_one():
    def w(kh, kw, cin):
        return np.zeros((kh, kw, cin, 4), np.float32)

    assert ops._winograd(w(3, 3, 16), 1)
    assert ops._winograd(w(3, 3, 64), 1)
    assert not ops._winograd(w(3, 3, 14), 1)  # 126 numbers per patch: the direct path
    assert not ops._winograd(w(3, 3, 16), 2)  # stride 2: im2col
    assert not ops._winograd(w(5, 5, 16), 1)
    assert not ops._winograd(w(3, 2, 32), 1)
    x = np.zeros((1, 6, 6, 16), np.float32)
    assert ops.conv2d_forward(x, w(3, 3, 16), None, 1, "same")[1][5] == "winograd"
    assert ops.conv2d_forward(x, w(3, 3, 16), None, 2, "same")[1][5] == "im2col"


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape,cout,padding", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_matches_reference(rng, dtype, tol, shape, cout, padding, bias):
    x, w, b = _data(rng, shape, cout, dtype, bias)
    y, cache = ops.conv2d_forward(x, w, b, 1, padding)
    assert cache[5] == "winograd" and y.dtype == dtype and y.flags.c_contiguous
    assert rel_error(y, ref.conv2d_forward(x, w, b, 1, padding)) < tol
    dy = rng.normal(size=y.shape).astype(dtype)
    dx, dw, db = ops.conv2d_backward(dy, cache)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, x, w, 1, padding)
    assert dx.dtype == dw.dtype == dtype
    assert rel_error(dx, dx_ref) < tol
    assert rel_error(dw, dw_ref) < tol
    assert (db is None) if b is None else rel_error(db, db_ref) < tol
    none, dw2, _ = ops.conv2d_backward(dy, cache, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)


def test_the_backward_pass_is_taken_by_winograd_up_to_padding_2(rng, monkeypatch):
    """The input gradient is a convolution of the output gradient, padded 2 − p: on the
    Winograd path's loops (their input transform run on dy) for padding up to 2; beyond,
    the whole backward pass is im2col's. The reference's numbers either way."""
    kern, calls = ops._k(), []

    class Counting:
        def __getattr__(self, name):
            if name == "winograd_input":
                return lambda dy, *a: calls.append(dy.shape) or kern.winograd_input(dy, *a)
            return getattr(kern, name)

    monkeypatch.setattr(ops, "_k", Counting)
    x, w, b = _data(rng, (2, 6, 7, 16), 4, np.float64)
    for padding, on_winograd in (("same", True), (((2, 0), (1, 2)), True), (3, False)):
        y, cache = ops.conv2d_forward(x, w, b, 1, padding)
        calls.clear()
        dy = rng.normal(size=y.shape)
        dx, _, _ = ops.conv2d_backward(dy, cache)
        # the inputs' transform for the kernels' gradient, the output gradient's for dx
        assert calls == ([x.shape, (*y.shape[:3], 4)] if on_winograd else []), padding
        assert rel_error(dx, ref.conv2d_backward(dy, x, w, 1, padding)[0]) < 1e-12


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("piece_bytes", [1, 3 * 16 * 4 * 5 * 16 * 4])
def test_winograd_in_pieces_and_threads_matches_reference(rng, monkeypatch, threads, piece_bytes):
    """Pieces of one image, or of three (16 transformed numbers per tile, 4×5 tiles of 16
    channels per image), over a batch of 7 that does not divide evenly, on 1 or 2 threads
    (the same pieces on both: a tile's products are then the same calls whatever the thread
    count); the same bits every time."""
    monkeypatch.setattr(ops, "WINOGRAD_PIECE_BYTES", piece_bytes)
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    x, w, b = _data(rng, (7, 8, 9, 16), 6, np.float32)
    with ops.engine_threads(threads):
        step = ops._winograd_plan(x.shape, w, 8, 9, x.dtype)[2]
        assert step == (1 if piece_bytes == 1 else 3)
        y, cache = ops.conv2d_forward(x, w, b, 1, "same", relu=True)
        dy = rng.normal(size=y.shape).astype(np.float32)
        dx, dw, db = ops.conv2d_backward(dy, cache)
        y2, cache2 = ops.conv2d_forward(x, w, b, 1, "same", relu=True)
        again = ops.conv2d_backward(dy, cache2)
    want = np.maximum(ref.conv2d_forward(x, w, b, 1, "same"), 0)
    assert rel_error(y, want) < 1e-5
    dy_masked = np.where(want > 0, dy, 0)
    for got, expect in zip(
        (dx, dw, db), ref.conv2d_backward(dy_masked, x, w, 1, "same"), strict=True
    ):
        assert rel_error(got, expect) < 1e-5
    np.testing.assert_array_equal(y2, y)
    for a, c in zip(again, (dx, dw, db), strict=True):
        np.testing.assert_array_equal(a, c)


def test_winograd_with_relu_and_max_pooling_matches_the_three_layers(rng):
    x, w, b = _data(rng, (3, 9, 8, 16), 5, np.float64)
    pooled, conv_cache, pool_cache = ops.conv2d_maxpool_forward(x, w, b, 1, "same", True, (2, 2), 2)
    assert conv_cache[5] == "winograd"
    y = np.maximum(ref.conv2d_forward(x, w, b, 1, "same"), 0)
    assert rel_error(pooled, ref.maxpool2d_forward(y, (2, 2), 2)) < 1e-12
    dp = rng.normal(size=pooled.shape)
    dx, dw, db = ops.conv2d_maxpool_backward(dp, conv_cache, pool_cache)
    dy = np.where(y > 0, ref.maxpool2d_backward(dp, y, (2, 2), 2), 0)
    for got, want in zip((dx, dw, db), ref.conv2d_backward(dy, x, w, 1, "same"), strict=True):
        assert rel_error(got, want) < 1e-12


def test_a_nan_stays_visible_and_spreads_over_the_tiles_that_read_it_only(rng):
    """A NaN in the input is in every output the reference makes NaN (through the fused ReLU
    too), and Winograd's transforms spread it no further than the 2×2 output blocks whose
    4×4 inputs hold it."""
    x, w, b = _data(rng, (1, 8, 8, 16), 3, np.float32)
    x[0, 2, 3, 5] = np.nan  # padded (3, 4): tile rows 0-1 (outputs 0-3), columns 1-2 (2-5)
    y, _ = ops.conv2d_forward(x, w, b, 1, "same", relu=True)
    want = np.isnan(ref.conv2d_forward(x, w, b, 1, "same"))
    assert want[0, 1:4, 2:5].all() and want.sum() == 9 * 3
    assert np.isnan(y)[want].all()
    tiles = np.zeros_like(want)
    tiles[0, 0:4, 2:6] = True
    assert not np.isnan(y)[~tiles].any()


def test_the_kernel_gradient_is_summed_as_it_goes_not_kept_piece_by_piece(rng, monkeypatch):
    """Wide layers in small pieces: one piece's transformed kernel gradient is 16·C_in·C_out
    numbers (1 MiB at 128 channels), so keeping each of 64 pieces' parts would take 64 MiB;
    summed as the pieces come, the backward pass stays within a few MiB of its inputs."""
    import tracemalloc

    monkeypatch.setattr(ops, "WINOGRAD_PIECE_BYTES", 1)  # one image a piece
    x, w, _ = _data(rng, (64, 8, 8, 128), 128, np.float32, bias=False)
    y, cache = ops.conv2d_forward(x, w, None, 1, "same")
    dy = rng.normal(size=y.shape).astype(np.float32)
    ops.conv2d_backward(dy, cache)  # workspaces in place
    tracemalloc.start()
    try:
        dx, dw, _ = ops.conv2d_backward(dy, cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MiB"
    monkeypatch.setattr(ops, "WINOGRAD", False)  # im2col's gradients, the reference checked
    dx_im2col, dw_im2col, _ = ops.conv2d_backward(dy, ops.conv2d_forward(x, w, None, 1, 1)[1])
    assert rel_error(dx, dx_im2col) < 1e-5 and rel_error(dw, dw_im2col) < 1e-5


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("step", ["plain", "moments", "pool", "pool-scratch"])
def test_the_compiled_piece_loop_agrees_with_the_python_loop(monkeypatch, threads, step):
    """Where oneMKL computes the products, each thread's Winograd pieces (transforms, 16
    products, bias and ReLU, then pooling or the batch norm's statistics) run in one
    compiled call calling oneMKL; elsewhere in Python with NumPy's stacked product. Both
    give the reference's numbers; with the same products they would give the same bits."""
    if ops._blas.gemm_address(np.float32) is None:
        pytest.skip("oneMKL does not compute the products here")
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "WINOGRAD_PIECE_BYTES", 1 << 14)  # several pieces per thread
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 9, 11, 16)).astype(np.float32)
    w = rng.normal(size=(3, 3, 16, 8)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    address = ops._blas.gemm_address

    def run(compiled):
        monkeypatch.setattr(ops._blas, "gemm_address", address if compiled else lambda d: None)
        with ops.engine_threads(threads):
            if step in ("plain", "moments"):
                stats = (np.empty((5, 8)), np.empty((5, 8))) if step == "moments" else None
                y, cache = ops.conv2d_forward(x, w, b, 1, "same", relu=True, moments=stats)
                assert cache[5] == "winograd"
                return (y, *(stats or ()))
            p, _, _ = ops.conv2d_maxpool_forward(
                x, w, b, 1, "same", True, (2, 2), 2, keep=step == "pool"
            )
            return (p,)

    got, want = run(True), run(False)
    ref_y = np.maximum(ref.conv2d_forward(x, w, b, 1, "same"), 0)
    for g, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5)
    if step == "plain":
        np.testing.assert_allclose(got[0], ref_y, rtol=1e-4, atol=1e-4)
    if step == "moments":  # per image and channel: the sum and the squared deviations
        np.testing.assert_allclose(got[1], ref_y.sum(axis=(1, 2)), rtol=1e-5)
        dev = ref_y - ref_y.mean(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(got[2], (dev**2).sum(axis=(1, 2)), rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("step", ["relu-bias", "pool2", "pool3", "bn-sums", "no-input-grad"])
def test_the_compiled_backward_loop_agrees_with_the_python_loop(monkeypatch, threads, step):
    """The backward pass's pieces (the pooling's routing, ReLU mask, bias gradient, kernel
    gradient's transforms and 16 products, the input gradient as a convolution, the gradient
    sums of the batch norm before) run in one compiled call per thread where oneMKL computes
    the products, else in Python with NumPy's stacked products: the same gradients to
    float32 rounding, and the reference's."""
    if ops._blas.gemm_address(np.float32) is None:
        pytest.skip("oneMKL does not compute the products here")
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "WINOGRAD_PIECE_BYTES", 1 << 14)  # several pieces per thread
    rng = np.random.default_rng(7)
    raw = rng.normal(size=(5, 9, 11, 16)).astype(np.float32)
    w = rng.normal(size=(3, 3, 16, 8)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32) if step == "relu-bias" else None
    gamma, beta = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    bn = step == "bn-sums"
    if bn:  # the convolution's input from a batch norm + ReLU, whose gradient sums it takes
        x, bn_cache = ops.batchnorm_forward(
            raw, gamma, beta, np.zeros(16, np.float32), np.ones(16, np.float32), True, relu=True
        )
    else:
        x = raw
    pool = {"pool2": ((2, 2), 2), "pool3": ((3, 3), 2)}.get(step)
    input_grad = step != "no-input-grad"
    address = ops._blas.gemm_address
    kernel, calls = ops._k().winograd_conv_backward_pieces, []

    def spy(*args):
        calls.append(args[0])
        return kernel(*args)

    monkeypatch.setattr(ops._k(), "winograd_conv_backward_pieces", spy)

    def run(compiled):
        monkeypatch.setattr(ops._blas, "gemm_address", address if compiled else lambda d: None)
        with ops.engine_threads(threads):
            if pool is not None:
                p, cc, pc = ops.conv2d_maxpool_forward(x, w, b, 1, "same", True, *pool)
                dp = np.random.default_rng(8).normal(size=p.shape).astype(np.float32)
                return ops.conv2d_maxpool_backward(dp, cc, pc, input_grad), dp
            y, cache = ops.conv2d_forward(x, w, b, 1, "same", relu=step == "relu-bias")
            assert cache[5] == "winograd"
            dy = np.random.default_rng(8).normal(size=y.shape).astype(np.float32)
            if not bn:
                return ops.conv2d_backward(dy, cache, input_grad), dy
            sums, after = ops.batchnorm_grad_sums_taker(bn_cache)
            got = ops.conv2d_backward(dy, cache, input_grad, after)
            return (*got, *sums), dy

    (got, dy), (want, _) = run(True), run(False)
    assert len(calls) == threads  # one compiled call per thread, none in the Python loop
    assert len(got) == len(want)
    for g, w_ in zip(got, want, strict=True):
        assert (g is None) == (w_ is None)
        if g is not None:
            np.testing.assert_allclose(g, w_, rtol=2e-5, atol=2e-5)
    dx, dw, db = got[:3]
    if pool is None:  # the reference's gradients
        y = ref.conv2d_forward(x, w, b, 1, "same")
        dyr = dy * (y > 0) if step == "relu-bias" else dy
        rdx, rdw, rdb = ref.conv2d_backward(dyr, x, w, 1, "same")
        np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-3)
        if input_grad:
            np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
        if b is not None:
            np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=1e-4)
        else:
            assert db is None
    if not input_grad:
        assert dx is None
    if bn:  # the sums batch norm would take of dx itself
        sb, sg = np.empty((5, 16)), np.empty((5, 16))
        x2, mean, _, inv_std, _, _, per, (g, bt) = bn_cache
        ops._k().batchnorm_grad_sums(
            dx.reshape(-1, 16), x2, mean, inv_std, g, bt, True, per, sb, sg
        )
        np.testing.assert_array_equal(got[3], sb)
        np.testing.assert_array_equal(got[4], sg)
