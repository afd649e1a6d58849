"""The fast ops are held to the loop reference that slides the kernel as the article describes."""

from __future__ import annotations

import numpy as np
import pytest

from classic_cnn import ops
from classic_cnn import reference as ref

from .conftest import rel_error

# (input N×H×W×C, kernel KH×KW, C_out, stride, padding)
CONV_CASES = [
    ((2, 7, 8, 3), (3, 3), 4, 1, "valid"),
    ((2, 7, 8, 3), (3, 3), 4, 1, "same"),
    ((1, 9, 9, 1), (5, 5), 2, 1, "same"),
    ((2, 8, 7, 2), (4, 4), 3, 2, "same"),  # even kernel, stride 2
    ((2, 10, 9, 5), (2, 3), 3, 3, "same"),  # non-square even kernel, stride 3
    ((2, 11, 11, 6), (3, 3), 2, 3, "valid"),
    ((3, 6, 5, 4), (2, 2), 5, 1, 1),
    ((1, 12, 12, 3), (7, 7), 2, 2, 2),
    ((2, 5, 5, 8), (1, 1), 3, 1, "valid"),  # 1×1 kernel
    ((2, 4, 4, 2), (4, 4), 3, 1, "valid"),  # kernel as large as the input
    # the paths of ops.conv2d_forward: stride 1 with KH·KW·C_in < DIRECT_MAX_PATCH is computed
    # directly (compiled loops); the rest as im2col × kernels
    ((3, 28, 28, 1), (5, 5), 6, 1, "same"),  # LeNet's first conv: direct
    ((2, 14, 14, 6), (5, 5), 16, 1, "valid"),  # LeNet's second conv: 150 per patch, im2col
    ((2, 9, 9, 8), (5, 5), 3, 1, "same"),  # stride 1 with 200 per patch: im2col
    ((2, 11, 9, 10), (3, 3), 10, 1, "valid"),  # TinyVGG's second conv: direct
    ((1, 1, 1, 2), (1, 1), 2, 1, "valid"),  # a single pixel
    ((2, 6, 7, 3), (2, 3), 7, 1, "same"),  # direct: 6 taps (4 + 2), 7 kernels (triples + 1)
    ((2, 7, 6, 2), (3, 3), 5, 1, "same"),  # direct: 9 taps (4 + 5), 5 kernels (a triple + 2)
    ((2, 5, 6, 1), (2, 2), 2, 1, "valid"),  # direct: 4 taps, 2 kernels (no triple)
]


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape,kernel,cout,stride,padding", CONV_CASES)
def test_conv_matches_reference(rng, shape, kernel, cout, stride, padding, dtype, tol):
    x = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=(*kernel, shape[3], cout)).astype(dtype)
    b = rng.normal(size=cout).astype(dtype)
    y, cache = ops.conv2d_forward(x, w, b, stride, padding)
    assert y.dtype == dtype
    y_ref = ref.conv2d_forward(x, w, b, stride, padding)
    assert y.shape == y_ref.shape
    assert rel_error(y, y_ref) < tol
    dy = rng.normal(size=y.shape).astype(dtype)
    dx, dw, db = ops.conv2d_backward(dy, cache)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, x, w, stride, padding)
    for got, want in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert got.dtype == dtype
        assert got.shape == want.shape
        assert rel_error(got, want) < tol


def test_conv_without_bias_and_without_input_gradient(rng):
    x = rng.normal(size=(2, 6, 6, 2))
    w = rng.normal(size=(3, 3, 2, 4))
    y, cache = ops.conv2d_forward(x, w, None, 1, "same")
    assert rel_error(y, ref.conv2d_forward(x, w, None, 1, "same")) < 1e-12
    dy = rng.normal(size=y.shape)
    dx, dw, db = ops.conv2d_backward(dy, cache, input_grad=False)
    assert dx is None and db is None
    assert rel_error(dw, ref.conv2d_backward(dy, x, w, 1, "same")[1]) < 1e-12


POOL_CASES = [
    ((2, 8, 8, 3), (2, 2), 2),
    ((2, 9, 7, 2), (2, 2), 2),  # odd sizes: the last row/column belongs to no window
    ((2, 8, 8, 3), (3, 3), 1),
    ((2, 9, 9, 2), (3, 3), 2),
    ((1, 7, 10, 4), (2, 3), 1),
    ((2, 12, 12, 1), (4, 4), 4),
    ((2, 6, 6, 2), (3, 3), 3),
    ((3, 28, 28, 6), (2, 2), 2),  # LeNet's first pooling
    ((1, 20, 20, 2), (17, 17), 1),  # more than 256 positions in a window
    # the 2×2 windows' own compiled path: overlapping, with gaps, many channels, odd sizes
    ((2, 7, 9, 5), (2, 2), 1),
    ((2, 8, 9, 2), (2, 2), 3),
    ((2, 11, 10, 16), (2, 2), 2),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,pool,stride", POOL_CASES)
def test_pooling_matches_reference(rng, shape, pool, stride, dtype):
    x = rng.normal(size=shape).astype(dtype)
    y, cache = ops.maxpool2d_forward(x, pool, stride)
    np.testing.assert_array_equal(y, ref.maxpool2d_forward(x, pool, stride))
    dy = rng.normal(size=y.shape).astype(dtype)
    # overlapping windows add several gradients into one element, in another order in float32
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert (
        rel_error(ops.maxpool2d_backward(dy, cache), ref.maxpool2d_backward(dy, x, pool, stride))
        < tol
    )
    y, cache = ops.avgpool2d_forward(x, pool, stride)
    assert rel_error(y, ref.avgpool2d_forward(x, pool, stride)) < tol
    assert (
        rel_error(ops.avgpool2d_backward(dy, cache), ref.avgpool2d_backward(dy, x, pool, stride))
        < tol
    )


@pytest.mark.parametrize("pool,stride", [((2, 2), 2), ((2, 2), 1), ((3, 3), 1), ((3, 3), 2)])
def test_max_pool_ties_send_gradient_to_first_in_row_major_order(rng, pool, stride):
    """With many equal values, exactly one element per window gets the gradient: the first
    maximum in reading order, as the reference's argmax picks it."""
    x = rng.integers(0, 3, size=(2, 9, 9, 3)).astype(np.float64)
    y, cache = ops.maxpool2d_forward(x, pool, stride)
    dy = np.ones_like(y)
    dx = ops.maxpool2d_backward(dy, cache)
    np.testing.assert_array_equal(dx, ref.maxpool2d_backward(dy, x, pool, stride))
    assert dx.sum() == y.size  # each window's unit of gradient went to one element only


def test_all_equal_window_gives_gradient_to_top_left():
    x = np.full((1, 2, 2, 1), 7.0)
    _, cache = ops.maxpool2d_forward(x, (2, 2), 2)
    dx = ops.maxpool2d_backward(np.array([[[[5.0]]]]), cache)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[5.0, 0.0], [0.0, 0.0]])


def test_im2col_rows_are_the_receptive_fields(rng):
    x = rng.normal(size=(2, 5, 6, 3))
    pads = ((1, 0), (0, 1))
    cols = ops.im2col(x, 3, 2, 2, pads)
    xp = ref.pad_input(x, pads)
    n, oh, ow = cols.shape[:3]
    assert (oh, ow) == (ops.output_size(5, 3, 2, 1, 0), ops.output_size(6, 2, 2, 0, 1))
    for img in range(n):
        for i in range(oh):
            for j in range(ow):
                np.testing.assert_array_equal(
                    cols[img, i, j], xp[img, 2 * i : 2 * i + 3, 2 * j : 2 * j + 2, :]
                )
