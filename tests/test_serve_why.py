"""POST /api/why: the explorer's attribution maps equal the library's for the same pixels; the
summary names the methods and layers; bad requests are a 4xx with a message."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the explorer needs the 'serve' extra (fastapi)")
pytest.importorskip("multipart", reason="the explorer needs the 'serve' extra (python-multipart)")

from classic_cnn.attribution import attribute
from classic_cnn.explain import prepare_image

from .test_serve_api import assert_4xx, setup  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*httpx.*")


def test_summary_names_the_methods_and_grad_cam_layers(setup):  # noqa: F811
    s = setup[3].get("/api/summary").json()
    assert s["why"] == {
        "methods": ["gradcam", "saliency", "gradient-x-input", "occlusion"],
        "gradcam_layers": [
            "conv2d_1", "relu_1", "max_pool2d_1", "conv2d_2", "relu_2", "max_pool2d_2"
        ],
        "default_layer": "relu_2",
    }  # fmt: skip


@pytest.mark.parametrize(
    "body,options",
    [
        ({}, {}),
        ({"method": "gradcam", "layer": "conv2d_1", "class_name": "class 3"}, {}),
        ({"method": "saliency"}, {}),
        ({"method": "gradient-x-input", "class_name": "class 9"}, {}),
        ({"method": "occlusion", "patch": 6, "stride": 3}, {"patch": 6, "stride": 3}),
    ],
)
def test_why_equals_the_library(setup, body, options):  # noqa: F811
    model, _, data, client = setup
    pixels = data.images[7]
    r = client.post("/api/why", json={"pixels": pixels.tolist(), "invert": "no", **body})
    assert r.status_code == 200, r.text
    out = r.json()
    _, x, _ = prepare_image(model, pixels, "no")
    method = body.get("method", "gradcam")
    if "layer" in body:
        options = {"layer": body["layer"]}
    want = attribute(model, x, method, body.get("class_name"), **options)
    assert out["method"] == method and out["class_name"] == want.class_name
    assert out["chosen"] == ("given" if "class_name" in body else "top")
    np.testing.assert_allclose(np.array(out["map"]), want.map, rtol=1e-6, atol=1e-9)
    assert np.array(out["map"]).shape == (28, 28)
    assert out["probability"] == pytest.approx(want.probability)
    assert [out["vmin"], out["vmax"]] == pytest.approx(list(want.scale))
    assert out["scale"] == want.scale_text() and out["seen"] == pixels.tolist()
    if method == "gradcam":
        assert out["layer"] == body.get("layer", "relu_2")
    assert "layer_maps" not in out and "gradient" not in out
    assert set(out) == {*want.record(), "seen", "inverted"}


@pytest.mark.parametrize(
    "change,status,says",
    [
        ({"method": "lime"}, 422, "method"),
        ({"class_name": "hat"}, 400, "one of the model's classes"),
        ({"layer": "dense_1"}, 400, "Grad-CAM needs H×W×C maps"),
        ({"method": "occlusion", "patch": 40}, 400, "patch must fit"),
        ({"method": "occlusion", "stride": 0}, 422, "stride"),
    ],
)
def test_bad_why_requests(setup, change, status, says):  # noqa: F811
    client = setup[3]
    body = {"pixels": np.zeros((28, 28), int).tolist(), **change}
    assert_4xx(client.post("/api/why", json=body), status, says)


def test_openapi_schema_lists_why(setup):  # noqa: F811
    schema = setup[3].get("/api/openapi.json").json()
    assert "post" in schema["paths"]["/api/why"]
    assert "class_name" in str(schema["components"]["schemas"]["WhyIn"])
