"""The explorer's JSON API (``cnn serve``), through the framework's test client: every endpoint,
values equal to the engine's own forward pass, and every kind of bad input answered with a 4xx
and a message, never a 500."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the explorer needs the 'serve' extra (fastapi)")
pytest.importorskip("multipart", reason="the explorer needs the 'serve' extra (python-multipart)")

with warnings.catch_warnings():  # newer Starlette prefers another HTTP client; both work
    warnings.filterwarnings("ignore", message=".*httpx.*")
    from fastapi.testclient import TestClient
from PIL import Image

from classic_cnn import io as model_io
from classic_cnn import presets
from classic_cnn.data.batches import Preprocessing, convert_images
from classic_cnn.data.dataset import Dataset
from classic_cnn.data.images import read_image
from classic_cnn.explain import layer_outputs, prepare_image
from classic_cnn.serve import MAX_UPLOAD_BYTES, create_app
from classic_cnn.serve.app import host_name

pytestmark = pytest.mark.filterwarnings("ignore:.*httpx.*")

CLASSES = [f"class {i}" for i in range(10)]


def tiny_dataset(n=60, seed=0) -> Dataset:
    """Blobs on a dark background, a different place per class (Fashion-MNIST-like polarity)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.uint8)
    labels = np.arange(n) % 10
    for i, y in enumerate(labels):
        r, c = 4 + 2 * y, 4 + (7 * y) % 18
        images[i, r : r + 6, c : c + 6, 0] = rng.integers(150, 256)
    return Dataset(images, labels, list(CLASSES), name="blobs", split="test")


