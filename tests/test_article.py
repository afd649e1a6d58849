"""The article's own numbers as known-answer tests."""

from __future__ import annotations

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn import ops
from classic_cnn import reference as ref


def test_5x5x3_kernel_over_32x32x3_gives_784_numbers(rng):
    x = rng.uniform(0, 255, size=(1, 32, 32, 3))
    layer = cc.Conv2D(1, 5)
    y = layer.forward(x)
    assert y.shape == (1, 28, 28, 1)
    assert y[0, :, :, 0].size == 784
    assert layer.output_shape((32, 32, 3)) == (28, 28, 1)


def test_two_kernels_give_28x28x2(rng):
    y = cc.Conv2D(2, 5).forward(rng.uniform(0, 255, size=(1, 32, 32, 3)))
    assert y.shape == (1, 28, 28, 2)


def test_7x7x3_kernel_gives_26x26(rng):
    y = cc.Conv2D(1, 7).forward(rng.uniform(0, 255, size=(1, 32, 32, 3)))
    assert y.shape == (1, 26, 26, 1)


def curve_detector():
    """A 7×7 kernel with weight 30 along a curve bending to the right, 0 elsewhere."""
    k = np.zeros((7, 7))
    for r, c in [(0, 5), (1, 4), (2, 3), (3, 2), (4, 2), (5, 2), (6, 2)]:
        k[r, c] = 30
    return k


def test_curve_detector_sums_to_6600_over_a_matching_patch():
    k = curve_detector()
    image = np.zeros((32, 32))
    # The top-left patch holds a curve: four pixels of 50 and one of 20 on the kernel's curve
    # (the other curve pixels are 0, and pixels off the curve meet zero weights).
    for (r, c), v in zip(
        [(1, 4), (2, 3), (3, 2), (4, 2), (5, 2)], [50, 50, 50, 50, 20], strict=True
    ):
        image[r, c] = v
    image[0, 0] = image[6, 6] = 90  # bright pixels where the kernel is 0 add nothing
    x = np.repeat(image[None, :, :, None], 3, axis=3)  # 32×32×3, the same curve in each channel
    w = np.zeros((7, 7, 3, 1))
    w[:, :, 0, 0] = k  # the detector looks at the first channel
    y, _ = ops.conv2d_forward(x, w, None, 1, "valid")
    assert y.shape == (1, 26, 26, 1)
    assert y[0, 0, 0, 0] == 4 * (50 * 30) + (20 * 30) == 6600
    assert y[0, 0, -1, 0] == 0  # top-right: nothing there, the detector stays silent
    assert ref.conv2d_forward(x, w, None)[0, 0, 0, 0] == 6600


GRID = np.array(
    [
        [1, 1, 2, 4, 0],
        [5, 6, 7, 8, 1],
        [3, 2, 1, 0, 9],
        [1, 2, 3, 4, 2],
        [0, 5, 1, 3, 6],
    ],
    dtype=float,
)


@pytest.mark.parametrize(
    "pool,stride,expected",
    [
        # 2×2 stride 2 over the top-left 4×4 (the fifth row/column is in no window)
        (2, 2, [[6, 8], [3, 4]]),
        # 3×3 stride 1: nine overlapping windows
        (3, 1, [[7, 8, 9], [7, 8, 9], [5, 5, 9]]),
        # 3×3 stride 2: four windows sharing their middle row and column
        (3, 2, [[7, 9], [5, 9]]),
    ],
)
def test_worked_max_pooling_examples(pool, stride, expected):
    x = GRID[None, :, :, None]
    y = cc.MaxPool2D(pool, stride).forward(x)
    np.testing.assert_array_equal(y[0, :, :, 0], expected)
    np.testing.assert_array_equal(
        ref.maxpool2d_forward(x, (pool, pool), stride)[0, :, :, 0], expected
    )


def test_softmax_gives_probabilities_that_sum_to_one(rng):
    p = cc.Softmax().forward(rng.normal(size=(6, 10)) * 5)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    assert (p > 0).all()
    # the article's example output: 0.75 for "3" is the most probable digit
    probs = np.array([0, 0.1, 0.1, 0.75, 0, 0, 0, 0, 0, 0.05])
    assert probs.sum() == pytest.approx(1.0)
    logits = np.log(np.where(probs > 0, probs, 1e-12))[None]
    assert int(np.argmax(ops.softmax(logits))) == 3


def test_one_sgd_step_is_exactly_w_minus_lr_times_grad(rng):
    model = cc.Sequential(
        [cc.Conv2D(2, 3), cc.ReLU(), cc.Flatten(), cc.Dense(3)], input_shape=(5, 5, 1), seed=1
    )
    x, y = rng.normal(size=(4, 5, 5, 1)).astype(np.float32), np.array([0, 1, 2, 1])
    loss = cc.CrossEntropyLoss()
    before = {k: v.copy() for k, v in model.parameters().items()}
    lr = 0.05
    model.train_step(x, y, loss, cc.SGD(lr))
    grads = model.gradients()
    for name, w in model.parameters().items():
        np.testing.assert_array_equal(w, before[name] - np.float32(lr) * grads[name])
        assert not np.array_equal(w, before[name])
