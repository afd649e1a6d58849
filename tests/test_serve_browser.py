"""The explorer page in a real browser: Playwright driving Debian's headless Chromium against a
real ``cnn serve`` process on loopback.

What the page shows is held to what the API answers for the same pixels: the input the network
sees (read back from the page's canvas), the probability bars, the arithmetic panel's value and
the receptive field. No console errors are allowed. Screenshots go to ``$CLASSIC_CNN_SCREENSHOTS``
(``docs/`` to refresh the README's) or to the test's temporary folder.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium)",
        allow_module_level=True,
    )
pytest.importorskip("playwright", reason="browser tests need the 'browser' extra (playwright)")
pytest.importorskip("fastapi", reason="the explorer needs the 'serve' extra (fastapi)")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from classic_cnn import io as model_io  # noqa: E402
from classic_cnn import presets  # noqa: E402
from classic_cnn.data.batches import Preprocessing  # noqa: E402
from classic_cnn.data.dataset import Dataset  # noqa: E402

from .conftest import serving  # noqa: E402

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def explorer_model(folder: Path) -> Path:
    """A LeNet-5 for the page: trained for a few seconds on 600 Fashion-MNIST images when they
    are on this machine (so the pictures mean something, and the page offers test images),
    otherwise random weights with a real preprocessing record."""
    from classic_cnn.data.named import load_dataset

    model = presets.build("lenet5", classes=10, seed=0)
    try:
        train = load_dataset("fashion-mnist", "train", download=False).take(600)
    except Exception:
        train = None
    if train is not None:
        from classic_cnn import fit

        fit(model, train, epochs=3, batch_size=32, progress=False)
        dataset = {"name": "fashion-mnist"}
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
        data = Dataset(images, np.arange(40) % 10, [f"class {i}" for i in range(10)])
        model.preprocessing = Preprocessing.from_dataset(data, model.input_shape)
        model.classes = data.classes
        dataset = None
    return model_io.save(model, folder / "lenet5.safetensors", dataset=dataset)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `cnn serve` process on a free loopback port; yields its base URL."""
    folder = tmp_path_factory.mktemp("explorer")
    path = explorer_model(folder)
    with serving(["serve", path]) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1440, "height": 1000},
            locale="en-US",
        )
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the explorer, loaded and idle; fails the test on any console error
    other than those a test declares expected (``page.expected_errors``)."""
    pg = browser.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    pg.expected_errors = []
    pg.goto(server)
    wait_idle(pg)
    yield pg
    pg.close()
    unexpected = [e for e in errors if not any(re.search(x, e) for x in pg.expected_errors)]
    assert not unexpected, unexpected


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("CLASSIC_CNN_SCREENSHOTS")
    folder = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_idle(pg, timeout=30_000):
    pg.wait_for_function("window.explorer && window.explorer.idle()", timeout=timeout)


def shown_seen(pg) -> np.ndarray:
    """The 'What the network sees' canvas, read back: uint8 (H, W) from its red channel."""
    data = pg.evaluate(
        """() => { const c = document.querySelector('#seen');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
                   return [c.height, c.width, Array.from(d.data)]; }"""
    )
    h, w, rgba = data
    return np.array(rgba, np.uint8).reshape(h, w, 4)[..., 0]


def shown_bars(pg) -> list[tuple[str, float, str, float]]:
    """(class, probability, percentage text, bar width %) of each bar, top to bottom."""
    return pg.evaluate(
        """() => Array.from(document.querySelectorAll('#bars li')).map(li => [
             li.dataset.class, Number(li.dataset.p), li.querySelector('.pct').textContent,
             parseFloat(li.querySelector('.fill').style.width)])"""
    )


def assert_page_matches(pg, answer: dict):
    """The page's input picture and bars are the API's answer for the same pixels."""
    seen = np.array(answer["seen"], np.uint8)[..., 0]
    assert np.array_equal(shown_seen(pg), seen)
    bars = shown_bars(pg)
    assert len(bars) == 10
    for (name, p, text, width), top in zip(bars, answer["top"], strict=True):
        assert name == top["class"]
        assert p == top["probability"]  # the very number the API gave
        assert text == f"{100 * top['probability']:.1f}%"
        assert width == pytest.approx(100 * top["probability"], abs=0.006)
    # and the bars are visible: the first bar's fill is as wide as its probability says
    fill = pg.locator("#bars li").first.locator(".fill").bounding_box()
    track = pg.locator("#bars li").first.locator(".track").bounding_box()
    assert fill["width"] == pytest.approx(track["width"] * bars[0][1], abs=2)


def draw_stroke(pg, points):
    box = pg.locator("#draw").bounding_box()
    x0, y0 = box["x"], box["y"]
    pg.mouse.move(x0 + points[0][0], y0 + points[0][1])
    pg.mouse.down()
    for x, y in points[1:]:
        pg.mouse.move(x0 + x, y0 + y, steps=3)
    pg.mouse.up()


def click_unit(tile, row: int, col: int, size: int):
    """Click the middle of unit (row, col) of a size×size map tile (Playwright's position is
    relative to the padding box, inside the tile's 1-pixel border)."""
    box = tile.bounding_box()
    x = (col + 0.5) / size * box["width"] - 1
    y = (row + 0.5) / size * box["height"] - 1
    tile.click(position={"x": x, "y": y})


def canvas_png(pg, selector: str) -> bytes:
    url = pg.evaluate(f"() => document.querySelector('{selector}').toDataURL('image/png')")
    return base64.b64decode(url.split(",", 1)[1])


# --------------------------------------------------------------------------------------------


def test_a_drawn_stroke_shows_what_the_api_says(page, server, shots):
    page.click("#tab-draw")
    wait_idle(page)
    # a sandal-ish zigzag and a line: several requests while drawing, one at the end
    draw_stroke(page, [(60, 200), (110, 120), (150, 190), (200, 110), (240, 200)])
    draw_stroke(page, [(50, 225), (240, 225)])
    wait_idle(page)
    png = canvas_png(page, "#draw")
    answer = httpx.post(
        server + "api/predict-file",
        files={"file": ("drawing.png", png, "image/png")},
        data={"invert": "no"},
    ).json()
    assert answer["seen"] != [[[0]] * 28] * 28  # the stroke is there
    assert_page_matches(page, answer)
    assert "your drawing" in page.text_content("#seen-note")
    page.screenshot(path=str(shots / "explorer-draw.png"), full_page=True)
    # Clear empties the canvas and the network's input
    page.click("#clear")
    wait_idle(page)
    assert shown_seen(page).max() == 0


def test_a_dropped_file_shows_what_the_api_says(page, server):
    rng = np.random.default_rng(5)
    photo = np.full((120, 200, 3), 240, np.uint8)  # a dark shoe-like blob on a light page
    photo[50:95, 30:170] = rng.integers(10, 80, (45, 140, 3))
    photo[30:50, 120:170] = 60
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    data = buf.getvalue()
    page.click("#tab-file")
    page.evaluate(
        """([b64, name]) => {
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             const dt = new DataTransfer();
             dt.items.add(new File([bytes], name, {type: 'image/png'}));
             const drop = document.querySelector('#drop');
             drop.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true,
                                                           cancelable: true}));
             drop.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,
                                                       cancelable: true}));
           }""",
        [base64.b64encode(data).decode(), "shoe.png"],
    )
    wait_idle(page)
    answer = httpx.post(
        server + "api/predict-file", files={"file": ("shoe.png", data, "image/png")}
    ).json()
    assert answer["inverted"] is True  # light background, dark-trained model
    assert_page_matches(page, answer)
    assert "inverted to the training polarity" in page.text_content("#seen-note")
    assert page.is_visible("#original")
    assert not page.is_visible("#message")


def test_clicking_a_unit_shows_the_apis_arithmetic(page, server, shots):
    # the page starts on a test image (or a blank drawing); click relu_1, filter 2
    click_unit(page.locator("canvas[data-layer='relu_1'][data-channel='2']"), 9, 17, 28)
    wait_idle(page)
    body = page.locator("#explain-body")
    assert body.get_attribute("data-layer") == "relu_1"
    assert (body.get_attribute("data-row"), body.get_attribute("data-col")) == ("9", "17")
    assert body.get_attribute("data-channel") == "2"
    seen = page.evaluate("() => window.explorer.state.seen")
    assert np.array_equal(np.array(seen, np.uint8)[..., 0], shown_seen(page))
    request = {"pixels": seen, "invert": "no", "layer": "relu_1", "row": 9, "col": 17}
    e = httpx.post(server + "api/explain", json=request | {"channel": 2}).json()
    value = page.get_attribute("#explain-value", "data-value")
    assert float(value) == e["value"]
    shown = float(page.text_content("#explain-value"))  # 6 significant digits
    assert shown == pytest.approx(e["value"], rel=5e-3, abs=1e-6)
    text = body.text_content()
    assert f"sum of the {len(np.array(e['products']).ravel())} products" in text
    assert "bias" in text and "max(x, 0)" in text
    # the patch, kernel and products grids show the API's numbers (to the digits shown)
    patch = page.locator(".grids[data-input-channel='0'] table.grid").first
    cells = patch.locator("td").evaluate_all("tds => tds.map(td => Number(td.title))")
    assert cells == np.array(e["patch"])[..., 0].ravel().tolist()
    # the receptive field outlined on the input picture is the API's
    assert page.get_attribute("#rf-box", "data-rf") == ",".join(map(str, e["receptive_field"]))
    assert page.is_visible("#rf-box")
    page.screenshot(path=str(shots / "explorer.png"), full_page=True)

    # a pooling unit: its window, and the winner marked
    click_unit(page.locator("canvas[data-layer='max_pool2d_2'][data-channel='3']"), 1, 2, 5)
    wait_idle(page)
    assert body.get_attribute("data-layer") == "max_pool2d_2"
    r, c = int(body.get_attribute("data-row")), int(body.get_attribute("data-col"))
    assert (r, c) == (1, 2)
    e = httpx.post(
        server + "api/explain",
        json={"pixels": seen, "invert": "no", "layer": "max_pool2d_2", "row": r, "col": c,
              "channel": 3},
    ).json()  # fmt: skip
    assert float(page.get_attribute("#explain-value", "data-value")) == e["value"]
    assert page.locator("table.grid td.winner").count() == 1
    winner = page.locator("table.grid td.winner").get_attribute("title")
    assert float(winner) == e["conv_value"]


def test_a_bad_file_is_a_clear_message(page, server):
    page.expected_errors = [r"status of 400"]  # Chromium logs the refused upload itself
    page.click("#tab-file")
    page.set_input_files(
        "#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}]
    )
    wait_idle(page)
    assert page.is_visible("#message")
    message = page.text_content("#message")
    assert "notes.txt" in message and "cannot identify image file" in message
    assert httpx.get(server + "api/summary").status_code == 200  # the server lives on
    # a good file afterwards clears the message
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(buf, format="PNG")
    page.set_input_files(
        "#file", files=[{"name": "ok.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
    )
    wait_idle(page)
    assert not page.is_visible("#message")


def test_random_test_image_and_the_model_tables(page, server):
    summary = httpx.get(server + "api/summary").json()
    rows = page.locator("#summary tr[data-layer]")
    assert rows.count() == len(summary["layers"])
    first = rows.nth(0).locator("td").all_text_contents()
    assert first == ["conv2d_1", "Conv2D", "28×28×6", "156", "117,600"]
    assert page.locator("#filters canvas").count() == 6
    assert "shared scale" in page.text_content("#filters-note")
    layers = page.locator("#maps .layer .lshape").all_text_contents()
    assert layers == ["28×28×6", "28×28×6", "14×14×6", "10×10×16", "10×10×16", "5×5×16"]
    if not summary["samples"]["available"]:
        assert page.is_hidden("#tab-sample")
        pytest.skip("no Fashion-MNIST test images on this machine: " + summary["samples"]["reason"])
    page.click("#tab-sample")
    page.click("#sample")
    wait_idle(page)
    info = page.text_content("#sample-info")
    index = int(re.search(r"test image (\d+)", info).group(1))
    sample = httpx.get(server + f"api/sample?index={index}").json()
    assert sample["true_class"] in info
    answer = httpx.post(server + "api/predict", json={"pixels": sample["seen"], "invert": "no"})
    assert_page_matches(page, answer.json())
