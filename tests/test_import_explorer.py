"""The explorer on a model trained by PyTorch: ``cnn import`` of the committed LeNet-5 export, a
real ``cnn serve`` process, headless Chromium. The page's bars and the arithmetic of a clicked
unit are the API's answers, and these equal PyTorch's own outputs (tests/test_onnx_cli.py).

``CLASSIC_CNN_SCREENSHOTS=docs`` writes the README's ``docs/explorer-imported.png``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
pytest.importorskip("onnxruntime", reason="the 'onnx' extra (onnxruntime) is not installed")

import httpx

from .conftest import serving
from .test_serve_browser import (
    assert_page_matches,
    browser,  # noqa: F401  (a fixture)
    click_unit,
    shots,  # noqa: F401  (a fixture)
    wait_idle,
)

LENET = Path(__file__).resolve().parent / "fixtures" / "onnx" / "lenet5.onnx"


@pytest.fixture(scope="module")
def imported_server(tmp_path_factory):
    """``cnn import`` then ``cnn serve`` on a free loopback port, as a user runs them."""
    folder = tmp_path_factory.mktemp("imported")
    model = folder / "lenet.safetensors"
    cli = [sys.executable, "-m", "classic_cnn.cli"]
    done = subprocess.run(
        [*cli, "import", str(LENET), "--out", str(model)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    with serving(["serve", model]) as (url, _):
        yield url


def test_the_explorer_shows_a_pytorch_trained_model(browser, imported_server, shots):  # noqa: F811
    server = imported_server
    summary = httpx.get(server + "api/summary").json()
    assert summary["classes"][0] == "T-shirt/top"  # from the ONNX file's metadata
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    wait_idle(page)
    # the page's bars are the API's answer for the picture it shows
    seen = page.evaluate("() => window.explorer.state.seen")
    answer = httpx.post(server + "api/predict", json={"pixels": seen, "invert": "no"}).json()
    assert_page_matches(page, answer)
    # a unit of the second convolution: the arithmetic panel shows the API's value
    click_unit(page.locator("canvas[data-layer='conv2d_2'][data-channel='5']"), 4, 6, 10)
    wait_idle(page)
    body = page.locator("#explain-body")
    assert body.get_attribute("data-layer") == "conv2d_2"
    request = {"pixels": seen, "invert": "no", "layer": "conv2d_2", "row": 4, "col": 6}
    e = httpx.post(server + "api/explain", json=request | {"channel": 5}).json()
    assert float(page.get_attribute("#explain-value", "data-value")) == e["value"]
    products = np.array(e["products"])
    assert e["conv_value"] == pytest.approx(products.sum() + e["bias"], rel=1e-9)
    page.screenshot(path=str(shots / "explorer-imported.png"), full_page=True)
    page.close()
    assert not errors, errors
