"""Real Fashion-MNIST, where it is installed (Debian's dataset-fashion-mnist; .ci/run installs
it when it can). Skipped, with the reason in the summary, where it is not."""

from __future__ import annotations

import numpy as np
import pytest

from classic_cnn import evaluate, fit, presets
from classic_cnn.data import DatasetNotFound, load_dataset


def fashion(split):
    try:
        return load_dataset("fashion-mnist", split, download=False)
    except DatasetNotFound as exc:
        pytest.skip(f"Fashion-MNIST not available here ({str(exc).splitlines()[0]})")


def test_real_test_split_is_whole():
    test = fashion("test")
    assert test.images.shape == (10_000, 28, 28, 1) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes[0] == "T-shirt/top" and test.classes[9] == "Ankle boot"


@pytest.mark.slow
def test_default_network_learns_fashion_mnist_in_two_epochs():
    """Seed 0, the default network, 2 epochs on the first 10,000 training images, tested on
    all 10,000 test images: at least 70% (the same network in PyTorch with Adam: 74–76%)."""
    train, test = fashion("train").take(10_000), fashion("test")
    model = presets.build(presets.DEFAULT_PRESET, seed=0)
    fit(model, train, epochs=2, batch_size=64, optimizer="adam", seed=0, progress=False)
    accuracy = evaluate(model, test)["accuracy"]
    print(f"test accuracy after 2 epochs on 10,000 images: {accuracy:.4f}")
    assert accuracy >= 0.70
