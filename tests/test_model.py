"""Sequential: summary, config round trip, gradient check, prediction, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn import ops


def lenet(**kwargs):
    return cc.Sequential(
        [
            cc.Conv2D(6, 5, padding="same"),
            cc.ReLU(),
            cc.MaxPool2D(2),
            cc.Conv2D(16, 5),
            cc.ReLU(),
            cc.MaxPool2D(2),
            cc.Flatten(),
            cc.Dense(120),
            cc.ReLU(),
            cc.Dense(84),
            cc.ReLU(),
            cc.Dense(10),
        ],
        input_shape=(28, 28, 1),
        **kwargs,
    )


def test_summary_lists_shapes_params_and_macs():
    model = lenet()
    lines = []
    text = model.summary(print_fn=lines.append)
    assert lines == [text]
    assert "28×28×6" in text and "14×14×6" in text and "10×10×16" in text and "5×5×16" in text
    rows = model.summary_rows()
    assert [r["output_shape"] for r in rows][:4] == [
        (28, 28, 6),
        (28, 28, 6),
        (14, 14, 6),
        (10, 10, 16),
    ]
    # conv1: 5·5·1·6 + 6; conv2: 5·5·6·16 + 16; dense: 400·120+120, 120·84+84, 84·10+10
    params = [156, 2416, 48120, 10164, 850]
    assert [r["params"] for r in rows if r["params"]] == params
    assert model.count_params() == sum(params) == 61706
    assert rows[0]["macs"] == 28 * 28 * 6 * 25 and rows[3]["macs"] == 10 * 10 * 16 * 150
    assert text.splitlines()[-1].split()[-2:] == ["61,706", f"{sum(r['macs'] for r in rows):,}"]


def test_repr_names_every_layer():
    text = repr(lenet())
    assert text.count("Conv2D(") == 2 and "MaxPool2D(pool_size=[2, 2], stride=2" in text


def test_config_round_trip_is_exact(rng):
    model = cc.Sequential(
        [
            cc.Conv2D(4, (3, 2), stride=2, padding="same", use_bias=False, name="c"),
            cc.BatchNorm(momentum=0.2),
            cc.LeakyReLU(0.2),
            cc.AvgPool2D(2, 1),
            cc.Conv2D(3, 2, padding=1, kernel_initializer="glorot_uniform"),
            cc.ELU(),
            cc.MaxPool2D(3, 2),
            cc.Flatten(),
            cc.Dropout(0.25),
            cc.Dense(5),
            cc.Tanh(),
            cc.Dense(3),
            cc.Sigmoid(),
        ],
        input_shape=(12, 11, 2),
        seed=7,
    )
    config = model.get_config()
    assert json.loads(json.dumps(config)) == config  # plain JSON-able data
    clone = cc.Sequential.from_config(config)
    assert clone.get_config() == config
    # same seed, same architecture → the same initial weights
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[k], v)
    x = rng.normal(size=(3, 12, 11, 2))
    model.forward(x, training=True)  # moves running statistics
    clone.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(clone.forward(x), model.forward(x))


def test_whole_model_gradient_check(rng):
    model = cc.Sequential(
        [
            cc.Conv2D(4, 3, stride=2, padding="same", use_bias=False),
            cc.BatchNorm(),
            cc.ReLU(),
            cc.Conv2D(3, 2, padding="same"),
            cc.Tanh(),
            cc.MaxPool2D(2),
            cc.Flatten(),
            cc.Dropout(0.3),
            cc.Dense(6),
            cc.ELU(),
            cc.Dense(3),
        ],
        input_shape=(9, 9, 2),
        seed=3,
    )
    x, y = rng.normal(size=(4, 9, 9, 2)), np.array([0, 2, 1, 2])
    before = model.state_dict()
    for loss in (cc.CrossEntropyLoss(), cc.MSELoss()):
        report = cc.gradient_check(model, x, y, loss=loss)
        assert {(r["layer"], r["param"]) for r in report} >= {
            ("conv2d_1", "kernel"),
            ("batch_norm_1", "gamma"),
            ("dense_2", "bias"),
            ("input", "x"),
        }
        assert report.max_error < 1e-6, str(report)
        assert "rel. error" in str(report)
    for k, v in model.state_dict().items():  # the model itself is untouched
        np.testing.assert_array_equal(v, before[k])


def test_gradient_check_catches_a_wrong_backward(rng, monkeypatch):
    """The check must be able to fail: break ReLU's backward and watch it report."""
    model = cc.Sequential(
        [cc.Flatten(), cc.Dense(5), cc.ReLU(), cc.Dense(3)], input_shape=(2, 2, 1)
    )
    monkeypatch.setattr(cc.ReLU, "_backward", staticmethod(lambda dy, y: dy))
    report = cc.gradient_check(model, rng.normal(size=(4, 2, 2, 1)), np.array([0, 1, 2, 0]))
    assert report.max_error > 1e-3


