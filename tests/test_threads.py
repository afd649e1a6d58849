"""Work split over threads (ops.engine_threads): the same numbers as one thread, BLAS held to
one thread inside and restored after, and training steps bit-identical run to run."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from classic_cnn import SGD as Sgd
from classic_cnn import CrossEntropyLoss, ops, presets
from classic_cnn import reference as ref

from .conftest import rel_error

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture
def split_everything(monkeypatch):
    """Split even tiny operations, so that the small arrays of a test take the threaded paths."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)


def _conv_all(x, w, b, stride, padding):
    y, cache = ops.conv2d_forward(x, w, b, stride, padding)
    dy = np.random.default_rng(7).normal(size=y.shape).astype(x.dtype)
    return (y, *ops.conv2d_backward(dy, cache)), dy


@pytest.mark.determinism
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "shape,kernel,stride,padding",
    [
        ((5, 9, 8, 2), (3, 3), 1, "same"),  # direct path, split over images
        ((7, 9, 8, 12), (3, 3), 1, "same"),  # direct path too (108 numbers per patch)
        ((7, 9, 8, 6), (5, 5), 1, "same"),  # im2col path, pieces dealt out to threads
        ((7, 9, 8, 16), (3, 3), 1, "same"),  # Winograd path, pieces dealt out to threads
        ((6, 10, 9, 3), (4, 4), 2, "same"),  # im2col, stride 2
        ((1, 6, 6, 20), (3, 3), 1, "valid"),  # one image: nothing to split (Winograd)
    ],
)
def test_threaded_convolution_equals_one_thread_and_reference(
    rng, split_everything, threads, shape, kernel, stride, padding
):
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(*kernel, shape[3], 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    serial, dy = _conv_all(x, w, b, stride, padding)
    with ops.engine_threads(threads):
        assert ops.threads() == threads
        split, _ = _conv_all(x, w, b, stride, padding)
    assert ops.threads() == 1
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, x, w, stride, padding)
    want = (ref.conv2d_forward(x, w, b, stride, padding), dx_ref, dw_ref, db_ref)
    winograd = ops._winograd(w, stride)
    for i, (got, one, ref_value) in enumerate(zip(split, serial, want, strict=True)):
        assert rel_error(got, ref_value) < 1e-5
        if ops._direct(w, stride):  # per-image parts: the very same sums
            np.testing.assert_array_equal(got, one)
        elif winograd and i < 2:  # y and dx: each tile's numbers, whatever the pieces
            np.testing.assert_array_equal(got, one)
        elif winograd:  # dw, db: pieces summed in other groups; dw = Gᵀ dU G, whose sums
            # cancel, so its rounding is that of dU's larger numbers
            assert rel_error(got, one) < 1e-6
        else:  # pieces may be smaller with more threads: same numbers up to rounding
            np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-5)


