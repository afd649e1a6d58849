"""Invalid arguments and inputs raise ValueError naming what was expected and received."""

from __future__ import annotations

import numpy as np
import pytest

import classic_cnn as cc


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: cc.Conv2D(4, 0), "kernel_size=0"),
        (lambda: cc.Conv2D(4, (3, 0)), "kernel_size=(3, 0)"),
        (lambda: cc.Conv2D(4, 3, stride=0), "stride=0"),
        (lambda: cc.Conv2D(4, 3, padding=-1), "padding=-1"),
        (lambda: cc.Conv2D(4, 3, padding="full"), "padding='full'"),
        (lambda: cc.Conv2D(0, 3), "filters=0"),
        (lambda: cc.Conv2D(4, 3, kernel_initializer="magic"), "kernel_initializer='magic'"),
        (lambda: cc.MaxPool2D(0), "pool_size=0"),
        (lambda: cc.MaxPool2D(2, stride=0), "stride=0"),
        (lambda: cc.AvgPool2D(2, stride=-2), "stride=-2"),
        (lambda: cc.Dropout(1.5), "rate=1.5"),
        (lambda: cc.Dropout(-0.1), "rate=-0.1"),
        (lambda: cc.Dense(0), "units=0"),
        (lambda: cc.BatchNorm(momentum=2), "momentum=2"),
        (lambda: cc.SGD(lr=0), "lr=0"),
        (lambda: cc.SGD(lr=0.1, momentum=-1), "momentum=-1"),
        (lambda: cc.Adam(lr=-1e-3), "lr=-0.001"),
        (lambda: cc.CrossEntropyLoss(label_smoothing=1.0), "label_smoothing=1.0"),
    ],
)
def test_invalid_arguments_name_what_was_received(make, fragment):
    with pytest.raises(ValueError) as err:
        make()
    assert "Received" in str(err.value) and fragment in str(err.value)


def lenet():
    return cc.Sequential(
        [cc.Conv2D(6, 5, padding="same"), cc.ReLU(), cc.MaxPool2D(2), cc.Flatten(), cc.Dense(10)],
        input_shape=(28, 28, 1),
    )


def test_model_input_of_wrong_shape_names_expected_and_received():
    with pytest.raises(ValueError, match=r"\(N, 28, 28, 1\).*\(2, 28, 28, 3\)"):
        lenet().forward(np.zeros((2, 28, 28, 3)))
    with pytest.raises(ValueError, match=r"\(N, 28, 28, 1\).*\(28, 28, 1\)"):
        lenet().forward(np.zeros((28, 28, 1)))


def test_layer_with_wrong_channel_count_names_the_layer():
    layer = cc.Conv2D(2, 3, name="first")
    layer.forward(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"'first'.*3 input channels.*\(1, 8, 8, 1\)"):
        layer.forward(np.zeros((1, 8, 8, 1)))


def test_layer_with_wrong_rank_names_expected_and_received():
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*\(4, 8\)"):
        cc.MaxPool2D(2).forward(np.zeros((4, 8)))
    with pytest.raises(ValueError, match=r"Flatten.*\(2, 4, 4, 3\)"):
        cc.Dense(3).forward(np.zeros((2, 4, 4, 3)))


def test_input_smaller_than_the_kernel_is_refused():
    with pytest.raises(ValueError, match=r"smaller than the 5×5 kernel.*\(3, 3, 1\)"):
        cc.Conv2D(2, 5).forward(np.zeros((1, 3, 3, 1)))
    with pytest.raises(ValueError, match=r"smaller than the 3×3 window.*\(2, 2, 1\)"):
        cc.MaxPool2D(3).forward(np.zeros((1, 2, 2, 1)))


def test_model_that_shrinks_below_a_kernel_fails_at_construction():
    with pytest.raises(ValueError, match=r"conv2d_2.*smaller than the 5×5 kernel"):
        cc.Sequential([cc.Conv2D(2, 5), cc.Conv2D(2, 5)], input_shape=(6, 6, 1))


def test_labels_out_of_range_and_wrong_count():
    loss = cc.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"\[0, 2\].*from 0 to 3"):
        loss.forward(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"expected 2 labels.*3 labels"):
        loss.forward(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_gradient_check_refuses_nan_inputs():
    x = np.zeros((2, 28, 28, 1))
    x[0, 3, 4, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        cc.gradient_check(lenet(), x, np.array([1, 2]))


def test_loss_that_applies_softmax_refuses_a_model_ending_in_softmax():
    model = cc.Sequential([cc.Flatten(), cc.Dense(3), cc.Softmax()], input_shape=(2, 2, 1))
    with pytest.raises(ValueError, match="already ends in a Softmax"):
        model.train_step(np.zeros((1, 2, 2, 1)), np.array([0]), cc.MSELoss(), cc.SGD(0.1))


def test_unknown_layer_in_config():
    config = lenet().get_config()
    config["layers"][1]["class_name"] = "Swish"
    with pytest.raises(ValueError, match="unknown layer class 'Swish'"):
        cc.Sequential.from_config(config)


def test_weights_of_the_wrong_shape_are_refused():
    model = lenet()
    sd = model.state_dict()
    sd["conv2d_1.kernel"] = np.zeros((3, 3, 1, 6))
    with pytest.raises(ValueError, match=r"conv2d_1.kernel.*\(5, 5, 1, 6\).*\(3, 3, 1, 6\)"):
        model.load_state_dict(sd)
