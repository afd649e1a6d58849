"""Finite-difference gradient checks in float64 for every layer and loss.

Central differences with step 1e-6; relative error max|a − n| / max(|a|, |n|, 1e-8) < 1e-6.
Each layer is checked through a random projection L = Σ y·R, so dL/dy = R. Inputs are kept
away from the kinks of ReLU-like functions and from ties in max pooling, where the derivative
does not exist.
"""

from __future__ import annotations

import numpy as np
import pytest

import classic_cnn as cc

from .conftest import numeric_grad, rel_error

TOL = 1e-6


def away_from_zero(rng, shape, margin=0.05):
    """Random values with |x| ≥ margin, so a ±1e-6 nudge never crosses a kink at 0."""
    return rng.choice([-1.0, 1.0], size=shape) * (margin + np.abs(rng.normal(size=shape)))


def distinct(rng, shape):
    """Values that differ pairwise by at least 0.01: max pooling never meets a tie."""
    return rng.permutation(np.arange(int(np.prod(shape)))).reshape(shape) * 0.01


def check_layer(layer, x, rng, training=False, reset=None):
    """Compare backward's dL/dx and dL/dparams with central differences of L = Σ y·R."""
    layer.build(x.shape[1:], rng, np.float64)
    y = layer.forward(x, training)
    proj = rng.normal(size=y.shape)

    def loss():
        if reset:
            reset()
        return float(np.sum(layer.forward(x, training) * proj))

    loss()
    dx = layer.backward(proj)
    assert rel_error(dx, numeric_grad(loss, x)) < TOL, "input gradient"
    for name, p in layer.params.items():
        err = rel_error(layer.grads[name], numeric_grad(loss, p))
        assert err < TOL, f"{name}: {err}"


CONV_CASES = [
    # input shape, Conv2D arguments
    ((2, 7, 7, 1), dict(filters=2, kernel_size=3)),
    ((2, 7, 6, 3), dict(filters=4, kernel_size=3, padding="same")),
    ((2, 8, 8, 2), dict(filters=3, kernel_size=4, stride=2, padding="same")),  # even kernel
    ((1, 9, 10, 3), dict(filters=2, kernel_size=(2, 3), stride=3, padding="same")),
    ((2, 9, 9, 2), dict(filters=3, kernel_size=3, stride=3)),
    ((2, 6, 7, 5), dict(filters=2, kernel_size=2, stride=2, padding=1, use_bias=False)),
    ((1, 5, 5, 4), dict(filters=6, kernel_size=5, padding="valid")),
]


@pytest.mark.parametrize("shape,kwargs", CONV_CASES)
def test_conv2d_gradients(rng, shape, kwargs):
    check_layer(cc.Conv2D(**kwargs), rng.normal(size=shape), rng)


@pytest.mark.parametrize(
    "shape,pool,stride",
    [
        ((2, 8, 8, 2), 2, None),
        ((2, 7, 7, 3), 3, 1),
        ((1, 9, 9, 2), 3, 2),
        ((2, 7, 9, 1), (2, 3), 2),
    ],
)
@pytest.mark.parametrize("cls", [cc.MaxPool2D, cc.AvgPool2D])
def test_pooling_gradients(rng, cls, shape, pool, stride):
    check_layer(cls(pool, stride), distinct(rng, shape), rng)


def test_dense_gradients(rng):
    check_layer(cc.Dense(7), rng.normal(size=(4, 5)), rng)
    check_layer(cc.Dense(3, use_bias=False), rng.normal(size=(2, 9)), rng)


def test_flatten_gradients(rng):
    check_layer(cc.Flatten(), rng.normal(size=(2, 3, 4, 5)), rng)


@pytest.mark.parametrize(
    "layer", [cc.ReLU(), cc.LeakyReLU(0.1), cc.ELU(0.7), cc.Sigmoid(), cc.Tanh(), cc.Softmax()]
)
@pytest.mark.parametrize("shape", [(3, 6), (2, 3, 5, 2)])
def test_activation_gradients(rng, layer, shape):
    check_layer(layer, away_from_zero(rng, shape), rng)


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradients(rng, shape, training):
    layer = cc.BatchNorm()
    layer.build(shape[1:], rng, np.float64)
    # non-trivial scale, shift and running statistics, so every term of the formula matters
    layer.params["gamma"][:] = rng.uniform(0.5, 2.0, size=shape[-1])
    layer.params["beta"][:] = rng.normal(size=shape[-1])
    layer.buffers["running_mean"][:] = rng.normal(size=shape[-1])
    layer.buffers["running_var"][:] = rng.uniform(0.5, 2.0, size=shape[-1])
    x = 3.0 + 2.0 * rng.normal(size=shape)
    y = layer.forward(x, training)
    proj = rng.normal(size=y.shape)

    def loss():
        return float(np.sum(layer.forward(x, training) * proj))

    loss()
    dx = layer.backward(proj)
    assert rel_error(dx, numeric_grad(loss, x)) < TOL
    for name in ("gamma", "beta"):
        assert rel_error(layer.grads[name], numeric_grad(loss, layer.params[name])) < TOL


def test_dropout_gradients_with_mask_held_fixed(rng):
    layer = cc.Dropout(0.4, seed=3)
    state = layer.rng.bit_generator.state

    def reset():
        layer.rng.bit_generator.state = state

    reset()
    check_layer(layer, rng.normal(size=(4, 10)), rng, training=True, reset=reset)


@pytest.mark.parametrize(
    "loss", [cc.CrossEntropyLoss(), cc.CrossEntropyLoss(label_smoothing=0.1), cc.MSELoss()]
)
@pytest.mark.parametrize("targets", ["labels", "rows"])
def test_loss_gradients(rng, loss, targets):
    logits = rng.normal(size=(5, 4)) * 3
    if targets == "labels":
        t = rng.integers(0, 4, size=5)
    else:
        t = rng.dirichlet(np.ones(4), size=5)

    def f():
        return loss.forward(logits, t)

    f()
    analytic = loss.backward()
    assert rel_error(analytic, numeric_grad(f, logits)) < TOL