def test_threaded_pooling_activation_dense_and_batchnorm_equal_one_thread(rng, split_everything):
    x = rng.normal(size=(6, 8, 8, 4)).astype(np.float32)
    dy_pool = rng.normal(size=(6, 4, 4, 4)).astype(np.float32)
    xd = rng.normal(size=(9, 20)).astype(np.float32)
    wd = rng.normal(size=(20, 7)).astype(np.float32)
    bd = rng.normal(size=7).astype(np.float32)
    dyd = rng.normal(size=(9, 7)).astype(np.float32)
    gamma, beta = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)

    def run():
        out = []
        y, cache = ops.maxpool2d_forward(x, (2, 2), 2)
        out += [y, ops.maxpool2d_backward(dy_pool, cache)]
        y, cache = ops.relu_forward(x)
        out += [y, ops.relu_backward(x[::-1], cache)]
        y, cache = ops.dense_forward(xd, wd, bd)
        out += [y, *ops.dense_backward(dyd, cache)]
        rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
        y, cache = ops.batchnorm_forward(x, gamma, beta, rm, rv, training=True)
        out += [y, rm, rv, *ops.batchnorm_backward(x[::-1], cache)]
        return out

    serial = run()
    with ops.engine_threads(2):
        split = run()
    for one, got in zip(serial, split, strict=True):
        np.testing.assert_allclose(got, one, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(split[0], serial[0])  # pooling: the same maxima
    np.testing.assert_array_equal(split[2], np.maximum(x, 0))  # relu


def _blas_threads():
    return [
        lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"
    ]


def test_blas_is_held_to_one_thread_inside_and_restored_after():
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        assert before and max(before) == 2
        with ops.engine_threads():
            assert ops.threads() == 2  # the BLAS thread count it found
            assert max(_blas_threads()) == 1
            with ops.engine_threads(5):  # nested: the outer setting holds
                assert ops.threads() == 2
        assert _blas_threads() == before
        try:
            with ops.engine_threads():
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert _blas_threads() == before and ops.threads() == 1


def test_concurrent_callers_restore_blas_when_the_last_one_ends():
    """Two threads predicting at once (as the explorer's server may): BLAS comes back to its
    setting only after both have finished, and each gets the right answer."""
    model = presets.build("lenet5", seed=0)
    x = np.random.default_rng(1).random((40, 28, 28, 1), dtype=np.float32)
    want = model.predict_proba(x)
    got, errors = {}, []
    barrier = threading.Barrier(2)

    def predict(i):
        try:
            barrier.wait()
            for _ in range(5):
                got[i] = model.predict_proba(x)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        workers = [threading.Thread(target=predict, args=(i,)) for i in range(2)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not errors
        assert _blas_threads() == before
    for i in range(2):
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.determinism
@pytest.mark.parametrize("arch", ["fashion", "tinyvgg"])
def test_a_threaded_training_step_twice_gives_bit_identical_weights(arch, split_everything):
    def one_run():
        model = presets.build(arch, seed=3)
        x = np.random.default_rng(0).random((6, *model.input_shape), dtype=np.float32)
        y = np.arange(6) % 10
        opt = Sgd(0.05, momentum=0.9)
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            for _ in range(2):
                model.train_step(x, y, CrossEntropyLoss(), opt)
        return model.state_dict()

    first, second = one_run(), one_run()
    for k in first:
        assert np.array_equal(first[k], second[k]), k


def _threaded_conv_in_child():
    x = np.ones((4, 6, 6, 2), dtype=np.float32)
    w = np.ones((3, 3, 2, 3), dtype=np.float32)
    with ops.engine_threads(2):
        y, _ = ops.conv2d_forward(x, w, None, 1, "valid")
    raise SystemExit(0 if np.all(y == 18) else 1)


def test_a_forked_child_gets_threads_of_its_own(split_everything):
    """A process forked after the engine's threads started (multiprocessing's default on
    Linux) has a copy of the pool without its threads: the child must make its own, not wait
    forever on threads that do not exist."""
    import multiprocessing

    x = np.ones((4, 6, 6, 2), dtype=np.float32)
    w = np.ones((3, 3, 2, 3), dtype=np.float32)
    with ops.engine_threads(2):
        ops.conv2d_forward(x, w, None, 1, "valid")  # the pool now has a worker thread
    child = multiprocessing.get_context("fork").Process(target=_threaded_conv_in_child)
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n,positions,patch", [(256, 64, 150), (128, 784, 288), (100, 64, 150)])
def test_im2col_pieces_are_shared_evenly_among_threads(threads, n, positions, patch):
    """The im2col pieces are as even as possible and come in a multiple of the thread count
    where they can: each thread gets (nearly) the same share of the batch (not 109 + 38
    images against 109)."""
    with ops.engine_threads(threads):  # 16 kernels, as LeNet-5's second convolution
        step = ops._piece_images(n, positions, patch, np.float32, 16)
    assert step * positions * patch * 4 <= ops.IM2COL_PIECE_BYTES
    sizes = [min(step, n - s) for s in range(0, n, step)]
    shares = [sum(sizes[t::threads]) for t in range(threads)]  # pieces are dealt out in turn
    assert max(shares) <= 1.1 * n / threads, shares


@pytest.mark.determinism
@pytest.mark.parametrize("arch", ["lenet5", "fashion"])
def test_prediction_deals_whole_shares_of_images_to_the_threads(monkeypatch, arch):
    """On two threads, prediction gives each thread a contiguous share of the images to take
    through the whole network (every operation inside on that thread alone): the same
    probabilities bit for bit from run to run, in their places, and the one-thread numbers
    to rounding; the operations inside a share do not split again."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_NS", 0)
    model = presets.build(arch, seed=0)
    x = np.random.default_rng(3).random((9, 28, 28, 1), dtype=np.float32)
    runs = []
    real = ops._run
    monkeypatch.setattr(ops, "_run", lambda work, parts: runs.append(parts) or real(work, parts))
    with ops.engine_threads(1):
        one = model.predict_proba(x)
    assert set(runs) == {1}
    runs.clear()
    with ops.engine_threads(2):
        a = model.predict_proba(x)
        assert runs[0] == 2 and set(runs[1:]) == {1}  # one handoff, nothing split inside
        b = model.predict_proba(x)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, one, rtol=1e-5, atol=1e-6)
    for i in (0, 4, 8):  # each image's answer is its own, wherever its share ran
        np.testing.assert_allclose(a[i], model.predict_proba(x[i : i + 1])[0], rtol=1e-5, atol=1e-6)
