"""cnn tour: the article's figures computed, with the article's numbers."""

from __future__ import annotations

import numpy as np
import pytest

from classic_cnn.tour import ARTICLE_PROBS, run_tour, steps


@pytest.fixture(scope="module")
def records():
    return {r["name"]: r for r in steps()}


def test_convolution_sizes(records):
    r = records["one kernel"]
    assert r["input_shape"] == (32, 32, 3) and r["kernel_shape"] == (5, 5, 3)
    assert r["map_shape"] == (28, 28) and r["numbers"] == 784
    assert r["explanation"].value == pytest.approx(r["forward_value"], rel=1e-5)
    assert records["two kernels"]["map_shape"] == (28, 28, 2)


def test_curve_detector_6600_and_0(records):
    r = records["curve detector"]
    assert r["map_shape"] == (26, 26)
    assert r["match"].total == r["map"][0, 0] == 4 * (50 * 30) + (20 * 30) == 6600
    assert r["elsewhere"].total == r["map"][0, -1] == 0
    assert np.count_nonzero(r["match"].products) == 5


def test_pooling_softmax_and_one_training_step(records):
    pools = {label: y.tolist() for label, _, _, y in records["max pooling"]["pools"]}
    assert pools == {
        "2×2 stride 2": [[6, 8], [3, 4]],
        "3×3 stride 1": [[7, 8, 9], [7, 8, 9], [5, 5, 9]],
        "3×3 stride 2": [[7, 9], [5, 9]],
    }
    p = records["softmax"]["probs"]
    assert p.sum() == pytest.approx(1) and int(p.argmax()) == 3
    np.testing.assert_allclose(p, ARTICLE_PROBS, atol=1e-3)
    b = records["back-propagation"]
    assert np.abs(b["probs_before"] - 0.1).max() < 0.05  # no class preferred yet
    assert b["loss_after"] < b["loss_before"]
    np.testing.assert_array_equal(b["w_after"], b["w_before"] - np.float32(b["lr"]) * b["grad"])


def test_run_tour_prints_and_saves(tmp_path):
    lines = []
    run_tour(print_fn=lines.append, out=tmp_path)
    text = "\n".join(lines)
    for fragment in ("784 numbers", "28×28×2", "= 6600", "26×26", "3×3 stride 2", "loss after"):
        assert fragment in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tour-curve-detector.png",
        "tour-curve-explain.png",
        "tour-pooling.png",
    ]