def tiny_model(tmp_path):
    """LeNet-5 with random weights and a real preprocessing record, through a model file."""
    data = tiny_dataset()
    model = presets.build("lenet5", classes=10, seed=0)
    model.preprocessing = Preprocessing.from_dataset(data, model.input_shape)
    model.classes = list(CLASSES)
    path = model_io.save(model, tmp_path / "tiny.safetensors")
    return model_io.load(path), path, data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, path, data = tiny_model(tmp_path_factory.mktemp("serve"))
    client = TestClient(create_app(model, samples=data), base_url="http://127.0.0.1:8000")
    return model, path, data, client


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def photo_like(h=90, w=140, seed=1) -> np.ndarray:
    """An RGB image of another size and polarity (dark object on a light background)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    img[20:70, 40:100] = rng.integers(0, 90, (50, 60, 3))
    return img


def assert_4xx(response, status=None, contains=""):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert contains.lower() in detail.lower(), detail
    return detail


# --------------------------------------------------------------------------------------------
# every endpoint, equal to the engine


def test_summary_describes_the_model(setup):
    model, _, data, client = setup
    r = client.get("/api/summary")
    assert r.status_code == 200
    s = r.json()
    assert s["input_shape"] == [28, 28, 1]
    assert s["classes"] == CLASSES
    assert s["parameters"] == model.count_params()
    rows = model.summary_rows()
    assert [(lyr["name"], lyr["output_shape"], lyr["params"]) for lyr in s["layers"]] == [
        (r_["name"], list(r_["output_shape"]), r_["params"]) for r_ in rows
    ]
    assert s["map_layers"] == [
        "conv2d_1", "relu_1", "max_pool2d_1", "conv2d_2", "relu_2", "max_pool2d_2"
    ]  # fmt: skip
    assert s["explainable"] == s["map_layers"]
    assert s["drawable"] is True
    assert s["samples"] == {"available": True, "name": "blobs", "count": len(data), "reason": ""}
    assert s["max_upload_bytes"] == MAX_UPLOAD_BYTES == 10_000_000
    assert s["preprocessing"]["background"] == "dark"


def test_predict_pixels_equals_the_engine(setup):
    model, _, _, client = setup
    pixels = np.random.default_rng(3).integers(0, 256, (40, 30), dtype=np.uint8)
    r = client.post("/api/predict", json={"pixels": pixels.tolist(), "invert": "no"})
    assert r.status_code == 200
    out = r.json()
    seen, x, _ = prepare_image(model, pixels[..., None], "no")
    assert np.array_equal(np.array(out["seen"], np.uint8), seen)
    expected = model.predict_proba(x)[0]
    assert np.array_equal(np.array(out["probabilities"], np.float32), expected)
    assert abs(sum(out["probabilities"]) - 1) < 1e-5
    top = [t["probability"] for t in out["top"]]
    assert top == sorted(top, reverse=True) and len(top) == 10
    assert out["prediction"] == CLASSES[int(expected.argmax())] == out["top"][0]["class"]
    assert out["inverted"] is False


def test_predict_file_converts_as_the_command_line(setup, tmp_path):
    model, _, _, client = setup
    img = photo_like()
    data = png_bytes(img)
    r = client.post("/api/predict-file", files={"file": ("shoe.png", data, "image/png")})
    assert r.status_code == 200, r.text
    out = r.json()
    (tmp_path / "shoe.png").write_bytes(data)
    seen, x, flipped = prepare_image(model, read_image(tmp_path / "shoe.png"), "auto")
    assert flipped and out["inverted"] is True  # light background → the dark model's polarity
    assert np.array_equal(np.array(out["seen"], np.uint8), seen)
    assert np.array_equal(np.array(out["probabilities"], np.float32), model.predict_proba(x)[0])
    assert out["file"] == {
        "name": "shoe.png", "height": 90, "width": 140, "channels": 3, "bytes": len(data)
    }  # fmt: skip
    # invert=no is honoured
    r = client.post("/api/predict-file", files={"file": ("shoe.png", data)}, data={"invert": "no"})
    assert r.json()["inverted"] is False
    # the seen array sent back as pixels gives the very same answer
    again = client.post("/api/predict", json={"pixels": out["seen"], "invert": "no"}).json()
    assert again["probabilities"] == out["probabilities"]


def test_feature_maps_equal_each_layers_output(setup):
    model, _, _, client = setup
    pixels = np.random.default_rng(4).integers(0, 256, (28, 28), dtype=np.uint8)
    out = client.post("/api/maps", json={"pixels": pixels.tolist(), "invert": "no"}).json()
    _, x, _ = prepare_image(model, pixels[..., None], "no")
    outs = dict(zip([lyr.name for lyr in model.layers], layer_outputs(model, x), strict=True))
    assert [lyr["name"] for lyr in out["layers"]][:3] == ["conv2d_1", "relu_1", "max_pool2d_1"]
    for layer in out["layers"]:
        y = outs[layer["name"]][0]
        assert layer["shape"] == list(y.shape)
        maps = np.array(layer["maps"], np.float32)  # (C, H, W)
        assert np.array_equal(maps, y.transpose(2, 0, 1)), layer["name"]
        assert layer["vmin"] <= float(y.min()) and layer["vmax"] >= float(y.max())
        assert layer["signed"] == bool(y.min() < 0)
    only = client.post(
        "/api/maps", json={"pixels": pixels.tolist(), "layers": ["relu_2"], "invert": "no"}
    ).json()
    assert [lyr["name"] for lyr in only["layers"]] == ["relu_2"]


@pytest.mark.parametrize(
    "layer,row,col,channel",
    [
        ("conv2d_1", 0, 0, 2),  # a corner: the kernel half in the zero padding
        ("relu_1", 14, 13, 5),
        ("max_pool2d_1", 6, 7, 1),
        ("conv2d_2", 9, 0, 15),
        ("relu_2", 4, 5, None),  # the strongest channel there
        ("max_pool2d_2", 4, 4, 0),
    ],
)
def test_explain_values_equal_the_forward_pass(setup, layer, row, col, channel):
    model, _, _, client = setup
    pixels = tiny_dataset().images[7, ..., 0]
    body = {"pixels": pixels.tolist(), "invert": "no", "layer": layer, "row": row, "col": col}
    if channel is not None:
        body["channel"] = channel
    r = client.post("/api/explain", json=body)
    assert r.status_code == 200, r.text
    e = r.json()
    _, x, _ = prepare_image(model, pixels[..., None], "no")
    names = [lyr.name for lyr in model.layers]
    y = layer_outputs(model, x)[names.index(layer)][0]
    k = channel if channel is not None else int(np.argmax(y[row, col]))
    assert e["channel"] == k and e["position"] == [row, col]
    assert e["channel_chosen"] == ("given" if channel is not None else "strongest")
    assert e["value"] == pytest.approx(float(y[row, col, k]), rel=1e-5, abs=1e-5)
    patch = np.array(e["patch"])
    if e["kind"] == "conv":
        kernel, products = np.array(e["kernel"]), np.array(e["products"])
        assert np.array_equal(products, patch * kernel)
        assert e["total"] == pytest.approx(products.sum(), rel=1e-12)
        assert e["conv_value"] == pytest.approx(e["total"] + e["bias"], rel=1e-12)
        conv = model.layers[names.index(e["base_layer"])]
        assert np.array_equal(kernel, conv.params["kernel"][..., k].astype(np.float64))
    else:
        wr, wc = e["winner"]
        assert patch[wr, wc] == patch.max() == pytest.approx(e["conv_value"])
    t, left, b, right = e["receptive_field"]
    assert 0 <= t < b <= 28 and 0 <= left < right <= 28
    if layer == "conv2d_1" and row == 0:
        assert np.array(e["padded"]).sum() > 0 and e["receptive_field_full"][0] < 0


def test_filters_tiles_map_back_to_the_kernels(setup):
    model, _, _, client = setup
    f = client.get("/api/filters").json()
    kernel = model.layers[0].params["kernel"]
    assert f["layer"] == "conv2d_1" and f["shape"] == list(kernel.shape) and not f["colour"]
    tiles = np.array(f["tiles"])  # (C_out, C_in, KH, KW)
    weights = f["vmin"] + tiles * (f["vmax"] - f["vmin"])
    assert np.allclose(weights, kernel.transpose(3, 2, 0, 1), atol=1e-6)
    assert f["vmax"] == pytest.approx(float(np.abs(kernel).max())) and f["vmin"] == -f["vmax"]
    assert client.get("/api/filters?layer=conv2d_2").json()["shape"] == [5, 5, 6, 16]
    assert_4xx(client.get("/api/filters?layer=relu_1"), 404, "valid: conv2d_1, conv2d_2")


def test_sample_is_a_test_image_as_the_model_sees_it(setup):
    _, _, data, client = setup
    s = client.get("/api/sample?index=13").json()
    assert s["index"] == 13 and s["label"] == int(data.labels[13])
    assert s["true_class"] == CLASSES[s["label"]]
    expected = convert_images(data.images[13:14], (28, 28, 1), "dark")[0]
    assert np.array_equal(np.array(s["seen"], np.uint8), expected)
    assert 0 <= client.get("/api/sample").json()["index"] < len(data)
    assert_4xx(client.get(f"/api/sample?index={len(data)}"), 400, "out of range")
    assert_4xx(client.get("/api/sample?index=-1"), 422)
    assert_4xx(client.get("/api/sample?index=abc"), 422)


def test_no_samples_is_a_clear_404(setup):
    model = setup[0]
    client = TestClient(create_app(model, samples=None), base_url="http://127.0.0.1")
    assert client.get("/api/summary").json()["samples"]["available"] is False
    assert_4xx(client.get("/api/sample"), 404, "no test images")
    # "auto" with a dataset the machine does not have: no download, a reason
    model.metadata["dataset"] = {"name": "my-photos"}
    try:
        auto = TestClient(create_app(model), base_url="http://127.0.0.1")
        reason = auto.get("/api/summary").json()["samples"]["reason"]
    finally:
        model.metadata.pop("dataset")
    assert "my-photos" in reason


def test_openapi_schema_lists_every_endpoint(setup):
    client = setup[3]
    schema = client.get("/api/openapi.json").json()
    paths = schema["paths"]
    for path in ("/api/summary", "/api/filters", "/api/sample"):
        assert "get" in paths[path]
    for path in ("/api/predict", "/api/predict-file", "/api/maps", "/api/explain"):
        assert "post" in paths[path]
    assert "pixels" in json.dumps(schema["components"]["schemas"]["ExplainIn"])
    # Swagger UI would load scripts from a CDN: it is off
    assert client.get("/docs").status_code == 404


# --------------------------------------------------------------------------------------------
# bad input: 4xx with a message, never a 500


@pytest.mark.parametrize(
    "body,status,says",
    [
        (b"{not json", 422, "not valid JSON"),
        (b"[1, 2]", 422, "invalid request"),
        (b'{"pixels": "abc"}', 422, "pixels"),
        (b'{"pixels": [[1, 2], [3]]}', 400, "rectangular"),
        (b'{"pixels": [[1.5, 2], [3, 4]]}', 400, "integers"),
        (b'{"pixels": [[1, 256], [3, 4]]}', 400, "0–255"),
        (b'{"pixels": [[-1, 2], [3, 4]]}', 400, "0–255"),
        (b'{"pixels": [[[[1]]]]}', 400, "H×W"),
        (b'{"pixels": [[[1, 2]]]}', 400, "C = 1 or 3"),
        (b'{"pixels": []}', 400, "H×W"),
        (b'{"pixels": [[true, false]]}', 400, "integers"),
        (b'{"pixels": [[1, 2]], "invert": "maybe"}', 422, "invert"),
        (b'{"pixels": [[1, 2]], "extra": 1}', 422, "extra"),
    ],
)
def test_bad_pixels(setup, body, status, says):
    client = setup[3]
    r = client.post("/api/predict", content=body, headers={"content-type": "application/json"})
    assert_4xx(r, status, says)


def test_too_many_pixels_per_side(setup):
    client = setup[3]
    r = client.post("/api/predict", json={"pixels": [[0] * 5000]})
    assert_4xx(r, 400, "at most 4096")


@pytest.mark.parametrize(
    "change,status,says",
    [
        ({"layer": "dense_1"}, 400, "cannot explain layer 'dense_1'"),
        ({"layer": "nope"}, 400, "no layer named 'nope'"),
        ({"row": 28}, 400, "outside"),
        ({"col": -1}, 400, "outside"),
        ({"channel": 6}, 400, "out of range"),
        ({"channel": -1}, 400, "out of range"),
        ({"row": "a"}, 422, "row"),
        ({"row": 1.5}, 422, "row"),
        ({"layer": None}, 422, "layer"),
    ],
)
def test_bad_explain_requests(setup, change, status, says):
    client = setup[3]
    body = {"pixels": [[0] * 28] * 28, "layer": "relu_1", "row": 1, "col": 1} | change
    assert_4xx(client.post("/api/explain", json=body), status, says)


def test_explain_without_a_layer(setup):
    client = setup[3]
    assert_4xx(client.post("/api/explain", json={"pixels": [[0]]}), 422, "layer")


def bomb_png() -> bytes:
    """A small PNG file that decodes to more pixels than Pillow's decompression-bomb limit."""
    side = int((Image.MAX_IMAGE_PIXELS + 1) ** 0.5) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,data,says",
    [
        ("notes.txt", b"hello, not an image", "cannot identify image file"),
        ("empty.png", b"", "empty"),
        ("cut.png", None, "damaged or truncated"),
        ("cut.jpg", "cut jpeg", "damaged or truncated"),
        ("bomb.png", "bomb", "decompression-bomb"),
    ],
)
def test_bad_files(setup, name, data, says):
    client = setup[3]
    if data is None:
        data = png_bytes(photo_like())[:200]
    elif data == "cut jpeg":  # a real JPEG, cut inside its scan data
        buf = io.BytesIO()
        Image.fromarray(photo_like()).save(buf, format="JPEG", quality=90)
        whole = buf.getvalue()
        data = whole[: int(len(whole) * 0.6)]
        assert len(data) > whole.index(b"\xff\xda") + 100
    elif data == "bomb":
        data = bomb_png()
        assert len(data) < 1_000_000
    r = client.post("/api/predict-file", files={"file": (name, data, "image/png")})
    detail = assert_4xx(r, 400, says)
    assert name in detail and "/tmp" not in detail  # names the upload, not our temporary file
    assert client.get("/api/summary").status_code == 200  # the server lives on


