"""Why this class: saliency, gradient × input, Grad-CAM and occlusion held to their definitions.

Saliency is the finite-difference gradient of the class's logit (float64); Grad-CAM on a model
whose last convolution's maps are the input itself is a closed form; a patch over pixels no
unit sees drops nothing; every map has the input's size; the model is left exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn import presets
from classic_cnn.attribution import (
    attribute,
    default_gradcam_layer,
    gradcam,
    gradcam_layers,
    gradient_x_input,
    grey_fill,
    occlusion,
    saliency,
)
from classic_cnn.data.batches import Preprocessing
from classic_cnn.explain import layer_outputs
from classic_cnn.losses import CrossEntropyLoss
from classic_cnn.optim import SGD

from .conftest import numeric_grad, rel_error


def small_model(dtype="float64", seed=0):
    """Every kind of layer on the way to the logits: convolutions (padding, stride), batch norm
    with non-trivial statistics, ReLU, leaky ReLU, tanh, max and average pooling, dropout."""
    model = cc.Sequential(
        [
            cc.Conv2D(4, 3, padding="same", name="conv_a"),
            cc.BatchNorm(name="bn_a"),
            cc.ReLU(name="relu_a"),
            cc.MaxPool2D(2, name="pool_a"),
            cc.Conv2D(5, 3, stride=1, padding=1, name="conv_b"),
            cc.LeakyReLU(0.1, name="leaky_b"),
            cc.AvgPool2D(2, name="avg_b"),
            cc.Conv2D(3, 2, padding="same", name="conv_c"),
            cc.Tanh(name="tanh_c"),
            cc.Flatten(),
            cc.Dropout(0.3),
            cc.Dense(4),
        ],
        input_shape=(12, 10, 2),
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
    model.classes = ["a", "b", "c", "d"]
    return model


def logit(model, x, k) -> float:
    return float(layer_outputs(model, x)[-1][0, k])


@pytest.mark.parametrize("target", [None, 2, "d"])
def test_saliency_is_the_finite_difference_gradient_of_the_score(rng, target):
    model = small_model("float64")
    x = rng.normal(size=(1, 12, 10, 2))
    a = saliency(model, x, target)
    k = {None: int(np.argmax(layer_outputs(model, x)[-1][0])), 2: 2, "d": 3}[target]
    assert a.class_index == k and a.class_name == "abcd"[k]
    assert a.chosen == ("top" if target is None else "given")
    xx = x.copy()
    num = numeric_grad(lambda: logit(model, xx, k), xx)[0]
    assert rel_error(a.gradient, num) < 1e-6
    np.testing.assert_array_equal(a.map, np.abs(a.gradient).max(axis=-1))
    assert a.score == pytest.approx(logit(model, x, k), rel=1e-12)
    g = gradient_x_input(model, x, target)
    assert rel_error(g.map, (num * x[0]).sum(axis=-1)) < 1e-6
    assert g.signed and g.map.min() < 0 < g.map.max()


def test_saliency_runs_in_float32_close_to_float64(rng):
    m32 = small_model("float32")
    x = rng.normal(size=(12, 10, 2)).astype(np.float32)
    a32 = saliency(m32, x, 1)
    a64 = saliency(m32.astype("float64"), x.astype(np.float64), 1)
    assert a32.gradient.dtype == np.float32 and a32.map.dtype == np.float32
    assert rel_error(a32.gradient, a64.gradient) < 1e-4


def test_a_closing_softmax_layer_is_not_the_score(rng):
    """With a Softmax layer at the end, the score is still the logit before it."""
    model = small_model("float64")
    soft = cc.Sequential(
        [*small_model("float64").layers, cc.Softmax()], input_shape=(12, 10, 2), dtype="float64"
    )
    soft.load_state_dict(model.state_dict())
    x = rng.normal(size=(1, 12, 10, 2))
    np.testing.assert_allclose(saliency(soft, x, 1).gradient, saliency(model, x, 1).gradient)
    assert occlusion(soft, x, 1).probability == pytest.approx(saliency(model, x, 1).probability)


def identity_conv_model(rng, h=6, w=5, c=3, classes=4):
    """conv 1×1 with the identity kernel (its maps are the input itself), then a dense layer."""
    model = cc.Sequential(
        [cc.Conv2D(c, 1, use_bias=False, name="same_as_input"), cc.Flatten(), cc.Dense(classes)],
        input_shape=(h, w, c),
        dtype="float64",
    )
    model.layers[0].params["kernel"][:] = np.eye(c)[None, None]
    model.layers[2].params["kernel"][:] = rng.normal(size=(h * w * c, classes))
    return model


def test_gradcam_on_the_input_itself_is_the_closed_form(rng):
    """Maps A = x and score = Σ W[:, k]·x + b, so dA = W[:, k] (as H×W×C) for every image:
    α = the mean of W[:, k] over the pixels of each channel, and the cam is max(Σ_c α_c x_c, 0)."""
    model = identity_conv_model(rng)
    x = rng.normal(size=(6, 5, 3))
    assert default_gradcam_layer(model) == "same_as_input"
    for k in range(4):
        a = gradcam(model, x, k)
        wk = model.layers[2].params["kernel"][:, k].reshape(6, 5, 3)
        alpha = wk.mean(axis=(0, 1))
        np.testing.assert_allclose(a.weights, alpha, rtol=1e-12)
        want = np.maximum((x * alpha).sum(axis=-1), 0)
        np.testing.assert_allclose(a.map, want, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(a.layer_maps, x)
        assert a.map.max() > 0 and (a.map == 0).any()  # both sides of the ReLU were exercised


def test_gradcam_layer_choice_and_refusals(rng):
    model = small_model()
    assert default_gradcam_layer(model) == "tanh_c"  # the last conv / activation with maps
    assert gradcam_layers(model) == [
        "conv_a", "bn_a", "relu_a", "pool_a", "conv_b", "leaky_b", "avg_b", "conv_c", "tanh_c",
    ]  # fmt: skip
    x = rng.normal(size=(12, 10, 2))
    for layer in gradcam_layers(model):
        a = gradcam(model, x, layer=layer)
        assert a.map.shape == (12, 10) and a.layer == layer and a.map.min() >= 0
    with pytest.raises(ValueError, match=r"Grad-CAM needs H×W×C maps, not layer 'dense_1'.*valid"):
        gradcam(model, x, layer="dense_1")
    with pytest.raises(ValueError, match=r"no layer named 'nope'.*valid: conv_a"):
        gradcam(model, x, layer="nope")
    dense_only = cc.Sequential([cc.Flatten(), cc.Dense(3)], input_shape=(4, 4, 1))
    with pytest.raises(ValueError, match="has none"):
        gradcam(dense_only, np.zeros((4, 4, 1)))


def test_occlusion_of_pixels_no_unit_sees_drops_nothing(rng):
    """A 2×2 kernel at stride 3 over 8 rows sees rows 0-1, 3-4, 6-7: rows 2 and 5 (and the
    same columns) reach nothing, so a patch there changes no probability, exactly."""
    model = cc.Sequential(
        [cc.Conv2D(3, 2, stride=3), cc.ReLU(), cc.Flatten(), cc.Dense(5)], input_shape=(8, 8, 1)
    )
    model.layers[0].params["bias"][:] = 0.1
    x = rng.uniform(-1, 1, size=(8, 8, 1)).astype(np.float32)
    a = occlusion(model, x, patch=1, stride=1, fill=0.5)
    unseen = [2, 5]
    assert a.drops.shape == (8, 8) and a.map.shape == (8, 8)
    seen = [r for r in range(8) if r not in unseen]
    assert np.all(a.drops[unseen, :] == 0) and np.all(a.drops[:, unseen] == 0)
    assert np.all(a.map[unseen, :] == 0) and np.all(a.map[:, unseen] == 0)
    assert np.count_nonzero(a.drops[np.ix_(seen, seen)]) > 30  # seen pixels do matter
    # the drops are the probability lost, computed image by image
    p = model.predict_proba(x[None])[0, a.class_index]
    y = x.copy()
    y[3, 4] = 0.5
    assert a.drops[3, 4] == pytest.approx(p - model.predict_proba(y[None])[0, a.class_index])


def test_occlusion_map_is_the_mean_drop_of_the_patches_covering_each_pixel(rng):
    model = small_model("float32")
    x = rng.normal(size=(12, 10, 2)).astype(np.float32)
    a = occlusion(model, x, "b", patch=4, stride=3, fill=0.0)
    # rows 0, 3, 6 and 8 (flush with the bottom); columns 0, 3, 6
    assert a.drops.shape == (4, 3) and a.class_name == "b"
    np.testing.assert_allclose(a.map[0, 0], a.drops[0, 0], rtol=1e-6)
    np.testing.assert_allclose(a.map[3, 3], a.drops[:2, :2].mean(), rtol=1e-5)
    np.testing.assert_allclose(a.map[11, 9], a.drops[3, 2], rtol=1e-6)
    np.testing.assert_allclose(a.map[6, 0], a.drops[1:3, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(a.map[7, 0], a.drops[2, 0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"patch must fit in the model's 12×10 input"):
        occlusion(model, x, patch=11)
    with pytest.raises(ValueError, match=r"stride must be a positive int. Received: stride=0"):
        occlusion(model, x, stride=0)


def test_the_grey_patch_is_mid_grey_in_the_models_units(rng):
    model = presets.build("lenet5", classes=10)
    assert grey_fill(model).tolist() == [0.0]
    model.preprocessing = Preprocessing((28, 28), 1, (0.25,), (0.5,))
    assert grey_fill(model).tolist() == pytest.approx([(0.5 - 0.25) / 0.5])
    rgb = presets.build("tinyvgg", classes=3)
    rgb.preprocessing = Preprocessing((64, 64), 3, (0.2, 0.5, 0.8), (0.25, 0.5, 0.1), "dark")
    want = [(0.5 - 0.2) / 0.25, 0.0, (0.5 - 0.8) / 0.1]
    assert grey_fill(rgb).tolist() == pytest.approx(want)
    # the patch holds each channel's grey: a model that sees only pixel (0, 0) proves it
    probe = cc.Sequential([cc.Conv2D(3, 1, use_bias=False), cc.Flatten(), cc.Dense(2)],
                          input_shape=(4, 4, 3), dtype="float64")  # fmt: skip
    probe.layers[0].params["kernel"][:] = np.eye(3)[None, None]
    probe.preprocessing = rgb.preprocessing
    x = rng.normal(size=(4, 4, 3))
    a = occlusion(probe, x, 0, patch=1, stride=1)
    assert a.fill == pytest.approx(want)
    y = x.copy()
    y[2, 1] = want
    p = probe.predict_proba(x[None])[0, 0] - probe.predict_proba(y[None])[0, 0]
    assert a.drops[2, 1] == pytest.approx(p, rel=1e-12)
    with pytest.raises(ValueError, match=r"fill must be one finite number or 3.*\[1.0, 2.0\]"):
        occlusion(probe, x, patch=1, fill=[1, 2])


@pytest.mark.parametrize("arch", ["lenet5", "fashion", "tinyvgg"])
@pytest.mark.parametrize("method", ["gradcam", "saliency", "gradient-x-input", "occlusion"])
def test_every_map_has_the_inputs_size(rng, arch, method):
    model = presets.build(arch, classes=10, seed=0)
    x = rng.normal(size=model.input_shape).astype(np.float32)
    a = attribute(model, x, method)
    assert a.map.shape == model.input_shape[:2]
    assert a.map.dtype == np.float32 and np.isfinite(a.map).all()
    probs = model.predict_proba(x[None])[0]
    assert a.class_index == int(np.argmax(probs))
    assert a.probability == pytest.approx(float(probs.max()), rel=1e-4)


def test_the_model_is_left_as_it_was(rng):
    """Attribution runs on a detached view: a training step after it gives the very bits of a
    training step on an untouched copy, and the layers' caches and gradients are the same
    objects as before."""
    a, b = small_model("float32"), small_model("float32")
    x = rng.normal(size=(8, 12, 10, 2)).astype(np.float32)
    y = np.arange(8) % 4
    opt_a, opt_b = SGD(lr=0.1, momentum=0.9), SGD(lr=0.1, momentum=0.9)
    a.train_step(x, y, CrossEntropyLoss(), opt_a)
    b.train_step(x, y, CrossEntropyLoss(), opt_b)
    before = [(layer._cache, dict(layer.grads), layer.input_grad) for layer in a.layers]
    for method in ("gradcam", "saliency", "gradient-x-input", "occlusion"):
        attribute(a, x[0], method, target=1)
    after = [(layer._cache, dict(layer.grads), layer.input_grad) for layer in a.layers]
    for (c0, g0, i0), (c1, g1, i1) in zip(before, after, strict=True):
        assert c0 is c1 and i0 == i1 and g0.keys() == g1.keys()
        assert all(g0[k] is g1[k] for k in g0)
    a.train_step(x, y, CrossEntropyLoss(), opt_a)
    b.train_step(x, y, CrossEntropyLoss(), opt_b)
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        np.testing.assert_array_equal(v, sb[k])


def test_vector_inputs_get_one_number_per_input(rng):
    """A model of vector inputs: saliency is |the class's row of weights|; no image methods."""
    model = cc.Sequential([cc.Dense(3)], input_shape=(5,), dtype="float64")
    x = rng.normal(size=5)
    np.testing.assert_array_equal(
        saliency(model, x, 1).map, np.abs(model.layers[0].params["kernel"][:, 1])
    )
    np.testing.assert_allclose(
        gradient_x_input(model, x, 2).map, x * model.layers[0].params["kernel"][:, 2]
    )
    with pytest.raises(ValueError, match=r"occlusion needs image inputs.*\(5,\)"):
        occlusion(model, x)
    with pytest.raises(ValueError, match="has none"):
        gradcam(model, x)


def test_bad_requests_say_what_was_expected(rng):
    model = small_model()
    x = rng.normal(size=(12, 10, 2))
    with pytest.raises(ValueError, match=r"one of the model's classes \(a, b, c, d\).*'shirt'"):
        saliency(model, x, "shirt")
    with pytest.raises(ValueError, match=r"class index must be 0..3.*Received: 7"):
        gradcam(model, x, 7)
    with pytest.raises(ValueError, match=r"one image at a time. Received: a batch of 2"):
        saliency(model, np.zeros((2, 12, 10, 2)))
    with pytest.raises(ValueError, match=r"expects a batch of shape \(N, 12, 10, 2\)"):
        occlusion(model, np.zeros((12, 11, 2)))
    with pytest.raises(ValueError, match="method must be one of gradcam, saliency"):
        attribute(model, x, "lime")
    assert saliency(model, x, "B").class_name == "b"  # names match regardless of case
