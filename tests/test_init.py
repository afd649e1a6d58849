"""He, Glorot and fan-in uniform initialisation draw from the stated distributions, from an
explicit seed."""

from __future__ import annotations

import numpy as np
import pytest

from classic_cnn.init import fans, initialize


@pytest.mark.parametrize(
    "name,var",
    [
        ("he_normal", lambda fi, fo: 2 / fi),
        ("he_uniform", lambda fi, fo: 2 / fi),
        ("glorot_normal", lambda fi, fo: 2 / (fi + fo)),
        ("glorot_uniform", lambda fi, fo: 2 / (fi + fo)),
        ("fan_in_uniform", lambda fi, fo: 1 / (3 * fi)),  # U(±1/√fan_in)
    ],
)
def test_variance_and_shape(name, var):
    shape = (5, 5, 16, 64)  # a kernel: fan_in 400, fan_out 1600
    assert fans(shape) == (400, 1600)
    w = initialize(name, shape, np.random.default_rng(0), np.float32)
    assert w.shape == shape and w.dtype == np.float32
    assert abs(w.mean()) < 0.01 * np.sqrt(var(400, 1600)) * 10
    assert w.var() == pytest.approx(var(400, 1600), rel=0.03)
    if name.endswith("uniform"):
        assert np.abs(w).max() <= np.sqrt(3 * var(400, 1600)) + 1e-7


def test_same_seed_same_weights_other_seed_other_weights():
    a = initialize("he_normal", (120, 84), np.random.default_rng(1), np.float64)
    b = initialize("he_normal", (120, 84), np.random.default_rng(1), np.float64)
    c = initialize("he_normal", (120, 84), np.random.default_rng(2), np.float64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert fans((120, 84)) == (120, 84)


def test_unknown_initializer():
    with pytest.raises(ValueError, match="Received: 'lecun'"):
        initialize("lecun", (2, 2), np.random.default_rng(0), np.float32)