def test_predict_proba_and_predict(rng):
    model = lenet()
    x = rng.random((7, 28, 28, 1))
    p = model.predict_proba(x, batch_size=3)
    assert p.shape == (7, 10) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    # float32 products in batches of 3 and of 7 sum in different orders
    np.testing.assert_allclose(p, cc.Softmax().forward(model.forward(x)), rtol=1e-5)
    np.testing.assert_array_equal(model.predict(x), p.argmax(axis=1))


@pytest.mark.parametrize("threads", [1, 2])
def test_inference_in_small_batches_by_default(rng, monkeypatch, threads):
    """predict_proba and evaluate run big inputs through the network in inference_batch-image
    pieces (a 1,000-image piece is 2-3x slower and needs gigabytes for the fashion preset),
    with every image's answer in its place. On several threads the images are first dealt
    out to the threads in contiguous shares, each cut into such pieces."""
    from classic_cnn import metrics
    from classic_cnn import model as model_module

    model = lenet()
    piece = model.inference_batch  # the largest feature map, 28×28×6 float32, sets it
    assert piece == min(model_module.INFERENCE_BATCH, model_module.INFERENCE_PIECE_BYTES // 18816)
    assert lenet(dtype="float64").inference_batch == min(
        model_module.INFERENCE_BATCH, model_module.INFERENCE_PIECE_BYTES // 37632
    )
    n = 2 * piece + 5
    x = rng.random((n, 28, 28, 1))
    sizes = []
    logits = model._inference_logits
    monkeypatch.setattr(model, "_inference_logits", lambda xb: sizes.append(len(xb)) or logits(xb))

    def pieces(count):  # what one predict call on `count` images should run
        parts = ops._parts(count, count * model._macs, ops.NS_PER_MAC_BLAS)
        shares = ops._ranges(count, parts)
        return [min(piece, e - i) for s, e in shares for i in range(s, e, piece)]

    with ops.engine_threads(threads):
        p = model.predict_proba(x)
        assert sorted(sizes) == sorted(pieces(n)) and sum(sizes) == n
        assert len(sizes) == (3 if threads == 1 else 4)  # 512+512+5, or 512+2 and 512+3
        np.testing.assert_allclose(p, model.predict_proba(x, batch_size=n), rtol=1e-5)
        sizes.clear()
        y = p.argmax(axis=1)
        assert metrics.evaluate(model, (x, y))["accuracy"] == 1.0
        want = pieces(piece) * 2 + pieces(5)
    assert sorted(sizes) == sorted(want) and sum(sizes) == n


def conv_bn_net(use_bias: bool, relu: bool, dtype="float32", seed=0):
    """Convolutions followed by batch norm (with and without ReLU, on the direct and the im2col
    path), and a batch norm after a dense layer, with statistics far from 0 and 1."""
    layers = [cc.Conv2D(16, 3, padding="same", use_bias=use_bias), cc.BatchNorm()]
    layers += [cc.ReLU()] if relu else []
    layers += [cc.MaxPool2D(2), cc.Conv2D(5, 3, use_bias=use_bias), cc.BatchNorm(), cc.ReLU()]
    layers += [cc.Flatten(), cc.Dense(6), cc.BatchNorm(), cc.Dense(3)]
    model = cc.Sequential(layers, input_shape=(9, 9, 1), dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, cc.BatchNorm):
            c = layer.params["gamma"].shape
            layer.params["gamma"][:] = rng.uniform(0.5, 2.0, c)
            layer.params["beta"][:] = rng.normal(size=c)
            layer.buffers["running_mean"][:] = rng.normal(size=c)
            layer.buffers["running_var"][:] = rng.uniform(0.2, 3.0, c)
        if "bias" in layer.params:
            layer.params["bias"][:] = rng.normal(size=layer.params["bias"].shape)
    return model


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype,rtol", [("float32", 2e-5), ("float64", 1e-12)])
def test_predict_proba_folds_batch_norm_into_the_convolution(rng, use_bias, relu, dtype, rtol):
    """At inference batch norm after a convolution is a per-kernel scale and shift of its
    output, so predict_proba folds it into the kernels and biases: one pass instead of two,
    the same probabilities as the layers run one by one (to rounding), weights untouched."""
    model = conv_bn_net(use_bias, relu, dtype)
    before = model.state_dict()
    x = rng.normal(size=(5, 9, 9, 1))
    expected = cc.Softmax().forward(model.forward(x))
    conv_bns = [
        b
        for a, b in zip(model.layers[:-1], model.layers[1:], strict=True)
        if isinstance(a, cc.Conv2D)
    ]
    dense_bn = model.layers[-2]
    assert all(isinstance(b, cc.BatchNorm) for b in [*conv_bns, dense_bn])
    ran = []
    for layer in [*conv_bns, dense_bn]:
        layer.forward = lambda *a, layer=layer, **k: (
            ran.append(layer.name) or type(layer).forward(layer, *a, **k)
        )
    p = model.predict_proba(x)
    assert ran == [dense_bn.name]  # the two after convolutions were folded away
    assert p.dtype == np.dtype(dtype)
    np.testing.assert_allclose(p, expected, rtol=rtol, atol=rtol / 10)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_dropout_only_while_training(rng):
    model = cc.Sequential([cc.Flatten(), cc.Dropout(0.5), cc.Dense(4)], input_shape=(3, 3, 2))
    x = rng.normal(size=(5, 3, 3, 2))
    np.testing.assert_array_equal(model.forward(x), model.forward(x))
    assert not np.array_equal(model.forward(x, training=True), model.forward(x, training=True))
    layer = cc.Dropout(0.5, seed=0)
    y = layer.forward(np.ones((1000, 10)), training=True)
    assert set(np.unique(y)) == {0.0, 2.0}  # survivors scaled by 1 / (1 − rate)
    assert abs(y.mean() - 1.0) < 0.05


def test_batch_norm_uses_running_statistics_at_inference(rng):
    layer = cc.BatchNorm()
    x = 5 + 2 * rng.normal(size=(64, 4, 4, 3))
    layer.forward(x, training=True)
    np.testing.assert_allclose(
        layer.buffers["running_mean"], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5
    )
    unbiased = x.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
    y = layer.forward(x, training=False)
    mean, var = layer.buffers["running_mean"], layer.buffers["running_var"]
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5)


