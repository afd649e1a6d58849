"""Optimizers, schedules and losses against their formulas written out in the test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn.ops import softmax


def run(opt, w0, grads):
    params = {"w": w0.copy()}
    for g in grads:
        opt.step(params, {"w": g})
    return params["w"]


def test_sgd_momentum_nesterov_weight_decay_follow_the_formula(rng):
    w0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(4)]
    for nesterov in (False, True):
        lr, mu, wd = 0.1, 0.9, 0.01
        w, v = w0.copy(), None
        for g in grads:
            g = g + wd * w
            v = g.copy() if v is None else mu * v + g
            w = w - lr * ((g + mu * v) if nesterov else v)
        got = run(cc.SGD(lr, momentum=mu, nesterov=nesterov, weight_decay=wd), w0, grads)
        np.testing.assert_allclose(got, w, rtol=1e-12)


@pytest.mark.determinism
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov,wd", [(False, 0.0), (False, 5e-4), (True, 5e-4)])
def test_sgd_momentum_gives_the_bits_of_numpys_in_place_formula(rng, dtype, nesterov, wd):
    """The compiled one-pass momentum step rounds each operation as the NumPy code does (the
    learning rate changing between steps, as a schedule changes it)."""
    w0 = rng.normal(size=(5, 7)).astype(dtype)
    grads = [rng.normal(size=(5, 7)).astype(dtype) for _ in range(4)]
    lrs, mu = [0.1, 0.07, 0.3, 0.01], 0.9
    w, v = w0.copy(), None
    for lr, g in zip(lrs, grads, strict=True):
        if wd:
            g = g + wd * w
        if v is None:
            v = g.copy()
        else:
            v *= mu
            v += g
        w -= lr * (g + mu * v if nesterov else v)
    opt = cc.SGD(0.1, momentum=mu, nesterov=nesterov, weight_decay=wd)
    params = {"w": w0.copy()}
    for lr, g in zip(lrs, grads, strict=True):
        opt.lr = lr
        opt.step(params, {"w": g})
    assert params["w"].dtype == dtype
    np.testing.assert_array_equal(params["w"], w)
    np.testing.assert_array_equal(opt.state["w"]["velocity"], v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_velocities_of_units_without_gradient_end_at_zero_not_subnormal(dtype):
    """A unit whose gradient stops sees its velocity shrink by μ each step: below the dtype's
    smallest normal number it becomes 0 (subnormals cost the CPU about 30 times more), while
    a velocity just above it is kept as the formula gives it."""
    tiny = np.finfo(dtype).tiny
    opt = cc.SGD(0.01, momentum=0.5)
    params = {"w": np.ones(3, dtype)}
    opt.step(params, {"w": np.array([tiny * 4, tiny * 1.5, 1.0], dtype)})  # NumPy's first step
    zero = np.zeros(3, dtype)
    opt.step(params, {"w": zero})  # the compiled step: 2·tiny, 0.75·tiny → 0, 0.5
    v = opt.state["w"]["velocity"]
    np.testing.assert_array_equal(v, np.array([tiny * 2, 0.0, 0.5], dtype))
    opt.step(params, {"w": zero})  # tiny stays (not below it), 0.25
    opt.step(params, {"w": zero})  # 0.5·tiny → 0
    np.testing.assert_array_equal(opt.state["w"]["velocity"], np.array([0, 0, 0.125], dtype))
    assert not ((v != 0) & (np.abs(v) < tiny)).any()


def test_adam_and_adamw_follow_the_formula(rng):
    w0 = rng.normal(size=5)
    grads = [rng.normal(size=5) for _ in range(3)]
    for cls, wd in ((cc.Adam, 0.1), (cc.AdamW, 0.1)):
        lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
        w, m, v = w0.copy(), 0, 0
        for t, g in enumerate(grads, 1):
            if cls is cc.AdamW:
                w = w - lr * wd * w
            else:
                g = g + wd * w
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(run(cls(lr, weight_decay=wd), w0, grads), w, rtol=1e-12)


def test_optimizer_state_round_trip_continues_identically(rng):
    w0 = rng.normal(size=6)
    grads = [rng.normal(size=6) for _ in range(6)]
    for make in (lambda: cc.SGD(0.1, momentum=0.9), lambda: cc.Adam(0.01)):
        straight = run(make(), w0, grads)
        first = make()
        params = {"w": w0.copy()}
        for g in grads[:3]:
            first.step(params, {"w": g})
        second = make()
        second.load_state_dict(first.state_dict())
        for g in grads[3:]:
            second.step(params, {"w": g})
        np.testing.assert_array_equal(params["w"], straight)


def test_step_without_gradients_is_refused():
    with pytest.raises(ValueError, match=r"no gradient for \['b'\]"):
        cc.SGD(0.1).step({"a": np.zeros(2), "b": np.zeros(2)}, {"a": np.zeros(2)})


def test_schedules():
    step = cc.StepDecay(0.1, step_size=3, gamma=0.5)
    assert [step(t) for t in range(7)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025])
    cos = cc.CosineDecay(0.1, total=10, min_lr=0.001, warmup=2)
    assert cos(0) == pytest.approx(0.05) and cos(1) == pytest.approx(0.1)
    assert cos(2) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.001 + 0.099 * (1 + math.cos(math.pi * 0.5)) / 2)
    assert cos(10) == pytest.approx(0.001) and cos(50) == pytest.approx(0.001)
    lrs = [cos(t) for t in range(2, 11)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4 - 1.0]], dtype=dtype)
    loss = cc.CrossEntropyLoss()
    value = loss.forward(logits, np.array([0, 2]))
    grad = loss.backward()
    assert np.isfinite(value) and np.isfinite(grad).all()
    # row 1: label 0 has all the mass → 0; row 2: log(1 + e) for the runner-up label
    assert value == pytest.approx(math.log(1 + math.e) / 2, rel=1e-6)
    wrong = cc.CrossEntropyLoss().forward(logits, np.array([1, 0]))
    # finite, not inf: 2e4 for row 1; 2e4 + log(1 + e⁻¹) for row 2
    assert wrong == pytest.approx((4e4 + math.log(1 + math.exp(-1))) / 2, rel=1e-6)


def test_cross_entropy_value_and_gradient(rng):
    z = rng.normal(size=(4, 5))
    y = np.array([0, 4, 2, 2])
    loss = cc.CrossEntropyLoss()
    p = softmax(z)
    assert loss.forward(z, y) == pytest.approx(-np.log(p[np.arange(4), y]).mean(), rel=1e-12)
    onehot = np.eye(5)[y]
    np.testing.assert_allclose(loss.backward(), (p - onehot) / 4, rtol=1e-12)


def test_mse_is_the_articles_loss(rng):
    z = rng.normal(size=(3, 10))
    y = np.array([3, 1, 9])
    p = softmax(z)
    onehot = np.eye(10)[y]
    assert cc.MSELoss().forward(z, y) == pytest.approx(((p - onehot) ** 2).mean(), rel=1e-12)


def test_one_cycle_rises_then_falls_as_pytorch_defines_it():
    s = cc.OneCycle(0.1, total=100)  # warm-up to step 29, then down to step 99
    start, end = 0.1 / 25, 0.1 / 25 / 1e4
    assert s(0) == pytest.approx(start) and s(29) == pytest.approx(0.1)
    assert s(99) == pytest.approx(end) and s(500) == pytest.approx(end)
    assert s(10) == pytest.approx(0.1 + (start - 0.1) * (1 + math.cos(math.pi * 10 / 29)) / 2)
    assert s(60) == pytest.approx(end + (0.1 - end) * (1 + math.cos(math.pi * 31 / 70)) / 2)
    assert s.per_step is True


def test_one_cycle_cycles_momentum_against_the_rate_as_pytorch_defines_it():
    s = cc.OneCycle(0.1, total=100, momentum_range=(0.85, 0.95))  # peak at step 29
    assert s.momentum(0) == pytest.approx(0.95) and s.momentum(29) == pytest.approx(0.85)
    assert s.momentum(99) == pytest.approx(0.95) and s.momentum(500) == pytest.approx(0.95)
    assert s.momentum(10) == pytest.approx(0.85 + 0.1 * (1 + math.cos(math.pi * 10 / 29)) / 2)
    assert s.momentum(60) == pytest.approx(0.95 - 0.1 * (1 + math.cos(math.pi * 31 / 70)) / 2)
    # the rate is the same with or without momentum cycling
    plain = cc.OneCycle(0.1, total=100)
    assert [s(t) for t in range(100)] == [plain(t) for t in range(100)]
    assert plain.momentum_range is None


@pytest.mark.parametrize(
    "bad", [(0.95, 0.85), (0.85, 1.0), (-0.1, 0.9), (0.9,), "0.9", (0.85, float("nan"))]
)
def test_one_cycle_momentum_range_is_checked(bad):
    with pytest.raises(ValueError, match="momentum_range") as e:
        cc.OneCycle(0.1, total=100, momentum_range=bad)
    assert "Received" in str(e.value)
