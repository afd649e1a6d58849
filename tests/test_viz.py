"""The arrays behind each picture, the figures as PNGs, and the HTML report."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn.explain import explain, feature_maps, layer_outputs
from classic_cnn.viz import arrays, plots, report

PNG = b"\x89PNG\r\n\x1a\n"


def test_filter_grid_tiles_are_the_kernels_under_the_stated_scale(rng):
    kernel = rng.normal(size=(5, 5, 3, 6))
    g = arrays.filter_grid(kernel)
    assert g.colour and g.tiles.shape == (6, 5, 5, 3)
    assert g.vmax == pytest.approx(np.abs(kernel).max()) and g.vmin == -g.vmax
    assert 0 <= g.tiles.min() and g.tiles.max() <= 1
    for k in range(6):
        np.testing.assert_allclose(g.vmin + g.tiles[k] * (g.vmax - g.vmin), kernel[..., k])
    assert "black" in g.scale_text() and f"{g.vmax:+.3g}" in g.scale_text()
    # one grayscale tile per input channel otherwise; a zero weight is mid-grey
    kernel = rng.normal(size=(3, 3, 2, 4))
    kernel[0, 0, 1, 2] = 0
    g = arrays.filter_grid(kernel)
    assert not g.colour and g.tiles.shape == (4, 2, 3, 3)
    for k in range(4):
        for c in range(2):
            np.testing.assert_allclose(g.weights()[k, c], kernel[:, :, c, k])
    assert g.tiles[2, 1, 0, 0] == 0.5
    with pytest.raises(ValueError, match="KH×KW×C_in×C_out"):
        arrays.filter_grid(np.zeros((3, 3)))


def test_map_tiles_are_the_forward_pass_channels(rng):
    model = cc.Sequential(
        [cc.Conv2D(3, 3), cc.ReLU(), cc.MaxPool2D(2), cc.Flatten(), cc.Dense(2)], (9, 9, 1)
    )
    x = rng.normal(size=(1, 9, 9, 1)).astype(np.float32)
    outs = layer_outputs(model, x)
    for i, rec in enumerate(feature_maps(model, x)):
        g = arrays.map_grid(rec["name"], rec["type"], rec["maps"])
        for ch in range(g.tiles.shape[0]):
            np.testing.assert_array_equal(g.tiles[ch], outs[i][0, :, :, ch])
        assert g.vmin <= g.tiles.min() and g.tiles.max() <= g.vmax
        if rec["type"] == "Conv2D":
            assert g.signed and g.vmin == -g.vmax
        else:
            assert not g.signed and g.vmin == 0
    assert arrays.map_grid("c", "ReLU", np.zeros((4, 4, 2))).shape_text == "4×4×2"


def test_mosaic_round_trip(rng):
    tiles = rng.normal(size=(7, 3, 4))
    m = arrays.mosaic(tiles, 3)
    assert m.shape == (3 * 4 - 1, 3 * 5 - 1)
    for i in range(7):
        np.testing.assert_array_equal(arrays.mosaic_tile(m, i, (3, 4), 3), tiles[i])
    assert np.isnan(m[3, 0]) and np.isnan(m[-1, -1])  # gaps and the empty last places
    assert arrays.grid_columns(6) == 6 and arrays.grid_columns(32) == 16
    assert arrays.grid_columns(20) == 10


def test_most_confident_mistakes():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
    labels = np.array([0, 0, 0, 0, 1])
    np.testing.assert_array_equal(arrays.most_confident_mistakes(probs, labels), [3, 1, 4, 2])
    np.testing.assert_array_equal(arrays.most_confident_mistakes(probs, labels, 2), [3, 1])


HISTORY = [
    {"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "train_accuracy": 0.6, "val_accuracy": 0.7},
    {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "train_accuracy": 0.8, "val_accuracy": 0.75},
]


def test_every_figure_renders_to_png(rng):
    model = cc.Sequential([cc.Conv2D(3, 3, padding="same"), cc.ReLU(), cc.Flatten(),
                           cc.Dense(4)], (6, 6, 1))  # fmt: skip
    x = rng.normal(size=(1, 6, 6, 1)).astype(np.float32)
    image = rng.integers(0, 256, (6, 6, 1), dtype=np.uint8)
    grids = [arrays.map_grid(r["name"], r["type"], r["maps"]) for r in feature_maps(model, x)]
    classes = list("abcd")
    figures = [
        plots.plot_filters(arrays.filter_grid(model.layers[0].params["kernel"]), "gray"),
        plots.plot_filters(arrays.filter_grid(rng.normal(size=(3, 3, 3, 5))), "colour"),
        plots.plot_feature_maps(image, grids, np.full(4, 0.25), classes, "t"),
        plots.plot_explain(explain(model, x, "relu_1", (0, 0), 1), image),
        plots.plot_curves(HISTORY),
        plots.plot_confusion(rng.integers(0, 9, (4, 4)), classes),
        plots.plot_misclassified(
            rng.integers(0, 255, (3, 6, 6, 1), dtype=np.uint8),
            [0, 1, 2],
            [1, 2, 3],
            [0.9, 0.8, 0.7],
            classes,
        ),
        plots.plot_misclassified(np.zeros((0, 6, 6, 1), np.uint8), [], [], [], classes),
    ]
    for fig in figures:
        assert plots.to_png(fig, dpi=40).startswith(PNG)
    with pytest.raises(ValueError, match="history is empty"):
        plots.plot_curves([])


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.srcs, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if "href" in a or (tag == "script" and "src" in a):
            self.links.append(a.get("href") or a.get("src"))


def check_report(html: str) -> _Collect:
    """Valid enough HTML, one file: every image a PNG data URI, nothing loaded from outside."""
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    p = _Collect()
    p.feed(html)
    p.close()
    assert p.srcs and not p.links
    for src in p.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    return p


def test_report_sections_and_replacement():
    png = plots.to_png(plots.plot_curves(HISTORY), dpi=30)
    doc = report.render(
        "run <1>",
        [
            report.Section("a", "First", report.paragraph("x < y") + report.png_figure(png, "c")),
            report.Section("b", "Second", report.table([("k", 1.5)], ("name", "value"))),
        ],
    )
    p = check_report(doc)
    assert "run &lt;1&gt;" in doc and "x &lt; y" in doc and p.tags.count("section") == 2
    doc2 = report.replace_section(doc, report.Section("a", "First again", "<p>new</p>"))
    assert (
        "First again" in doc2 and "x &lt; y" not in doc2 and doc2.count("<!-- section:a -->") == 1
    )
    doc3 = report.replace_section(doc2, report.Section("test", "Test", "<p>t</p>"))
    assert doc3.index("section:b") < doc3.index("section:test") < doc3.index(report.END)
    with pytest.raises(ValueError, match="not a classic-cnn report"):
        report.replace_section("<html></html>", report.Section("x", "x", ""))