@pytest.mark.determinism
def test_same_seed_gives_identical_training(rng):
    x, y = rng.random((16, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 16)
    runs = []
    for _ in range(2):
        model = lenet(seed=5)
        opt = cc.SGD(0.05, momentum=0.9)
        for _ in range(3):
            model.train_step(x, y, cc.CrossEntropyLoss(), opt)
        runs.append(model.state_dict())
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    assert not np.array_equal(
        lenet(seed=5).state_dict()["dense_1.kernel"], runs[0]["dense_1.kernel"]
    )


def test_float64_model_computes_in_float64(rng):
    model = lenet(dtype="float64")
    assert model.forward(rng.random((2, 28, 28, 1))).dtype == np.float64
    m32 = lenet()
    m64 = m32.astype(np.float64)
    x = rng.random((2, 28, 28, 1))
    np.testing.assert_allclose(m32.forward(x), m64.forward(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "loss,optimizer",
    [
        (cc.CrossEntropyLoss(), cc.SGD(0.05, momentum=0.9)),
        (cc.MSELoss(), cc.SGD(0.5, momentum=0.9)),
        (cc.CrossEntropyLoss(), cc.Adam(3e-3)),
    ],
)
def test_loss_falls_on_a_learnable_synthetic_task(loss, optimizer):
    """Images with a bright bar in one of three places; a small CNN must learn where."""
    rng = np.random.default_rng(0)
    n = 96
    labels = rng.integers(0, 3, n)
    x = rng.random((n, 12, 12, 1)).astype(np.float32) * 0.3
    for i, lab in enumerate(labels):
        x[i, 4 * lab : 4 * lab + 4, :, 0] += 1.0  # a horizontal bar: top, middle or bottom
    model = cc.Sequential(
        [cc.Conv2D(4, 3, padding="same"), cc.ReLU(), cc.MaxPool2D(2), cc.Flatten(), cc.Dense(3)],
        input_shape=(12, 12, 1),
        seed=0,
    )
    first = loss.forward(model.forward(x), labels)
    for _ in range(40):
        for i in range(0, n, 16):
            model.train_step(x[i : i + 16], labels[i : i + 16], loss, optimizer)
    last = loss.forward(model.forward(x), labels)
    assert last < 0.5 * first
    assert (model.predict(x) == labels).mean() > 0.9
