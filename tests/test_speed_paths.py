"""The compiled fast paths of ops.py: both convolution algorithms held to the loop reference,
bit-identical training steps, and numba kept out of start-up."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from classic_cnn import SGD as Sgd
from classic_cnn import CrossEntropyLoss, ops, presets
from classic_cnn import reference as ref

from .conftest import rel_error


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("cin,kernel,stride", [(1, 5, 1), (3, 3, 1), (6, 5, 1), (3, 3, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_direct_and_im2col_paths_match_reference(rng, dtype, tol, cin, kernel, stride, bias):
    x = rng.normal(size=(2, 9, 8, cin)).astype(dtype)
    w = rng.normal(size=(kernel, kernel, cin, 4)).astype(dtype)
    b = rng.normal(size=4).astype(dtype) if bias else None
    direct = ops._direct(w, stride)
    assert direct == (stride == 1 and kernel * kernel * cin < ops.DIRECT_MAX_PATCH)
    y, cache = ops.conv2d_forward(x, w, b, stride, "same")
    assert y.dtype == dtype and y.flags.c_contiguous
    assert rel_error(y, ref.conv2d_forward(x, w, b, stride, "same")) < tol
    dy = rng.normal(size=y.shape).astype(dtype)
    dx, dw, db = ops.conv2d_backward(dy, cache)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, x, w, stride, "same")
    assert dx.dtype == dw.dtype == dtype
    assert rel_error(dx, dx_ref) < tol and rel_error(dw, dw_ref) < tol
    assert (db is None) if b is None else rel_error(db, db_ref) < tol
    none, dw2, _ = ops.conv2d_backward(dy, cache, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)


def test_conv_accepts_non_contiguous_inputs(rng):
    x = rng.normal(size=(2, 10, 10, 3)).astype(np.float32)[:, ::2, 1:, :]
    w = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    y, cache = ops.conv2d_forward(x, w, None, 1, "valid")
    assert rel_error(y, ref.conv2d_forward(x, w, None, 1, "valid")) < 1e-5
    dy = rng.normal(size=y.shape).astype(np.float32)[..., ::-1]
    dx, dw, _ = ops.conv2d_backward(dy, cache)
    dx_ref, dw_ref, _ = ref.conv2d_backward(np.ascontiguousarray(dy), x, w, 1, "valid")
    assert rel_error(dx, dx_ref) < 1e-5 and rel_error(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize(
    "shape,kernel,stride,padding",
    [
        ((7, 9, 8, 12), (3, 3), 1, "same"),  # direct size, forced to im2col below
        ((5, 10, 9, 3), (4, 4), 2, "same"),  # stride 2, odd total padding
        ((6, 8, 8, 2), (3, 5), 3, ((2, 0), (1, 3))),  # uneven explicit padding
        ((4, 6, 6, 5), (6, 6), 1, "valid"),  # kernel as large as the input
    ],
)
@pytest.mark.parametrize("piece_images", [1, 3])
def test_im2col_path_in_pieces_matches_reference(
    rng, monkeypatch, dtype, tol, shape, kernel, stride, padding, piece_images
):
    """The im2col path works on pieces of a few images (patches kept in a reused, cache-sized
    buffer; the weight gradient summed piece by piece): pieces of 1 and 3 images, batches that
    do not divide evenly, padding on every side, strides 1–3."""
    monkeypatch.setattr(ops, "DIRECT_MAX_PATCH", 0)
    monkeypatch.setattr(ops, "WINOGRAD", False)  # its own tests: test_winograd.py
    x = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=(*kernel, shape[3], 4)).astype(dtype)
    b = rng.normal(size=4).astype(dtype)
    oh = ops.output_size(
        shape[1], kernel[0], stride, *ops.resolve_padding(padding, shape[1:3], kernel, stride)[0]
    )
    ow = ops.output_size(
        shape[2], kernel[1], stride, *ops.resolve_padding(padding, shape[1:3], kernel, stride)[1]
    )
    patch_bytes = oh * ow * kernel[0] * kernel[1] * shape[3] * np.dtype(dtype).itemsize
    monkeypatch.setattr(ops, "IM2COL_PIECE_BYTES", piece_images * patch_bytes)
    # at most piece_images images a piece, the pieces as even as possible (4 images in pieces
    # of at most 3: 2 and 2; 7: 3, 3 and 1)
    pieces = -(-shape[0] // piece_images)
    assert ops._piece_images(shape[0], oh * ow, kernel[0] * kernel[1] * shape[3], dtype) == (
        -(-shape[0] // pieces)
    )
    y, cache = ops.conv2d_forward(x, w, b, stride, padding)
    assert rel_error(y, ref.conv2d_forward(x, w, b, stride, padding)) < tol
    dy = rng.normal(size=y.shape).astype(dtype)
    dx, dw, db = ops.conv2d_backward(dy, cache)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, x, w, stride, padding)
    assert rel_error(dx, dx_ref) < tol
    assert rel_error(dw, dw_ref) < tol
    assert rel_error(db, db_ref) < tol


@pytest.mark.parametrize("compiled_loop", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("piece_images", [2, 8])
def test_backward_reuses_the_patches_still_held_and_never_stale_ones(
    rng, monkeypatch, threads, piece_images, compiled_loop
):
    """The backward pass gathers again only the patches its thread's workspace no longer
    holds: with one piece per thread, none; with more, all but the last forward piece of
    each thread. When another convolution of the same shapes ran in between, every piece is
    gathered again, and the gradients stay the reference's. The same whether the forward
    pass ran its pieces in Python or in one compiled loop per thread (where oneMKL computes
    the products; its gathers are then not seen here)."""
    monkeypatch.setattr(ops, "DIRECT_MAX_PATCH", 0)
    monkeypatch.setattr(ops, "WINOGRAD", False)
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    if compiled_loop and ops._blas.gemm_address(np.float32) is None:
        pytest.skip("oneMKL does not compute the products here")
    if not compiled_loop:
        monkeypatch.setattr(ops._blas, "gemm_address", lambda dtype: None)
    gathers = []
    real = ops._im2col_into
    monkeypatch.setattr(ops, "_im2col_into", lambda x, *a: gathers.append(len(x)) or real(x, *a))
    shape, kernel = (8, 7, 6, 3), (3, 3)
    monkeypatch.setattr(ops, "IM2COL_PIECE_BYTES", piece_images * 7 * 6 * 9 * 3 * 4)
    x1, x2 = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    w = rng.normal(size=(*kernel, 3, 4)).astype(np.float32)
    forward = 0 if compiled_loop else 1  # gathers seen per piece (not the compiled loop's)
    with ops.engine_threads(threads):
        pieces = -(-8 // ops._piece_images(8, 42, 27, np.float32))
        y1, cache1 = ops.conv2d_forward(x1, w, None, 1, "same")
        assert len(gathers) == forward * pieces
        dy = rng.normal(size=y1.shape).astype(np.float32)
        dx, dw, _ = ops.conv2d_backward(dy, cache1)
        assert len(gathers) == forward * (2 * pieces - min(threads, pieces))
        dx_ref, dw_ref, _ = ref.conv2d_backward(dy, x1, w, 1, "same")
        assert rel_error(dx, dx_ref) < 1e-5 and rel_error(dw, dw_ref) < 1e-5
        _, cache1 = ops.conv2d_forward(x1, w, None, 1, "same")
        ops.conv2d_forward(x2, w, None, 1, "same")  # same shapes, other images
        gathers.clear()
        dx, dw, _ = ops.conv2d_backward(dy, cache1)
        assert len(gathers) == forward * pieces
        assert rel_error(dx, dx_ref) < 1e-5 and rel_error(dw, dw_ref) < 1e-5
        if threads == 1:  # what the workspace holds is used, not gathered again: spoil it
            ops.conv2d_forward(x1, w, None, 1, "same")
            _, cache1 = ops.conv2d_forward(x1, w, None, 1, "same")
            ops._WORK.bufs[("cols", np.dtype(np.float32).str)][:] = np.nan
            _, dw, _ = ops.conv2d_backward(dy, cache1)
            assert np.isnan(dw).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_dropout_keeps_what_the_reference_hash_keeps(monkeypatch, dtype, threads):
    """One compiled pass (split over threads): an element is kept where the reference's
    counter hash of (key, index) says so, whatever the thread count; the backward pass
    recomputes the same mask. A NaN stays NaN even where dropped, as ``x · 0`` does."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    x = np.random.default_rng(1).normal(size=(5, 7, 3, 4)).astype(dtype)
    x[0, 0, 0, :] = np.nan
    dy = np.random.default_rng(2).normal(size=x.shape).astype(dtype)
    rate = 0.3
    key = int(np.random.default_rng(9).integers(0, 2**63))  # the one draw from the stream
    mask = ref.dropout_keep(key, x.size, rate).reshape(x.shape).astype(dtype)
    mask *= dtype(1.0 / (1.0 - rate))
    with ops.engine_threads(threads):
        y, cache = ops.dropout_forward(x, rate, np.random.default_rng(9), training=True)
        dx = ops.dropout_backward(dy, cache)
    np.testing.assert_array_equal(y, x * mask)
    np.testing.assert_array_equal(dx, dy * mask)
    assert y.dtype == dx.dtype == dtype and np.isnan(y[0, 0, 0]).all()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_masks_keep_the_asked_share_without_pattern(rate):
    """The counter hash behaves as independent coin flips: the kept share is 1 − rate within
    5 binomial standard deviations, overall and in every position of a 7-element period,
    neighbours are uncorrelated, and each call (a new key) draws a new mask."""
    n = 700_000
    rng = np.random.default_rng(5)
    x = np.ones(n, dtype=np.float32)
    kept = ops.dropout_forward(x, rate, rng, training=True)[0] > 0
    sd = np.sqrt(rate * (1 - rate) / n)
    assert abs(kept.mean() - (1 - rate)) < 5 * sd
    for phase in kept.reshape(-1, 7).T:
        assert abs(phase.mean() - (1 - rate)) < 5 * sd * np.sqrt(7)
    k = kept.astype(np.float64)
    assert abs(np.corrcoef(k[:-1], k[1:])[0, 1]) < 5 / np.sqrt(n)
    again = ops.dropout_forward(x, rate, rng, training=True)[0] > 0
    assert abs(np.corrcoef(k, again.astype(np.float64))[0, 1]) < 5 / np.sqrt(n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_matches_numpy(rng, dtype):
    x = rng.normal(size=(3, 5, 4, 2)).astype(dtype)
    x[0, 0, 0, 0] = 0.0
    _, cache = ops.relu_forward(x)
    dy = rng.normal(size=x.shape).astype(dtype)
    dx = ops.relu_backward(dy, cache)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))


