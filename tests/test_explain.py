"""The explain core: the arithmetic of one number equals the forward pass, for convolutions
(padding included), batch norm → activation chains and pooling; the receptive field is exactly
what the number depends on; bad requests list what is valid."""

from __future__ import annotations

import json

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn.explain import (
    explain,
    explainable_layers,
    feature_maps,
    layer_outputs,
    parse_position,
    receptive_field,
)


def make_model(dtype="float32", seed=0):
    model = cc.Sequential(
        [
            cc.Conv2D(4, 3, padding="same", name="conv_a"),
            cc.BatchNorm(name="bn_a"),
            cc.ReLU(name="relu_a"),
            cc.MaxPool2D(2, name="pool_a"),
            cc.Conv2D(5, 3, stride=2, padding=1, name="conv_b"),
            cc.LeakyReLU(0.1, name="leaky_b"),
            cc.AvgPool2D(2, name="avg_b"),
            cc.Conv2D(3, 2, padding="same", use_bias=False, name="conv_c"),
            cc.Tanh(name="tanh_c"),
            cc.Flatten(),
            cc.Dense(3),
        ],
        input_shape=(14, 13, 2),
        seed=seed,
        dtype=dtype,
    )
    rng = np.random.default_rng(seed)
    bn = model.layers[1]
    bn.params["gamma"][:] = rng.uniform(0.5, 2, 4)
    bn.params["beta"][:] = rng.normal(size=4)
    bn.buffers["running_mean"][:] = rng.normal(size=4)
    bn.buffers["running_var"][:] = rng.uniform(0.2, 3, 4)
    for layer in model.layers:
        if "bias" in layer.params:
            layer.params["bias"][:] = rng.normal(size=layer.params["bias"].shape)
    return model


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def x(rng):
    return rng.normal(size=(1, 14, 13, 2)).astype(np.float32)


def test_value_equals_the_forward_pass_at_random_positions(model, x, rng):
    outs = layer_outputs(model, x)
    names = [layer.name for layer in model.layers]
    layers = explainable_layers(model)
    assert layers == [
        "conv_a", "bn_a", "relu_a", "pool_a", "conv_b", "leaky_b", "avg_b", "conv_c", "tanh_c"
    ]  # fmt: skip
    for name in layers:
        y = outs[names.index(name)][0]
        scale = float(np.abs(y).max())
        for _ in range(8):
            r, c, k = (int(rng.integers(0, n)) for n in y.shape)
            e = explain(model, x, name, (r, c), k)
            assert abs(e.value - y[r, c, k]) <= 1e-5 * max(abs(y[r, c, k]), scale), (name, r, c)


def test_conv_record_is_patch_times_kernel_summed_plus_bias(model, x):
    e = explain(model, x, "conv_b", (1, 2), 3)
    inp = layer_outputs(model, x)[3][0]  # pool_a's output feeds conv_b
    # stride 2, padding 1: the patch starts at row 1·2 − 1 = 1, col 2·2 − 1 = 3
    assert e.origin == (1, 3)
    np.testing.assert_allclose(e.patch, inp[1:4, 3:6, :], rtol=0, atol=0)
    np.testing.assert_array_equal(e.kernel, model.layers[4].params["kernel"][:, :, :, 3])
    np.testing.assert_array_equal(e.products, e.patch * e.kernel)
    assert e.total == pytest.approx(e.products.sum())
    assert e.bias == pytest.approx(float(model.layers[4].params["bias"][3]))
    assert e.conv_value == pytest.approx(e.total + e.bias)
    assert [s.layer for s in e.steps] == ["leaky_b"]
    assert e.final == e.steps[-1].value


def test_padding_zeros_in_the_patch(model, x):
    outs = layer_outputs(model, x)
    e = explain(model, x, "relu_a", (0, 0), 1)  # 3×3 'same': one row and column of padding
    assert e.origin == (-1, -1)
    assert e.padded.sum() == 5 and e.padded[0].all() and e.padded[:, 0].all()
    assert (e.patch[e.padded] == 0).all()
    np.testing.assert_array_equal(e.patch[1:, 1:, :], x[0, :2, :2, :])
    # the chain: conv → batch norm → ReLU, each step equal to that layer's output
    assert [s.layer for s in e.steps] == ["bn_a", "relu_a"]
    assert e.steps[0].value == pytest.approx(float(outs[1][0, 0, 0, 1]), rel=1e-5, abs=1e-6)
    assert e.value == pytest.approx(float(outs[2][0, 0, 0, 1]), rel=1e-5, abs=1e-6)
    assert "in the zero padding" in e.to_text()
    # bottom-right corner of an odd-width 'same' map also reaches into the padding
    e = explain(model, x, "conv_a", (13, 12), 0)
    assert e.padded[-1].all() and e.padded[:, -1].all()


