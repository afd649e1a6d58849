"""cnn explain --why end to end: a PNG of the map over the input, the class and its probability
as the library computes them, every method, a named class, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn import io
from classic_cnn.attribution import attribute
from classic_cnn.viz.report import why_picks, why_section
from tests import test_cli, test_viz_cli
from tests.test_viz import PNG, check_report

data_env, run, trained = test_cli.data_env, test_cli.run, test_cli.trained
model_file = test_viz_cli.model_file


def _input(model_file, index):
    from classic_cnn.data import load_dataset

    model = io.load(model_file)
    image = load_dataset("fashion-mnist", "test").images[index]
    return model, model.preprocessing.apply(image[None], model.dtype)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "gradient-x-input", "occlusion"])
def test_why_writes_the_map_the_library_computes(model_file, method):
    result = run("explain", model_file, "test:5", "--why", "--method", method, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    model, x = _input(model_file, 5)
    want = attribute(model, x, method)
    assert record["method"] == method and record["class_name"] == want.class_name
    assert record["chosen"] == "top"
    assert record["probability"] == pytest.approx(want.probability, rel=1e-6)
    np.testing.assert_allclose(np.array(record["map"]), want.map, rtol=1e-5, atol=1e-7)
    assert np.array(record["map"]).shape == (28, 28)
    png = model_file.parent / f"why-test5-{method}-{want.class_name.replace('/', '_')}.png"
    assert png.read_bytes().startswith(PNG) and record["png"] == str(png)


def test_why_for_a_named_class_prints_class_probability_and_scale(model_file, data_env):
    out = data_env / "pics" / "why.png"
    result = run("explain", model_file, "test:2", "--why", "--class", "Shirt", "--out", out)
    assert result.exit_code == 0, result.output
    model, x = _input(model_file, 2)
    p = model.predict_proba(x)[0, 6]
    assert f"why 'Shirt' (as asked, probability {p:.4f})" in result.output
    assert "Grad-CAM of relu_2, colour scale 0 to" in result.output
    assert out.read_bytes().startswith(PNG)
    occ = run("explain", model_file, "test:2", "--why", "--method", "occlusion", "--patch", "7",
              "--stride", "7")  # fmt: skip
    assert occ.exit_code == 0 and "under a 7×7 patch" in occ.output
    cam = run("explain", model_file, "test:2", "--why", "--layer", "conv2d_1")
    assert cam.exit_code == 0 and "Grad-CAM of conv2d_1" in cam.output


def test_why_refusals_are_one_line(model_file):
    for args, code, fragment in [
        (("--class", "Hat"), 1, "class must be one of the model's classes (T-shirt/top"),
        (("--layer", "dense_1"), 1, "Grad-CAM needs H×W×C maps, not layer 'dense_1'"),
        (("--method", "lime"), 2, "'lime' is not one of"),
        (("--method", "saliency", "--layer", "relu_1"), 2, "--layer is for --method gradcam"),
        (("--method", "occlusion", "--layer", "relu_1"), 2, "not occlusion"),
        (("--at", "3,4"), 2, "not with --why"),
        (("--method", "occlusion", "--patch", "29"), 1, "patch must fit in the model's 28×28"),
    ]:
        result = run("explain", model_file, "test:0", "--why", *args)
        assert result.exit_code == code and fragment in result.output, (args, result.output)
    bare = run("explain", model_file, "test:0")
    assert bare.exit_code == 2 and "give --layer and --at" in bare.output


def test_the_training_report_shows_grad_cam_of_right_and_wrong_images(trained):
    html = (trained.parent / "report.html").read_text(encoding="utf-8")
    check_report(html)
    start = html.index('<section id="why">')
    section = html[start : html.index("</section>", start)]
    assert "Grad-CAM on relu_2" in section  # lenet5's last activation before flattening
    assert "Correctly classified validation images" in section
    # this small run on easy bars may make no mistakes on its 50 validation images
    if "No misclassified images." in section:
        assert section.count("<img") == 1
    else:
        assert section.count("<img") == 2 and "Misclassified validation images" in section


def test_why_section_of_right_and_wrong_images():
    from classic_cnn import presets
    from classic_cnn.data.batches import Preprocessing

    model = presets.build("lenet5", classes=10, seed=0)
    model.preprocessing = Preprocessing((28, 28), 1, (0.2,), (0.3,), "dark")
    model.classes = [f"c{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    probs = model.predict_proba(images)
    labels = np.arange(40) % 10
    section = why_section(model, images, labels, probs, k=4).html()
    check_report(f"<!DOCTYPE html><html><body>{section}</body></html>")
    assert section.count("<img") == 2 and "Grad-CAM on relu_2" in section
    empty = why_section(model, images, probs.argmax(axis=1), probs).html()  # all right
    assert empty.count("<img") == 1 and "No misclassified images." in empty
    dense = cc.Sequential([cc.Flatten(), cc.Dense(10)], input_shape=(28, 28, 1))
    dense.preprocessing = model.preprocessing
    assert "has none" in why_section(dense, images, labels, probs).html()


def test_why_picks_right_ones_of_distinct_classes_and_the_surest_mistakes():
    labels = np.array([0, 0, 1, 1, 2, 2, 0])
    probs = np.array(
        [[0.9, 0.1, 0], [0.95, 0, 0.05], [0.2, 0.8, 0], [0.7, 0.3, 0], [0, 0.4, 0.6],
         [0.1, 0.85, 0.05], [0.4, 0.6, 0]]
    )  # fmt: skip
    right, wrong = why_picks(labels, probs, k=2)
    assert right == [1, 2]  # class 0's surest (0.95), then class 1's; at most k
    assert wrong == [5, 3]  # the surest mistakes first (0.85, 0.7)
    right, wrong = why_picks(labels, probs, k=6)
    assert right == [1, 2, 4] and wrong == [5, 3, 6]
