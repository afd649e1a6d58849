"""The explorer's "why this class?" toggle in a real browser (Playwright driving Debian's
Chromium against a real ``cnn serve``): the overlay appears over the input, its pixels are the
colours of the API's map for the same pixels, and the method and class pickers change it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from . import test_serve_browser as sb

browser, server, page, shots = sb.browser, sb.server, sb.page, sb.shots
httpx, wait_idle = sb.httpx, sb.wait_idle

INFERNO = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]
DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]]


def ramp(stops, t):
    """The page's colour ramp (app.js), written again: linear between evenly spaced stops."""
    t = min(1.0, max(0.0, t))
    x = t * (len(stops) - 1)
    i = min(len(stops) - 2, math.floor(x))
    f = x - i
    return [c + (n - c) * f for c, n in zip(stops[i], stops[i + 1], strict=True)]


def expected_colours(answer) -> np.ndarray:
    m, lo, hi = np.array(answer["map"]), answer["vmin"], answer["vmax"]
    out = np.empty((*m.shape, 3))
    for (r, c), v in np.ndenumerate(m):
        out[r, c] = (
            ramp(DIVERGING, (v - lo) / (hi - lo)) if lo < 0 else ramp(INFERNO, v / hi if hi else 0)
        )
    return out


def shown_overlay(pg) -> np.ndarray:
    h, w, rgba = pg.evaluate(
        """() => { const c = document.querySelector('#why-overlay');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
                   return [c.height, c.width, Array.from(d.data)]; }"""
    )
    return np.array(rgba, np.uint8).reshape(h, w, 4)


def check_overlay(pg, server, body) -> dict:
    seen = pg.evaluate("() => window.explorer.state.seen")
    answer = httpx.post(server + "api/why", json={"pixels": seen, "invert": "no", **body}).json()
    shown = shown_overlay(pg)
    assert shown.shape[:2] == np.array(answer["map"]).shape == (28, 28)
    assert (shown[..., 3] == 255).all()  # drawn opaque; the element is shown at 60%
    # every pixel is the colour of the API's number there (to the rounding of one step)
    assert np.abs(shown[..., :3] - expected_colours(answer)).max() <= 1
    note = pg.locator("#why-note")
    assert note.get_attribute("data-method") == answer["method"]
    assert note.get_attribute("data-class") == answer["class_name"]
    assert float(note.get_attribute("data-p")) == answer["probability"]
    assert f"p = {answer['probability']:.3f}" in note.text_content()
    return answer


def test_the_why_toggle_overlays_the_apis_map(page, server, shots):
    assert not page.is_visible("#why-overlay")
    page.check("#why-on")
    wait_idle(page)
    assert page.is_visible("#why-overlay")
    # the overlay lies exactly over the input picture
    a, b = page.locator("#why-overlay").bounding_box(), page.locator("#seen").bounding_box()
    assert [a[k] for k in "xy"] == pytest.approx([b[k] for k in "xy"], abs=0.5)
    assert (a["width"], a["height"]) == pytest.approx((b["width"], b["height"]), abs=0.5)
    cam = check_overlay(page, server, {"method": "gradcam"})
    assert cam["layer"] == "relu_2" and cam["chosen"] == "top"
    assert "Grad-CAM of relu_2" in page.text_content("#why-note")
    page.screenshot(path=str(shots / "explorer-why.png"), full_page=True)

    # another method and a named class
    page.select_option("#why-method", "occlusion")
    wait_idle(page)
    check_overlay(page, server, {"method": "occlusion"})
    classes = page.evaluate("() => window.explorer.state.summary.classes")
    page.select_option("#why-class", classes[3])
    wait_idle(page)
    occ = check_overlay(page, server, {"method": "occlusion", "class_name": classes[3]})
    assert occ["chosen"] == "given" and occ["class_name"] == classes[3]
    page.select_option("#why-method", "gradient-x-input")
    wait_idle(page)
    gx = check_overlay(page, server, {"method": "gradient-x-input", "class_name": classes[3]})
    assert gx["vmin"] < 0  # signed: the diverging scale

    # a new input updates it live; switching off hides it
    if page.is_visible("#tab-sample"):
        page.click("#sample")
        wait_idle(page)
        check_overlay(page, server, {"method": "gradient-x-input", "class_name": classes[3]})
    page.uncheck("#why-on")
    wait_idle(page)
    assert not page.is_visible("#why-overlay") and not page.is_visible("#why-note")