@pytest.mark.determinism
@pytest.mark.parametrize("arch", ["lenet5", "small", "article"])
def test_a_training_step_twice_gives_bit_identical_weights(arch):
    """Same weights, data and thread count: two training steps agree to the last bit."""

    def step():
        model = presets.build(arch, seed=3)
        data = np.random.default_rng(1).random((16, *model.input_shape), dtype=np.float32)
        labels = np.arange(16) % 10
        opt = Sgd(lr=0.05, momentum=0.9)
        losses = [model.train_step(data, labels, CrossEntropyLoss(), opt) for _ in range(2)]
        return losses, model.state_dict()

    (l1, w1), (l2, w2) = step(), step()
    assert l1 == l2
    assert w1.keys() == w2.keys()
    for k in w1:
        assert np.array_equal(w1[k], w2[k]), k


def test_weight_gradient_does_not_depend_on_the_thread_count(rng):
    """The direct path sums per image, then in image order: any thread count, same bits."""
    numba = pytest.importorskip("numba")
    x = rng.normal(size=(8, 12, 12, 3)).astype(np.float32)
    w = rng.normal(size=(5, 5, 3, 6)).astype(np.float32)
    y, _ = ops.conv2d_forward(x, w, None, 1, "same")
    dy = rng.normal(size=y.shape).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append(ops.conv2d_backward(dy, ops.conv2d_forward(x, w, None, 1, "same")[1]))
    finally:
        numba.set_num_threads(before)
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_importing_the_package_and_cnn_help_do_not_load_numba():
    """numba costs a large fraction of a second to import: only computing loads it."""
    code = "import sys, classic_cnn, classic_cnn.cli\nprint('numba' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    help_run = (
        "import sys\n"
        "from classic_cnn.cli import main\n"
        "sys.argv = ['cnn', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('numba' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", help_run], capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "False", out.stderr


