"""A convolution or batch norm followed by ReLU runs as one step in Sequential
(``relu=True`` in ops.conv2d_forward / ops.batchnorm_forward): the very numbers of the two
layers run one by one, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest

from classic_cnn import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, ops
from classic_cnn.losses import CrossEntropyLoss

#: every test here checks bits: `make test` runs them again on the AVX2 kernels
pytestmark = pytest.mark.determinism


def _net(seed=0):
    return Sequential(
        [
            Conv2D(4, 3, padding="same"),
            BatchNorm(),
            ReLU(),
            MaxPool2D(2),
            Conv2D(6, 3),
            BatchNorm(),
            ReLU(),
            Flatten(),
            Dense(8),
            BatchNorm(),
            ReLU(),
            Dense(3),
        ],
        (8, 8, 2),
        seed=seed,
    )


def _conv_net(seed=0):
    """Convolutions followed by ReLU on both paths (direct: 3×3×2 patches; im2col: 3×3×20,
    and stride 2), with and without bias."""
    return Sequential(
        [
            Conv2D(20, 3, padding="same"),
            ReLU(),
            Conv2D(6, 3, use_bias=False),
            ReLU(),
            MaxPool2D(2),
            Conv2D(5, 2, stride=2),
            ReLU(),
            Flatten(),
            Dense(3),
        ],
        (9, 9, 2),
        seed=seed,
    )


def _one_by_one(model, x, y, training):
    """Forward and backward through each layer on its own (no fusion), as explain.py does."""
    loss = CrossEntropyLoss()
    z = x
    for layer in model.layers:
        z = layer.forward(z, training)
    value = loss.forward(z, y)
    d = loss.backward()
    for layer in reversed(model.layers):
        d = layer.backward(d)
    return z, value, d, {k: v.copy() for k, v in model.gradients().items()}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_batchnorm_relu_gives_the_bits_of_the_two_layers(monkeypatch, training, threads):
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    calls = []
    real, real_pool = ops.batchnorm_forward, ops.batchnorm_maxpool_forward
    monkeypatch.setattr(  # (fused with ReLU?, statistics taken by the convolution before?)
        ops,
        "batchnorm_forward",
        lambda *a, **k: (calls.append((k.get("relu"), "moments" in k)), real(*a, **k))[1],
    )
    monkeypatch.setattr(  # batch norm + ReLU + max pooling: the ReLU goes without saying
        ops,
        "batchnorm_maxpool_forward",
        lambda *a, **k: (calls.append(("pool", k.get("moments") is not None)), real_pool(*a, **k))[
            1
        ],
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=5)
    a, b = _net(), _net()
    with ops.engine_threads(threads):
        want = _one_by_one(a, x, y, training)
    assert calls == [(None, False)] * 3
    calls.clear()
    loss = CrossEntropyLoss()
    # at the same thread count as the layers one by one: the engine's bits are the same for
    # the same thread count, not across counts (dense products split over 2 threads run other
    # BLAS kernels, e.g. oneMKL's AVX2 ones, than the whole batch on 1)
    with ops.engine_threads(threads):
        z = b.forward(x, training)
        # every batch norm ran fused with its ReLU; in training the two after convolutions
        # took their statistics from them
        assert calls == [("pool", training), (True, training), (True, False)]
        value = loss.forward(z, y)
        d = b.backward(loss.backward())
    np.testing.assert_array_equal(z, want[0])
    assert value == want[1]
    np.testing.assert_array_equal(d, want[2])
    got = b.gradients()
    assert got.keys() == want[3].keys()
    for name, g in want[3].items():
        np.testing.assert_array_equal(got[name], g, err_msg=name)
    for la, lb in zip(a.layers, b.layers, strict=True):  # running statistics too
        for name, buf in la.buffers.items():
            np.testing.assert_array_equal(lb.buffers[name], buf)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_convolution_relu_gives_the_bits_of_the_two_layers(monkeypatch, threads):
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    calls = []
    real, real_pool = ops.conv2d_forward, ops.conv2d_maxpool_forward
    monkeypatch.setattr(
        ops, "conv2d_forward", lambda *a, **k: (calls.append(k.get("relu")), real(*a, **k))[1]
    )
    monkeypatch.setattr(  # conv + ReLU + pooling: the ReLU flag is its sixth argument
        ops, "conv2d_maxpool_forward", lambda *a: (calls.append(a[5]), real_pool(*a))[1]
    )
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 9, 9, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=3)
    a, b = _conv_net(), _conv_net()
    paths = []
    with ops.engine_threads(threads):
        want = _one_by_one(a, x, y, True)
        paths = [layer._cache[5] for layer in a.layers if isinstance(layer, Conv2D)]
        assert calls == [None] * 3
        calls.clear()
        loss = CrossEntropyLoss()
        z = b.forward(x, True)
        assert calls == [True] * 3
        value = loss.forward(z, y)
        d = b.backward(loss.backward())
    assert paths == [None, "winograd", "im2col"]  # direct, Winograd and im2col paths all fused
    np.testing.assert_array_equal(z, want[0])
    assert value == want[1]
    np.testing.assert_array_equal(d, want[2])
    for name, g in want[3].items():
        np.testing.assert_array_equal(b.gradients()[name], g, err_msg=name)


def test_fused_relu_keeps_nan_visible():
    """A NaN out of batch norm stays NaN after the fused ReLU (np.maximum's rule), so a
    diverging run is still seen as diverging."""
    x = np.ones((4, 3), dtype=np.float32)
    x[0, 1] = np.nan
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, _ = ops.batchnorm_forward(
        x, g, b, np.zeros(3, np.float32), np.ones(3, np.float32), True, relu=True
    )
    assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, [0, 2]]).any()
    assert (y[:, [0, 2]] == 0).all()  # constant channels normalise to 0, ReLU keeps 0
    for shape in [(1, 4, 4, 2), (1, 4, 4, 30)]:  # direct and im2col paths
        x = -np.ones(shape, dtype=np.float32)
        x[0, 1, 1, 0] = np.nan
        w = np.ones((3, 3, shape[3], 2), dtype=np.float32)
        for bias in (None, np.full(2, 0.5, np.float32)):  # with a bias: one fused pass
            y, _ = ops.conv2d_forward(x, w, bias, 1, "same", relu=True)
            assert np.isnan(y[0, :3, :3]).all() and (y[0, 3] == 0).all()


def test_activation_maps_still_show_batch_norm_before_relu():
    """Fusion lives in Sequential.forward only; a layer run on its own gives its own output
    (the explorer's activation maps show batch norm's negatives)."""
    model = _net()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype(np.float32)
    z = model.layers[0].forward(x)
    bn = model.layers[1].forward(z)
    assert (bn < 0).any()


def _pool_net(pool, stride, seed=0):
    """Convolution + ReLU + max pooling on the direct path (3×3×2 patches, 'same' and
    'valid') and on the im2col path (3×3×16), with and without bias."""
    return Sequential(
        [
            Conv2D(16, 3, padding="same"),
            ReLU(),
            MaxPool2D(pool, stride),
            Conv2D(5, 3, use_bias=False),
            ReLU(),
            MaxPool2D(pool, stride),
            Flatten(),
            Dense(3),
        ],
        (13, 12, 2),
        seed=seed,
    )


@pytest.mark.parametrize("pool,stride", [(2, 2), (2, 1), (3, 2)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["winograd", "im2col"])
def test_convolution_relu_and_max_pooling_in_one_step_give_the_bits_of_three(
    monkeypatch, pool, stride, threads, path
):
    """Sequential runs conv + ReLU + max pooling as one step (each thread takes its images
    through both on the direct path): the forward output, loss, dx and every gradient are
    the very numbers of the three layers run one by one, and both pooling layers' caches
    are filled as their own forward passes fill them."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "WINOGRAD", path == "winograd")
    calls = []
    real = ops.conv2d_maxpool_forward
    monkeypatch.setattr(
        ops, "conv2d_maxpool_forward", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k)
    )
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 13, 12, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=5)
    a, b = _pool_net(pool, stride), _pool_net(pool, stride)
    loss = CrossEntropyLoss()
    with ops.engine_threads(threads):
        want = _one_by_one(a, x, y, True)
        assert calls == []
        z = b.forward(x, True)
        assert calls == [(3, 3, 2, 16), (3, 3, 16, 5)]  # both triples fused
        value = loss.forward(z, y)
        d = b.backward(loss.backward())
    assert [ly._cache[5] for ly in b.layers if isinstance(ly, Conv2D)] == [None, path]
    np.testing.assert_array_equal(z, want[0])
    assert value == want[1]
    np.testing.assert_array_equal(d, want[2])
    for name, g in want[3].items():
        np.testing.assert_array_equal(b.gradients()[name], g, err_msg=name)
    for la, lb in zip(a.layers, b.layers, strict=True):
        if isinstance(la, MaxPool2D):
            np.testing.assert_array_equal(la._cache[1], lb._cache[1])  # the winners


