"""cnn explain --why end to end: a PNG of the map over the input, the class and its probability
as the library computes them, every method, a named class, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from classic_cnn import io
from classic_cnn.attribution import attribute
from tests import test_cli, test_viz_cli
from tests.test_viz import PNG

data_env, run, model_file = test_cli.data_env, test_cli.run, test_viz_cli.model_file


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
        (("--method", "occlusion", "--patch", "29"), 1, "patch must fit in the model's 28×28"),
    ]:
        result = run("explain", model_file, "test:0", "--why", *args)
        assert result.exit_code == code and fragment in result.output, (args, result.output)
    bare = run("explain", model_file, "test:0")
    assert bare.exit_code == 2 and "give --layer and --at" in bare.output