def _batchnorm_plain(x, gamma, beta, mean, var, eps):
    """Batch norm written out with NumPy, float64 (the formula the compiled passes compute)."""
    x, gamma, beta = (np.asarray(a, np.float64) for a in (x, gamma, beta))
    xhat = (x - mean) / np.sqrt(var + eps)
    return xhat, xhat * gamma + beta


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (7, 9)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_plain_numpy(rng, dtype, tol, shape, training):
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    c = shape[-1]
    gamma = rng.normal(size=c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    rm, rv = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, size=c).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, cache = ops.batchnorm_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5)
    axes = tuple(range(x.ndim - 1))
    x64 = x.astype(np.float64)
    if training:
        mean, var = x64.mean(axis=axes), x64.var(axis=axes)
        m = x.size // c
        assert rel_error(rm, 0.9 * rm0 + 0.1 * mean) < tol
        assert rel_error(rv, 0.9 * rv0 + 0.1 * var * m / (m - 1)) < tol
    else:
        mean, var = rm0.astype(np.float64), rv0.astype(np.float64)
    xhat, y_want = _batchnorm_plain(x, gamma, beta, mean, var, 1e-5)
    assert y.dtype == dtype and rel_error(y, y_want) < tol
    dy = rng.normal(size=shape).astype(dtype)
    dx, dgamma, dbeta = ops.batchnorm_backward(dy, cache)
    dy64 = dy.astype(np.float64)
    dbeta_want = dy64.sum(axis=axes)
    dgamma_want = (dy64 * xhat).sum(axis=axes)
    dxhat = dy64 * gamma
    inv_std = 1 / np.sqrt(var + 1e-5)
    if training:
        dx_want = inv_std * (dxhat - dxhat.mean(axis=axes) - xhat * (dxhat * xhat).mean(axis=axes))
    else:
        dx_want = dxhat * inv_std
    for got, want in ((dx, dx_want), (dgamma, dgamma_want), (dbeta, dbeta_want)):
        assert got.dtype == dtype and rel_error(got, want) < tol