def _bn_pool_net(pool, stride, seed=0):
    """Convolution, batch norm + ReLU + max pooling twice (the fashion preset's blocks); the
    first convolution on the direct path (3×3×2 patches), the second on the im2col path
    (3×3×16)."""
    return Sequential(
        [
            Conv2D(16, 3, padding="same", use_bias=False),
            BatchNorm(),
            ReLU(),
            MaxPool2D(pool, stride),
            Conv2D(5, 3, use_bias=False),
            BatchNorm(),
            ReLU(),
            MaxPool2D(pool, stride),
            Flatten(),
            Dense(3),
        ],
        (13, 12, 2),
        seed=seed,
    )


@pytest.mark.parametrize("pool,stride", [(2, 2), (2, 1), (3, 2)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_bytes", [1 << 20, 1])
@pytest.mark.parametrize("path", ["winograd", "im2col"])
def test_batch_norm_relu_and_max_pooling_in_one_step_give_the_bits_of_three(
    monkeypatch, pool, stride, threads, block_bytes, path
):
    """Sequential runs batch norm + ReLU + max pooling as one step (each thread normalises a
    few images into a buffer of its own and pools them from there; backward, it routes the
    pooled gradient into that buffer twice, for the sums and for dx): the forward output,
    running statistics, loss, dx, every gradient and the pooling winners are the very
    numbers of the layers run one by one, with one block of images and with several."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "WINOGRAD", path == "winograd")
    monkeypatch.setattr(ops, "BLOCK_BYTES", block_bytes)  # 1: one image per block
    calls = []
    real = ops.batchnorm_maxpool_forward
    monkeypatch.setattr(  # the statistics taken by the convolution before, on both paths
        ops,
        "batchnorm_maxpool_forward",
        lambda *a, **k: calls.append(k["moments"][0].shape) or real(*a, **k),
    )
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 13, 12, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=5)
    a, b = _bn_pool_net(pool, stride), _bn_pool_net(pool, stride)
    loss = CrossEntropyLoss()
    with ops.engine_threads(threads):
        want = _one_by_one(a, x, y, True)
        assert calls == []
        z = b.forward(x, True)
        assert calls == [(5, 16), (5, 5)]  # both triples fused
        value = loss.forward(z, y)
        d = b.backward(loss.backward())
    assert [ly._cache[5] for ly in b.layers if isinstance(ly, Conv2D)] == [None, path]
    np.testing.assert_array_equal(z, want[0])
    assert value == want[1]
    np.testing.assert_array_equal(d, want[2])
    for name, g in want[3].items():
        np.testing.assert_array_equal(b.gradients()[name], g, err_msg=name)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for name, buf in la.buffers.items():
            np.testing.assert_array_equal(lb.buffers[name], buf, err_msg=name)
        if isinstance(la, MaxPool2D):
            np.testing.assert_array_equal(la._cache[1], lb._cache[1])  # the winners


def _conv_bn_chain(seed=0):
    """Convolutions each followed by batch norm + ReLU (the fashion preset's pattern): the
    second convolution on the im2col path (3×3×16 patches), the third on the direct path
    (3×3×8)."""
    return Sequential(
        [
            Conv2D(16, 3, padding="same", use_bias=False),
            BatchNorm(),
            ReLU(),
            Conv2D(8, 3, padding="same", use_bias=False),
            BatchNorm(),
            ReLU(),
            Conv2D(5, 3),
            BatchNorm(),
            ReLU(),
            MaxPool2D(2),
            Flatten(),
            Dense(3),
        ],
        (9, 10, 2),
        seed=seed,
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["winograd", "im2col"])
def test_convolutions_take_the_batch_norm_statistics_and_gradient_sums_with_the_same_bits(
    monkeypatch, threads, path
):
    """In training, a convolution followed by batch norm takes batch norm's statistics as it
    writes its output, and a convolution after batch norm (+ ReLU) takes batch norm's
    gradient sums as it writes dx, on both paths: the output, loss, dx, every gradient and
    the running statistics are the very numbers of the layers run one by one."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "WINOGRAD", path == "winograd")
    takers = []
    real = ops.batchnorm_grad_sums_taker
    monkeypatch.setattr(
        ops, "batchnorm_grad_sums_taker", lambda cache: takers.append(cache[5]) or real(cache)
    )
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 9, 10, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=6)
    a, b = _conv_bn_chain(), _conv_bn_chain()
    loss = CrossEntropyLoss()
    with ops.engine_threads(threads):
        want = _one_by_one(a, x, y, True)
        assert takers == []
        z = b.forward(x, True)
        value = loss.forward(z, y)
        d = b.backward(loss.backward())
    assert takers == [(6, 9, 10, 8), (6, 9, 10, 16)]  # the two batch norms before a conv
    assert [ly._cache[5] for ly in b.layers if isinstance(ly, Conv2D)] == [None, path, None]
    np.testing.assert_array_equal(z, want[0])
    assert value == want[1]
    np.testing.assert_array_equal(d, want[2])
    for name, g in want[3].items():
        np.testing.assert_array_equal(b.gradients()[name], g, err_msg=name)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for name, buf in la.buffers.items():
            np.testing.assert_array_equal(lb.buffers[name], buf, err_msg=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "path,loop", [("winograd", "compiled"), ("winograd", "python"), ("im2col", "python")]
)
def test_batch_norm_input_gradient_is_written_piece_by_piece_with_the_same_bits(
    monkeypatch, threads, path, loop
):
    """Batch norm after a convolution hands its input gradient to the convolution's backward
    pass as ``ops.PendingGradient`` (coefficients known, nothing written); the Winograd path
    writes each piece of it right before using it, the other paths write it whole first.
    Either way: the very dx, gradients and running statistics of the model run without."""
    from classic_cnn import model as model_module

    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "WINOGRAD", path == "winograd")
    monkeypatch.setattr(ops, "WINOGRAD_PIECE_BYTES", 1 << 12)  # several pieces per thread
    if loop == "python":
        monkeypatch.setattr(ops._blas, "gemm_address", lambda dtype: None)
    elif ops._blas.gemm_address(np.float32) is None:
        pytest.skip("oneMKL does not compute the products here")
    received, pended = [], []
    real_backward, kernel = ops.conv2d_backward, ops._k().winograd_conv_backward_pieces
    monkeypatch.setattr(
        ops,
        "conv2d_backward",
        lambda dy, *a, **k: received.append(type(dy).__name__) or real_backward(dy, *a, **k),
    )
    monkeypatch.setattr(
        ops._k(), "winograd_conv_backward_pieces", lambda *a: pended.append(a[-11]) or kernel(*a)
    )
    rng = np.random.default_rng(9)
    x = rng.normal(size=(7, 9, 10, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=7)
    loss = CrossEntropyLoss()

    def run():
        model = _conv_bn_chain()
        with ops.engine_threads(threads):
            loss.forward(model.forward(x, True), y)
            d = model.backward(loss.backward())
        return d, model

    d, model = run()
    assert received == ["PendingGradient"] * 3  # the three convolutions, each before a BN
    assert pended == ([True] * threads if loop == "compiled" else [])
    monkeypatch.setattr(model_module, "_bare_conv", lambda steps, i: False)
    received.clear()
    d_whole, whole = run()
    assert received == ["ndarray"] * 3
    np.testing.assert_array_equal(d, d_whole)
    for name, g in whole.gradients().items():
        np.testing.assert_array_equal(model.gradients()[name], g, err_msg=name)
    for la, lb in zip(whole.layers, model.layers, strict=True):
        for name, buf in la.buffers.items():
            np.testing.assert_array_equal(lb.buffers[name], buf, err_msg=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1])
@pytest.mark.parametrize(
    "path,cin,kernel", [("direct", 2, 3), ("winograd", 16, 3), ("im2col", 6, 5)]
)
@pytest.mark.parametrize("pool,stride", [(2, 2), (3, 2)])
def test_inference_conv_relu_pool_through_scratch_gives_the_pooled_bits(
    monkeypatch, threads, chunk_bytes, path, cin, kernel, pool, stride
):
    """``keep=False`` (what prediction runs): the convolution's output goes a few images at a
    time through a scratch array of the thread instead of a feature map kept for backward;
    the pooled numbers are those of ``keep=True`` bit for bit, on every path, in chunks of
    one image or many, on one thread or two, and nothing is kept for a backward pass."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "CONV_POOL_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(ops, "IM2COL_PIECE_BYTES", 1 << 12)  # several pieces per thread
    monkeypatch.setattr(ops, "WINOGRAD_PIECE_BYTES", 1 << 12)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(7, 13, 12, cin)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, cin, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    with ops.engine_threads(threads):
        want, conv_cache, pool_cache = ops.conv2d_maxpool_forward(
            x, w, b, 1, "same", True, (pool, pool), stride
        )
        got, none1, none2 = ops.conv2d_maxpool_forward(
            x, w, b, 1, "same", True, (pool, pool), stride, keep=False
        )
    assert conv_cache[5] == (None if path == "direct" else path)  # the path meant was taken
    assert (none1, none2) == (None, None)
    np.testing.assert_array_equal(got, want)
    assert pool_cache is not None and np.isfinite(want).all() and (want > 0).any()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cin,size", [(1, (13, 12)), (1, (28, 28)), (2, (9, 14))])
@pytest.mark.parametrize("pool,stride", [(2, 2), (2, 1), (3, 2), (3, 1)])
@pytest.mark.parametrize("relu", [True, False])
def test_direct_inference_pools_from_the_sums_with_the_very_bits(
    monkeypatch, threads, cin, size, pool, stride, relu
):
    """On the direct path, prediction pools each window straight from the convolution's sums
    (``_kernels.conv2d_s1_pooled``): the bits of ``keep=True`` (feature map, then pooling),
    signed zeros and NaNs included, for the common 2×2 stride-2 windows and the rest."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, *size, cin)).astype(np.float32)
    x[0] = 0.0  # all products ±0: with a bias of -0.0, sums of -0.0 and +0.0 ...
    x[0, 5, 5], x[0, 6, 8] = 1.0, 2.0  # ... next to negative sums, whose ReLU is +0.0
    x[1, 3, 4, 0] = np.nan  # a NaN reaches 25 sums, in first and later places of windows
    x[2, 5:, :, :] = -0.0
    w = rng.normal(size=(5, 5, cin, 6)).astype(np.float32)
    w[..., :3] = -np.abs(w[..., :3])
    b = rng.normal(size=6).astype(np.float32)
    b[[0, 4]] = -0.0
    with ops.engine_threads(threads):
        want = ops.conv2d_maxpool_forward(x, w, b, 1, "same", relu, (pool, pool), stride)[0]
        called = []
        real = ops._k().conv2d_s1_pooled
        monkeypatch.setattr(ops._k(), "conv2d_s1_pooled", lambda *a: called.append(1) or real(*a))
        got, none1, none2 = ops.conv2d_maxpool_forward(
            x, w, b, 1, "same", relu, (pool, pool), stride, keep=False
        )
    assert called and (none1, none2) == (None, None)
    assert np.isnan(want).any() and (np.signbit(want) & (want == 0)).any()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pool", [None, (2, 2), (3, 2)])
@pytest.mark.parametrize("keep", [True, False])
def test_im2col_pieces_in_one_compiled_loop_give_the_bits_of_the_python_loop(
    monkeypatch, threads, bias, pool, keep
):
    """Where oneMKL computes the products, each thread's im2col pieces (gather, product,
    bias, ReLU, pooling) run in one compiled call that calls oneMKL itself: the very numbers
    of the loop in Python, which calls it through ctypes, convolution output, pooled output
    and the pooling's winners alike, whatever the pieces and threads."""
    if ops._blas.gemm_address(np.float32) is None:
        pytest.skip("oneMKL does not compute the products here")
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "IM2COL_PIECE_BYTES", 1 << 12)  # several pieces per thread
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 11, 10, 6)).astype(np.float32)
    x[3, 4, 5, 2] = np.nan  # a NaN goes through both loops alike
    w = rng.normal(size=(5, 5, 6, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32) if bias else None
    address = ops._blas.gemm_address

    def run(compiled):
        monkeypatch.setattr(ops._blas, "gemm_address", address if compiled else lambda d: None)
        with ops.engine_threads(threads):
            if pool is None:
                return ops.conv2d_forward(x, w, b, 1, "same", relu=True)[0], None, None
            p, conv_cache, pool_cache = ops.conv2d_maxpool_forward(
                x, w, b, 1, "same", True, (pool[0], pool[0]), pool[1], keep=keep
            )
            winners = pool_cache[1] if keep else None
            return p, (conv_cache[6] if keep else None), winners

    got, want = run(True), run(False)
    assert np.isnan(want[0]).any() and (want[0] == 0).any() and (want[0] > 0).any()
    for g, w_ in zip(got, want, strict=True):
        if w_ is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, w_)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pool", [None, (2, 2), (3, 2)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_im2col_backward_in_one_compiled_loop_gives_the_bits_of_the_python_loop(
    monkeypatch, threads, bias, pool, input_grad
):
    """The backward pass's compiled loop (the pooling's gradient routed, the ReLU's mask,
    the bias and kernel gradients, the patches' gradient added back into dx) gives the very
    numbers of the loop in Python, forward pass included, for each of its pieces and
    threads."""
    if ops._blas.gemm_address(np.float32) is None:
        pytest.skip("oneMKL does not compute the products here")
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    monkeypatch.setattr(ops, "IM2COL_PIECE_BYTES", 1 << 12)  # several pieces per thread
    rng = np.random.default_rng(8)
    x = rng.normal(size=(7, 11, 10, 6)).astype(np.float32)
    w = rng.normal(size=(5, 5, 6, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32) if bias else None
    address = ops._blas.gemm_address

    def run(compiled):
        monkeypatch.setattr(ops._blas, "gemm_address", address if compiled else lambda d: None)
        with ops.engine_threads(threads):
            if pool is None:
                y, cache = ops.conv2d_forward(x, w, b, 1, "same", relu=True)
                dy = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
                return ops.conv2d_backward(dy, cache, input_grad)
            p, conv_cache, pool_cache = ops.conv2d_maxpool_forward(
                x, w, b, 1, "same", True, (pool[0], pool[0]), pool[1]
            )
            dp = np.random.default_rng(1).normal(size=p.shape).astype(np.float32)
            return ops.conv2d_maxpool_backward(dp, conv_cache, pool_cache, input_grad)

    got, want = run(True), run(False)
    assert (want[0] is None) == (not input_grad) and (want[2] is None) == (not bias)
    for g, w_ in zip(got, want, strict=True):
        if w_ is None:
            assert g is None
        else:
            assert np.abs(w_).max() > 0
            np.testing.assert_array_equal(g, w_)