def test_uploads_over_10_mb_are_refused_unread(setup):
    client = setup[3]
    big = b"\0" * (MAX_UPLOAD_BYTES + 100_000)
    r = client.post("/api/predict-file", files={"file": ("big.png", big, "image/png")})
    assert_4xx(r, 413, "10 MB")

    def chunks():  # no Content-Length: the body is counted as it comes
        for _ in range(12):
            yield b"\0" * 1_000_000

    r = client.post("/api/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_4xx(r, 413, "10 MB")
    r = client.post("/api/predict-file", files={"wrong_field": ("a.png", b"x")})
    assert_4xx(r, 422, "file")


def test_other_hosts_are_refused(setup):
    model = setup[0]
    app = create_app(model, samples=None)
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        assert TestClient(app, base_url=base).get("/api/summary").status_code == 200
    for base in ("http://evil.example:8000", "http://127.0.0.1.evil.example", "http://10.0.0.8"):
        r = TestClient(app, base_url=base).get("/api/summary")
        assert_4xx(r, 421, "answers only to")
    r = TestClient(app, base_url="http://127.0.0.1").get("/", headers={"host": "attacker.test"})
    assert_4xx(r, 421, "attacker.test")
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost:80") == "localhost"


def test_only_the_packages_own_files_are_served(setup):
    client = setup[3]
    page = client.get("/")
    assert page.status_code == 200 and "classic-cnn explorer" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    for path in (
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
        "/static//etc/passwd",
        "/etc/passwd",
        "/api/../../etc/passwd",
    ):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert "root:" not in r.text and "import" not in r.text


# --------------------------------------------------------------------------------------------
# the command


def serve_and_ask(path, host):
    """Run `cnn serve PATH [--host HOST] --port 0`, ask it for the summary on 127.0.0.1, stop it;
    return the first line it printed, the summary's name and all it printed after that."""
    import httpx

    host_args = ["--host", host] if host else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "classic_cnn.cli", "serve", str(path), *host_args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        line = proc.stdout.readline()
        found = re.search(rf"http://{re.escape(host or '127.0.0.1')}:(\d+)/", line)
        assert found, line
        url = f"http://127.0.0.1:{found.group(1)}/api/summary"
        deadline = time.time() + 30
        while True:
            try:
                r = httpx.get(url, timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "the server did not answer"
                time.sleep(0.1)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        # read after stopping, so a missing line cannot hang; through the same buffered reader
        # as the first line (communicate() would read the pipe beneath it and miss what
        # readline() had already buffered)
        rest = proc.stdout.read()
    return line, r.json()["name"], rest


def test_cnn_serve_prints_its_address_and_serves(setup):
    line, name, rest = serve_and_ask(setup[1], None)
    assert name == setup[1].name
    assert "not only on this machine" not in line + rest, line + rest


def test_cnn_serve_on_every_interface_warns_and_serves(setup):
    _, name, rest = serve_and_ask(setup[1], "0.0.0.0")
    assert name == setup[1].name
    assert "note: listening on 0.0.0.0, not only on this machine (127.0.0.1)" in rest, rest
    assert "there is no login" in rest, rest


def test_cnn_serve_bad_model_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "classic_cnn.cli", "serve", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "no such model file" in r.stderr


def test_a_port_in_use_is_one_line(setup):
    import socket

    path = setup[1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "classic_cnn.cli", "serve", str(path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_hosts_allowed_for_each_binding():
    from classic_cnn.serve.app import allowed_hosts

    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("192.168.1.5") == {"192.168.1.5"}
    everywhere = allowed_hosts("0.0.0.0")
    assert {"127.0.0.1", "localhost"} <= everywhere and "evil.example" not in everywhere
