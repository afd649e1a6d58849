"""classic-cnn against golden values computed once by PyTorch.

The values live in ``tests/fixtures/torch_golden.npz``, written by
``scripts/make_torch_fixtures.py`` (``make fixtures``) and committed, so this file needs no
PyTorch. Every case runs twice: on the float64 fixture inputs, where the results must agree
with PyTorch's float64 results to a relative error below 1e-10, and on the same inputs cast to
float32 and computed in float32, where the error must stay below 1e-4 (and the results must
stay float32).

Relative error: ``max|a − b| / max(max|a|, max|b|, 1e-8)`` over a whole array.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from classic_cnn import ops
from classic_cnn.layers import AvgPool2D, BatchNorm, Conv2D, Dense, MaxPool2D
from classic_cnn.losses import CrossEntropyLoss, MSELoss
from classic_cnn.optim import SGD, Adam, AdamW

FIXTURE = Path(__file__).parent / "fixtures" / "torch_golden.npz"

with np.load(FIXTURE, allow_pickle=False) as _npz:
    GOLDEN = {key: _npz[key] for key in _npz.files}

TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}
DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]
OPTIMIZERS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


def case_names(group: str) -> list[str]:
    return sorted({key.split(".")[1] for key in GOLDEN if key.startswith(group + ".")})


def load(group: str, name: str) -> dict[str, np.ndarray]:
    prefix = f"{group}.{name}."
    return {key[len(prefix) :]: value for key, value in GOLDEN.items() if key.startswith(prefix)}


def cast(a: np.ndarray, dtype) -> np.ndarray:
    """A float array in ``dtype`` (a fresh copy, so nothing can write into the fixture)."""
    return np.array(a, dtype=dtype)


def rel_error(actual, expected) -> float:
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-8)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def assert_close(actual, expected: np.ndarray, dtype, what: str) -> None:
    """``actual`` (computed in ``dtype``) matches PyTorch's float64 ``expected``."""
    dtype = np.dtype(dtype)
    if isinstance(actual, np.ndarray):
        assert actual.shape == expected.shape, (
            f"{what}: shape {actual.shape}, PyTorch {expected.shape}"
        )
        assert actual.dtype == dtype, f"{what}: computed in {dtype}, returned {actual.dtype}"
    else:  # a loss value: a Python float
        assert np.ndim(expected) == 0, what
    assert np.isfinite(actual).all(), f"{what}: not finite"
    err = rel_error(actual, expected)
    assert err < TOLERANCE[dtype], (
        f"{what}: relative error {err:.3g} against PyTorch (limit {TOLERANCE[dtype]:g} in {dtype})"
    )


def padding_spec(c: dict):
    """The padding argument the fixture was made with: 'valid', 'same' or an int."""
    text = str(c["padding"])
    return text if text in ("valid", "same") else int(text)


def explicit_pads(c: dict) -> ops.Pads:
    (pt, pb), (pl, pr) = c["pads"].tolist()
    return (pt, pb), (pl, pr)


# --------------------------------------------------------------------------------------------
# The fixture itself
# --------------------------------------------------------------------------------------------


def test_fixture_holds_every_group():
    counts = {g: len(case_names(g)) for g in ("conv2d", "maxpool2d", "avgpool2d", "dense")}
    counts |= {g: len(case_names(g)) for g in ("batchnorm", "loss", "optim")}
    assert counts["conv2d"] >= 5 and counts["maxpool2d"] >= 3 and counts["avgpool2d"] >= 2
    assert min(counts.values()) >= 1, counts
    strides = {int(load("conv2d", n)["stride"]) for n in case_names("conv2d")}
    assert {1, 2, 3} <= strides
    assert FIXTURE.stat().st_size < 1_000_000


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------

CONV = case_names("conv2d")


@pytest.mark.parametrize("name", CONV)
def test_resolve_padding_gives_the_pads_the_fixture_used(name):
    c = load("conv2d", name)
    kh, kw = c["w"].shape[:2]
    pads = ops.resolve_padding(padding_spec(c), c["x"].shape[1:3], (kh, kw), int(c["stride"]))
    assert pads == explicit_pads(c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CONV)
def test_conv2d_ops(name, dtype):
    c = load("conv2d", name)
    b = cast(c["b"], dtype) if "b" in c else None
    y, cache = ops.conv2d_forward(
        cast(c["x"], dtype), cast(c["w"], dtype), b, int(c["stride"]), padding_spec(c)
    )
    assert_close(y, c["y"], dtype, "y")
    dx, dw, db = ops.conv2d_backward(cast(c["dy"], dtype), cache)
    assert_close(dx, c["dx"], dtype, "dx")
    assert_close(dw, c["dw"], dtype, "dw")
    if "b" in c:
        assert_close(db, c["db"], dtype, "db")
    else:
        assert db is None


