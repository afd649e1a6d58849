"""The seeing-inside commands end to end: cnn show filters / maps / curves, cnn explain,
cnn test --plots, and the report.html that every cnn train writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import classic_cnn as cc
from classic_cnn import io
from classic_cnn.data.batches import Preprocessing
from classic_cnn.explain import layer_outputs
from tests import test_cli
from tests.test_viz import PNG, check_report

# the command-line tests' fixtures: a small 'fashion-mnist' in a cache folder, a trained model
data_env, trained, run = test_cli.data_env, test_cli.trained, test_cli.run

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]  # fmt: skip


@pytest.fixture
def model_file(data_env):
    """A small untrained model saved with everything a trained one records."""
    model = cc.Sequential(
        [cc.Conv2D(4, 3, padding="same", use_bias=False), cc.BatchNorm(), cc.ReLU(),
         cc.MaxPool2D(2), cc.Conv2D(3, 3), cc.ReLU(), cc.Flatten(), cc.Dense(10)],
        input_shape=(28, 28, 1), seed=0,
    )  # fmt: skip
    model.classes = CLASSES
    model.preprocessing = Preprocessing((28, 28), 1, (0.2,), (0.3,), "dark")
    return io.save(model, data_env / "m" / "model.safetensors", dataset={"name": "fashion-mnist"})


def test_show_filters(model_file, data_env):
    result = run("show", "filters", model_file)
    assert result.exit_code == 0, result.output
    assert (model_file.parent / "filters-conv2d_1.png").read_bytes().startswith(PNG)
    assert "4 kernels of 3×3×1" in result.output and "shared scale" in result.output
    out = data_env / "pics" / "f2.png"
    result = run("show", "filters", model_file, "--layer", "conv2d_2", "--out", out)
    assert result.exit_code == 0 and out.read_bytes().startswith(PNG)
    result = run("show", "filters", model_file, "--layer", "relu_1")
    assert result.exit_code == 1
    assert "no convolution layer named 'relu_1'" in result.output
    assert "valid: conv2d_1, conv2d_2" in result.output


def test_model_without_conv_layers(data_env):
    model = cc.Sequential([cc.Flatten(), cc.Dense(10)], input_shape=(28, 28, 1))
    model.classes = CLASSES
    model.preprocessing = Preprocessing((28, 28), 1, (0.2,), (0.3,), "dark")
    path = io.save(model, data_env / "dense.safetensors")
    for args in (("show", "filters", path), ("explain", path, "test:0", "--layer", "flatten_1",
                                              "--at", "0,0")):  # fmt: skip
        result = run(*args)
        assert result.exit_code == 1
        assert "has no convolution" in result.output and "flatten_1, dense_1" in result.output


def test_show_maps_of_a_test_image_and_of_a_file(model_file, data_env):
    result = run("show", "maps", model_file, "test:3")
    assert result.exit_code == 0, result.output
    assert "conv2d_1         Conv2D     28×28×4" in result.output
    assert "max_pool2d_1     MaxPool2D  14×14×4" in result.output
    assert (model_file.parent / "maps-test3.png").read_bytes().startswith(PNG)
    photo = data_env / "shoe.png"
    Image.fromarray(np.full((40, 30, 3), 250, np.uint8)).save(photo)  # light: inverted
    out = data_env / "maps.png"
    result = run("show", "maps", model_file, photo, "--layers", "relu_1, conv2d_2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "shoe.png (inverted)" in result.output and out.read_bytes().startswith(PNG)
    assert "relu_1" in result.output and "max_pool2d_1" not in result.output
    bad = run("show", "maps", model_file, "test:3", "--layers", "dense_1")
    assert bad.exit_code == 1 and "valid: conv2d_1, batch_norm_1, relu_1" in bad.output
    missing = run("show", "maps", model_file, data_env / "nope.png")
    assert missing.exit_code == 1 and "no such image file" in missing.output
    far = run("show", "maps", model_file, "test:100")
    assert far.exit_code == 1 and "has 100 images (0..99)" in far.output


def test_explain_prints_the_forward_value(model_file, data_env):
    result = run("explain", model_file, "test:5", "--layer", "relu_1", "--at", "0,27",
                 "--filter", "2", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    model = io.load(model_file)
    from classic_cnn.data import load_dataset

    image = load_dataset("fashion-mnist", "test").images[5]
    y = layer_outputs(model, model.preprocessing.apply(image[None]))[2][0, 0, 27, 2]
    assert record["value"] == pytest.approx(float(y), rel=1e-5, abs=1e-6)
    assert [s["layer"] for s in record["steps"]] == ["batch_norm_1", "relu_1"]
    assert np.array(record["padded"]).sum() == 5  # the corner: a row and a column of padding
    text = run("explain", model_file, "test:5", "--layer", "max_pool2d_1", "--at", "3,4")
    assert text.exit_code == 0, text.output
    assert "maximum =" in text.output and "receptive field: rows" in text.output
    assert list(model_file.parent.glob("explain-test5-max_pool2d_1-3-4-*.png"))
    for args, fragment in [
        (("--layer", "conv9", "--at", "0,0"), "no layer named 'conv9'"),
        (("--layer", "dense_1", "--at", "0,0"), "cannot explain layer 'dense_1'"),
        (("--layer", "conv2d_2", "--at", "14,0"), "valid: rows 0..11, cols 0..11"),
        (("--layer", "conv2d_1", "--at", "0,0", "--filter", "4"), "valid: 0..3"),
        (("--layer", "conv2d_1", "--at", "zero"), "ROW,COL"),
    ]:
        result = run("explain", model_file, "test:0", *args)
        assert result.exit_code == 1 and fragment in result.output, (args, result.output)


def test_show_curves(data_env):
    run_dir = data_env / "r"
    run_dir.mkdir()
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5,
                "val_accuracy": 0.4 + e / 10} for e in (1, 2, 3)]  # fmt: skip
    (run_dir / "history.json").write_text(json.dumps(history))
    result = run("show", "curves", run_dir)
    assert result.exit_code == 0, result.output
    assert "3 epochs" in result.output and (run_dir / "curves.png").read_bytes().startswith(PNG)
    result = run("show", "curves", data_env)
    assert result.exit_code == 1 and "no history.json" in result.output


def test_train_writes_a_report_and_test_adds_to_it(trained, data_env):
    report = trained.parent / "report.html"
    html = report.read_text(encoding="utf-8")
    parsed = check_report(html)
    for section in ("summary", "curves", "validation", "filters", "maps"):
        assert f'<section id="{section}">' in html
    assert 'id="test"' not in html and len(parsed.srcs) >= 6
    plots = data_env / "plots"
    result = run("test", trained, "--plots", plots)
    assert result.exit_code == 0, result.output
    for name in ("confusion.png", "misclassified.png"):
        assert (plots / name).read_bytes().startswith(PNG)
    html = report.read_text(encoding="utf-8")
    check_report(html)
    assert html.count('<section id="test">') == 1 and "Test images (fashion-mnist)" in html
    run("test", trained)  # again: the test section is replaced, not repeated
    assert report.read_text(encoding="utf-8").count('<section id="test">') == 1


def test_tour_command():
    result = run("tour")
    assert result.exit_code == 0 and "= 6600" in result.output