def test_max_pool_window_and_winner(model, x):
    outs = layer_outputs(model, x)
    e = explain(model, x, "pool_a", (3, 2), 2)
    window = outs[2][0, 6:8, 4:6, 2]
    np.testing.assert_array_equal(e.patch, window)
    wr, wc = e.winner
    assert e.patch[wr, wc] == window.max() == e.value == outs[3][0, 3, 2, 2]
    assert "maximum" in e.to_text()
    e = explain(model, x, "avg_b", (1, 0), 4)
    assert e.kind == "avg_pool" and e.winner is None
    assert e.value == pytest.approx(float(outs[6][0, 1, 0, 4]), rel=1e-5)


def test_default_channel_is_the_strongest(model, x):
    y = layer_outputs(model, x)[2][0]
    e = explain(model, x, "relu_a", (5, 6))
    assert e.channel == int(np.argmax(y[5, 6])) and e.channel_chosen == "strongest"


def test_receptive_field_is_exactly_what_the_number_depends_on(rng):
    model = make_model("float64", seed=3)
    x = rng.normal(size=(1, 14, 13, 2))
    for name, (r, c) in [("conv_a", (0, 0)), ("pool_a", (2, 3)), ("conv_b", (1, 1)),
                         ("avg_b", (1, 0)), ("tanh_c", (1, 0))]:  # fmt: skip
        e = explain(model, x, name, (r, c), 0)
        t, left, b, right = e.receptive_field
        outside = x.copy()
        mask = np.ones(x.shape[1:3], bool)
        mask[t:b, left:right] = False
        outside[0][mask] += rng.normal(size=(int(mask.sum()), 2)) * 10
        assert explain(model, outside, name, (r, c), 0).value == e.value, name
        inside = x.copy()
        inside[0, t:b, left:right] += 5.0
        assert explain(model, inside, name, (r, c), 0).value != e.value, name
    # two 3×3 convs (the second stride 2) and two pools: the field grows
    assert receptive_field(model, 0, (5, 5)) == (4, 4, 7, 7)
    assert receptive_field(model, 3, (0, 0)) == (-1, -1, 3, 3)  # conv 3×3 'same' + pool 2


def test_feature_maps_are_the_forward_pass(model, x):
    outs = layer_outputs(model, x)
    names = [layer.name for layer in model.layers]
    records = feature_maps(model, x[0])
    assert [r["name"] for r in records] == explainable_layers(model)
    for rec in records:
        np.testing.assert_array_equal(rec["maps"], outs[names.index(rec["name"])][0])
    assert [r["name"] for r in feature_maps(model, x, ["pool_a", "conv_c"])] == [
        "pool_a",
        "conv_c",
    ]


def test_bad_requests_say_what_is_valid(model, x):
    with pytest.raises(ValueError, match=r"no layer named 'conv9'.*valid: conv_a, bn_a"):
        explain(model, x, "conv9", (0, 0))
    with pytest.raises(ValueError, match=r"cannot explain layer 'dense_1'.*valid: conv_a"):
        explain(model, x, "dense_1", (0, 0))
    with pytest.raises(ValueError, match=r"outside pool_a's 7×6×4 output; valid: rows 0..6, "
                       r"cols 0..5"):  # fmt: skip
        explain(model, x, "pool_a", (7, 0))
    with pytest.raises(ValueError, match=r"outside"):
        explain(model, x, "pool_a", (0, -1))
    with pytest.raises(ValueError, match=r"filter 4 is out of range for conv_a \(4 channels\); "
                       r"valid: 0..3"):  # fmt: skip
        explain(model, x, "conv_a", (0, 0), 4)
    with pytest.raises(ValueError, match=r"channel 9 is out of range for pool_a"):
        explain(model, x, "pool_a", (0, 0), 9)
    dense = cc.Sequential([cc.Flatten(), cc.Dense(3)], input_shape=(4, 4, 1))
    with pytest.raises(ValueError, match=r"has no convolution or pooling layers.*flatten_1"):
        explain(dense, np.zeros((1, 4, 4, 1)), "flatten_1", (0, 0))
    with pytest.raises(ValueError, match=r"has no convolution or pooling layers"):
        feature_maps(dense, np.zeros((4, 4, 1)), ["flatten_1"])
    with pytest.raises(ValueError, match=r"no layer named 'nope'.*valid: conv_a"):
        feature_maps(model, x, ["nope"])
    assert parse_position(" 3, 4") == (3, 4)
    with pytest.raises(ValueError, match=r"ROW,COL"):
        parse_position("3")


def test_record_as_text_and_json(model, x):
    e = explain(model, x, "relu_a", (4, 4), 2)
    text = e.to_text()
    assert "patch  ×  kernel  =  product" in text and "bn_a (BatchNorm)" in text
    assert f"{e.value:.6g}" in text and "receptive field: rows 3..5, cols 3..5" in text
    d = json.loads(json.dumps(e.to_dict()))
    assert d["position"] == [4, 4] and len(d["steps"]) == 2 and d["value"] == e.value
    assert np.array(d["patch"]).shape == (3, 3, 2)