@pytest.mark.parametrize("name", CONV)
def test_conv2d_ops_explicit_pads(name):
    """The same convolution with the padding given as ((top, bottom), (left, right))."""
    c = load("conv2d", name)
    y, cache = ops.conv2d_forward(c["x"], c["w"], c.get("b"), int(c["stride"]), explicit_pads(c))
    assert_close(y, c["y"], np.float64, "y")
    dx, dw, _ = ops.conv2d_backward(c["dy"], cache)
    assert_close(dx, c["dx"], np.float64, "dx")
    assert_close(dw, c["dw"], np.float64, "dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CONV)
def test_conv2d_layer(name, dtype):
    c = load("conv2d", name)
    kh, kw, _, cout = c["w"].shape
    layer = Conv2D(
        cout, (kh, kw), stride=int(c["stride"]), padding=padding_spec(c), use_bias="b" in c
    )
    layer.build(c["x"].shape[1:], np.random.default_rng(0), dtype)
    assert layer.params["kernel"].shape == c["w"].shape  # KH×KW×C_in×C_out, as the fixture
    assert layer.output_shape(c["x"].shape[1:]) == c["y"].shape[1:]
    layer.params["kernel"] = cast(c["w"], dtype)
    if "b" in c:
        layer.params["bias"] = cast(c["b"], dtype)
    assert_close(layer.forward(cast(c["x"], dtype), training=True), c["y"], dtype, "y")
    assert_close(layer.backward(cast(c["dy"], dtype)), c["dx"], dtype, "dx")
    assert_close(layer.grads["kernel"], c["dw"], dtype, "grads['kernel']")
    if "b" in c:
        assert_close(layer.grads["bias"], c["db"], dtype, "grads['bias']")
    assert set(layer.grads) == set(layer.params)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------

POOL = [("maxpool2d", n) for n in case_names("maxpool2d")]
POOL += [("avgpool2d", n) for n in case_names("avgpool2d")]
POOL_OPS = {
    "maxpool2d": (ops.maxpool2d_forward, ops.maxpool2d_backward, MaxPool2D),
    "avgpool2d": (ops.avgpool2d_forward, ops.avgpool2d_backward, AvgPool2D),
}
POOL_IDS = [f"{g}-{n}" for g, n in POOL]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "name"), POOL, ids=POOL_IDS)
def test_pool_ops(group, name, dtype):
    c = load(group, name)
    forward, backward, _ = POOL_OPS[group]
    pool = tuple(c["pool_size"].tolist())
    y, cache = forward(cast(c["x"], dtype), pool, int(c["stride"]))
    assert_close(y, c["y"], dtype, "y")
    assert_close(backward(cast(c["dy"], dtype), cache), c["dx"], dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "name"), POOL, ids=POOL_IDS)
def test_pool_layer(group, name, dtype):
    c = load(group, name)
    layer = POOL_OPS[group][2](tuple(c["pool_size"].tolist()), stride=int(c["stride"]))
    assert layer.output_shape(c["x"].shape[1:]) == c["y"].shape[1:]
    assert_close(layer.forward(cast(c["x"], dtype), training=True), c["y"], dtype, "y")
    assert_close(layer.backward(cast(c["dy"], dtype)), c["dx"], dtype, "dx")


# --------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------

DENSE = case_names("dense")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DENSE)
def test_dense_ops(name, dtype):
    c = load("dense", name)
    b = cast(c["b"], dtype) if "b" in c else None
    y, cache = ops.dense_forward(cast(c["x"], dtype), cast(c["w"], dtype), b)
    assert_close(y, c["y"], dtype, "y")
    dx, dw, db = ops.dense_backward(cast(c["dy"], dtype), cache)
    assert_close(dx, c["dx"], dtype, "dx")
    assert_close(dw, c["dw"], dtype, "dw")
    if "b" in c:
        assert_close(db, c["db"], dtype, "db")
    else:
        assert db is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DENSE)
def test_dense_layer(name, dtype):
    c = load("dense", name)
    layer = Dense(c["w"].shape[1], use_bias="b" in c)
    layer.build(c["x"].shape[1:], np.random.default_rng(0), dtype)
    assert layer.params["kernel"].shape == c["w"].shape  # in×out, as the fixture
    layer.params["kernel"] = cast(c["w"], dtype)
    if "b" in c:
        layer.params["bias"] = cast(c["b"], dtype)
    assert_close(layer.forward(cast(c["x"], dtype), training=True), c["y"], dtype, "y")
    assert_close(layer.backward(cast(c["dy"], dtype)), c["dx"], dtype, "dx")
    assert_close(layer.grads["kernel"], c["dw"], dtype, "grads['kernel']")
    if "b" in c:
        assert_close(layer.grads["bias"], c["db"], dtype, "grads['bias']")