@pytest.mark.parametrize("threads", [1, 2])
def test_batchnorm_statistics_over_many_blocks_keep_full_precision(monkeypatch, threads):
    """Far from zero (mean 1e4, spread 1) the batch variance over several blocks of rows still
    has float64's precision: the blocks' sums are combined without cancellation (a one-pass
    Σx² − (Σx)²/m would be off by about 1e-7 here)."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    rng = np.random.default_rng(3)
    m = 3 * ops._block_rows((1, 4), 8) + 17
    x = 1e4 + rng.normal(size=(m, 4))
    rm, rv = np.zeros(4), np.zeros(4)
    with ops.engine_threads(threads):
        y, _ = ops.batchnorm_forward(x, np.ones(4), np.zeros(4), rm, rv, True, 1.0, 1e-5)
    # exact sums (NumPy's along axis 0 add row after row and are off by about 1e-14 here)
    mean = np.array([math.fsum(col) / m for col in x.T])
    var = np.array([math.fsum((col - mu) ** 2) / m for col, mu in zip(x.T, mean, strict=True)])
    np.testing.assert_allclose(rm, mean, rtol=1e-15, atol=0)
    np.testing.assert_allclose(rv, var * m / (m - 1), rtol=1e-12, atol=0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=0, atol=1e-11)


_MALLOC_PROBE = """
import ctypes, json
import numpy as np
from classic_cnn import ops

class MallInfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
with ops.engine_threads(1):
    a = np.ones(2 << 20, np.float32)  # 8 MB
    mapped = libc.mallinfo2().hblkhd
    del a
    free_in_heap = libc.mallinfo2().fordblks
print(json.dumps([ops.tune_malloc(), mapped, free_in_heap]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_engine_keeps_freed_memory_for_the_next_step():
    """Inside the engine glibc's malloc serves a step's arrays (up to 32 MB) from its heap and
    keeps them there when freed (ops.tune_malloc), so the next step reuses the pages instead
    of page-faulting on fresh ones (measured: about 270 faults per LeNet-5 step at batch 64
    without it, none with it). glibc's own counters show both halves; with
    CLASSIC_CNN_MALLOC=system malloc is left alone and maps the 8 MB array by itself."""
    import json
    import os

    def probe(**env):
        out = subprocess.run(
            [sys.executable, "-c", _MALLOC_PROBE],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        if out.returncode:
            pytest.skip(f"no glibc mallinfo2 here: {out.stderr.strip().splitlines()[-1]}")
        return json.loads(out.stdout)

    applied, mapped, free_in_heap = probe()
    assert applied
    assert mapped < 8 << 20  # served from the heap
    assert free_in_heap >= 8 << 20  # and kept there once freed
    applied, mapped, _ = probe(CLASSIC_CNN_MALLOC="system")
    assert not applied
    assert mapped >= 8 << 20  # glibc's default: an array this big gets pages of its own


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_images_are_normalised_to_numpys_very_bits(rng, dtype, channels):
    """Preprocessing.apply through a table of each channel's 256 results gives exactly
    NumPy's ``images.astype(dtype) * scale - shift``."""
    from classic_cnn.data.batches import Preprocessing

    images = rng.integers(0, 256, size=(5, 7, 6, channels), dtype=np.uint8)
    images[0, 0, 0] = 0
    images[0, 0, 1] = 255
    mean = tuple(rng.uniform(0.1, 0.6, channels))
    std = tuple(rng.uniform(0.2, 0.4, channels))
    prep = Preprocessing((7, 6), channels, mean, std)
    scale = (1.0 / (255.0 * np.asarray(std))).astype(dtype)
    shift = (np.asarray(mean) / np.asarray(std)).astype(dtype)
    want = images.astype(dtype) * scale - shift
    got = prep.apply(images, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # a strided batch (every other image) gives the same numbers as its copy
    np.testing.assert_array_equal(prep.apply(images[::2], dtype), want[::2])