# --------------------------------------------------------------------------------------------
# Batch normalisation
# --------------------------------------------------------------------------------------------

BN = case_names("batchnorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BN)
def test_batchnorm_ops(name, dtype):
    c = load("batchnorm", name)
    running_mean = cast(c["running_mean_in"], dtype)
    running_var = cast(c["running_var_in"], dtype)
    y, cache = ops.batchnorm_forward(
        cast(c["x"], dtype),
        cast(c["gamma"], dtype),
        cast(c["beta"], dtype),
        running_mean,
        running_var,
        training=bool(c["training"]),
        momentum=float(c["momentum"]),
        eps=float(c["eps"]),
    )
    assert_close(y, c["y"], dtype, "y")
    assert_close(running_mean, c["running_mean_out"], dtype, "running_mean (updated in place)")
    assert_close(running_var, c["running_var_out"], dtype, "running_var (updated in place)")
    dx, dgamma, dbeta = ops.batchnorm_backward(cast(c["dy"], dtype), cache)
    assert_close(dx, c["dx"], dtype, "dx")
    assert_close(dgamma, c["dgamma"], dtype, "dgamma")
    assert_close(dbeta, c["dbeta"], dtype, "dbeta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BN)
def test_batchnorm_layer(name, dtype):
    c = load("batchnorm", name)
    layer = BatchNorm(momentum=float(c["momentum"]), eps=float(c["eps"]))
    layer.build(c["x"].shape[1:], np.random.default_rng(0), dtype)
    if bool(c["training"]):  # a fresh layer starts from the statistics the fixture started from
        assert_close(layer.buffers["running_mean"], c["running_mean_in"], dtype, "fresh mean")
        assert_close(layer.buffers["running_var"], c["running_var_in"], dtype, "fresh var")
    else:
        layer.buffers["running_mean"] = cast(c["running_mean_in"], dtype)
        layer.buffers["running_var"] = cast(c["running_var_in"], dtype)
    layer.params["gamma"] = cast(c["gamma"], dtype)
    layer.params["beta"] = cast(c["beta"], dtype)
    y = layer.forward(cast(c["x"], dtype), training=bool(c["training"]))
    assert_close(y, c["y"], dtype, "y")
    assert_close(layer.buffers["running_mean"], c["running_mean_out"], dtype, "running_mean")
    assert_close(layer.buffers["running_var"], c["running_var_out"], dtype, "running_var")
    assert_close(layer.backward(cast(c["dy"], dtype)), c["dx"], dtype, "dx")
    assert_close(layer.grads["gamma"], c["dgamma"], dtype, "grads['gamma']")
    assert_close(layer.grads["beta"], c["dbeta"], dtype, "grads['beta']")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

LOSS = case_names("loss")


def make_loss(c: dict):
    if str(c["kind"]) == "ce":
        return CrossEntropyLoss(label_smoothing=float(c["label_smoothing"]))
    assert float(c["label_smoothing"]) == 0.0
    return MSELoss()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSS)
def test_loss(name, dtype):
    c = load("loss", name)
    targets = c["labels"] if "labels" in c else cast(c["targets"], dtype)
    loss = make_loss(c)
    value = loss.forward(cast(c["logits"], dtype), targets)
    assert isinstance(value, float)
    assert_close(value, c["loss"], dtype, "loss")
    assert_close(loss.backward(), c["dlogits"], dtype, "dL/dlogits")


@pytest.mark.parametrize("name", [n for n in LOSS if "labels" in load("loss", n)])
def test_loss_one_hot_rows_equal_labels(name):
    """One-hot target rows give what the integer labels gave PyTorch."""
    c = load("loss", name)
    onehot = np.eye(c["logits"].shape[1])[c["labels"]]
    loss = make_loss(c)
    assert_close(loss.forward(c["logits"].copy(), onehot), c["loss"], np.float64, "loss")
    assert_close(loss.backward(), c["dlogits"], np.float64, "dL/dlogits")


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------

OPTIM = case_names("optim")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTIM)
def test_optimizer_steps(name, dtype):
    c = load("optim", name)
    optimizer = OPTIMIZERS[str(c["class"])](**json.loads(str(c["config"])))
    names = [str(n) for n in c["names"]]
    params = {n: cast(c[f"param0.{n}"], dtype) for n in names}
    arrays = dict(params)  # the very arrays: step() updates them in place
    for step in range(1, int(c["steps"]) + 1):
        grads = {n: cast(c[f"grad{step}.{n}"], dtype) for n in names}
        optimizer.step(params, grads)
        for n in names:
            assert params[n] is arrays[n], f"{n}: step() replaced the array"
            assert_close(params[n], c[f"param{step}.{n}"], dtype, f"{n} after step {step}")
    assert optimizer.iterations == int(c["steps"])
