"""Figures drawn with matplotlib from the arrays of :mod:`classic_cnn.viz.arrays`.

Each function takes arrays (or a plain record such as an
:class:`~classic_cnn.explain.Explanation`) and returns a ``matplotlib.figure.Figure``; none of
them touches a model or pyplot's global state (figures are made with ``Figure()`` and rendered
by the Agg canvas), so they are safe to call from anywhere and leave nothing open.
"""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .arrays import (
    FilterGrid,
    MapGrid,
    display_image,
    grid_columns,
    history_columns,
    mosaic,
)

DPI = 100


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_png(fig: Figure, path, dpi: int = DPI) -> Path:
    """Write the figure as a PNG file (atomically; folders created)."""
    from ..io import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, to_png(fig, dpi))
    return path


def _cmap(name: str, bad: str = "white"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _tile_ticks(ax, n_cols, n_rows, h, w, gap, xlabel, ylabel, col_labels=None, row_labels=None):
    xs = [c * (w + gap) + (w - 1) / 2 for c in range(n_cols)]
    ys = [r * (h + gap) + (h - 1) / 2 for r in range(n_rows)]
    step = 1 if n_cols <= 16 else 2
    ax.set_xticks(xs[::step], (col_labels or [str(i) for i in range(n_cols)])[::step], fontsize=7)
    ax.set_yticks(ys, row_labels or [str(i) for i in range(n_rows)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def plot_filters(grid: FilterGrid, title: str) -> Figure:
    """A layer's kernels: one RGB tile per kernel (colour), or a matrix of grayscale tiles with
    a column per kernel and a row per input channel, under the grid's shared scale."""
    gap = 1
    if grid.colour:
        n, kh, kw, _ = grid.tiles.shape
        cols = grid_columns(n, 16)
        m = mosaic(grid.tiles, cols, gap)
        m = np.where(np.isnan(m), 1.0, m)  # white between the tiles
        rows = -(-n // cols)
        fig = Figure(figsize=(min(1.0 + 0.7 * cols, 12), 0.9 + 0.75 * rows))
        ax = fig.add_subplot()
        ax.imshow(m, interpolation="nearest")
        _tile_ticks(ax, cols, rows, kh, kw, gap, "filter (row-major)", "row")
        ax.set_yticks([])
        ax.set_xticks(
            [c * (kw + gap) + (kw - 1) / 2 for c in range(cols)],
            [str(i) for i in range(cols)],
            fontsize=7,
        )
        ax.set_xlabel(f"filter k = row·{cols} + column", fontsize=8)
        ax.set_title(f"{title}\nRGB kernels, {grid.scale_text()}", fontsize=9)
        return fig
    n, cin, kh, kw = grid.tiles.shape
    # rows: input channels, columns: kernels
    values = grid.weights().transpose(1, 0, 2, 3).reshape(cin * n, kh, kw)
    m = mosaic(values, n, gap)
    fig = Figure(figsize=(min(max(7.5, 1.6 + 0.6 * n), 14), min(max(3.2, 2.2 + 0.6 * cin), 14)))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap=_cmap("gray"), vmin=grid.vmin, vmax=grid.vmax, interpolation="nearest")
    _tile_ticks(ax, n, cin, kh, kw, gap, "filter (output channel)", "input channel")
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, shrink=0.7)
    cb.set_label("weight", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax.set_title(f"{title}\n{grid.scale_text()}", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------


def plot_feature_maps(
    image: np.ndarray,
    grids: list[MapGrid],
    probs: np.ndarray | None = None,
    classes: list[str] | None = None,
    title: str = "",
    max_cols: int = 16,
) -> Figure:
    """The input, then each layer's feature maps as a labelled grid (name, type, H×W×C and
    its colour scale), then the softmax probabilities as a bar chart with class names."""
    gap = 1
    mosaics = []
    for g in grids:
        c, h, w = g.tiles.shape
        cols = grid_columns(c, max_cols)
        mosaics.append((mosaic(g.tiles, cols, gap), cols, h, w))
    width = 10.0
    heights = [1.6] + [
        max(0.8, width * 0.85 * m.shape[0] / m.shape[1] * min(1.0, cols / max_cols) + 0.45)
        for m, cols, _, _ in mosaics
    ]
    if probs is not None:
        heights.append(2.4)
    fig = Figure(figsize=(width, sum(heights) + 0.6))
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.55)
    ax = fig.add_subplot(gs[0])
    ax.imshow(display_image(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(
        (f"{title}\n" if title else "") + f"input {'×'.join(map(str, image.shape))}", fontsize=9
    )
    ax.set_xticks([])
    ax.set_yticks([])
    for i, (g, (m, cols, h, w)) in enumerate(zip(grids, mosaics, strict=True)):
        ax = fig.add_subplot(gs[i + 1])
        cmap = _cmap("RdBu_r" if g.signed else "viridis")
        ax.imshow(m, cmap=cmap, vmin=g.vmin, vmax=g.vmax, interpolation="nearest")
        scale = (
            f"blue {g.vmin:.3g} · white 0 · red {g.vmax:+.3g}"
            if g.signed
            else f"dark 0 · bright {g.vmax:.3g}"
        )
        ax.set_title(f"{g.name} ({g.type}) — {g.shape_text};  {scale}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if len(g.tiles) > 1:
            for k in range(len(g.tiles)):
                r, c = divmod(k, cols)
                ax.text(
                    c * (w + gap),
                    r * (h + gap),
                    str(k),
                    fontsize=6,
                    color="black",
                    va="top",
                    ha="left",
                    bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.7},
                )
    if probs is not None:
        ax = fig.add_subplot(gs[-1])
        _prob_bars(ax, probs, classes)
    return fig


def _prob_bars(ax, probs, classes):
    probs = np.asarray(probs, dtype=float)
    names = classes or [str(i) for i in range(len(probs))]
    best = int(probs.argmax())
    colours = ["tab:orange" if i == best else "tab:blue" for i in range(len(probs))]
    ax.bar(range(len(probs)), probs, color=colours)
    ax.set_xticks(range(len(probs)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("probability", fontsize=8)
    for i, p in enumerate(probs):
        ax.text(i, p + 0.02, f"{p:.2f}", ha="center", fontsize=7)
    ax.set_title(f"softmax output: {names[best]} ({probs[best]:.2f})", fontsize=9)


# --------------------------------------------------------------------------------------------
# The arithmetic of one number
# --------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    """A number short enough for a cell: whole numbers as such, others to 2 significant
    digits."""
    if abs(v - round(v)) < 1e-9 and abs(v) < 1e5:
        return str(int(np.rint(v)))
    return f"{v:.2g}"


def _grid_panel(
    ax, values, title, cmap, vmin, vmax, padded=None, mark=None, numbers=True, fontsize=6
):
    ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    h, w = values.shape
    if numbers and h * w <= 64:
        for i in range(h):
            for j in range(w):
                ax.text(j, i, _num(values[i, j]), ha="center", va="center", fontsize=fontsize)
    if padded is not None:
        for i, j in zip(*np.nonzero(padded), strict=True):
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", ec="0.6", lw=0)
            )
    if mark is not None:
        ax.add_patch(
            Rectangle((mark[1] - 0.5, mark[0] - 0.5), 1, 1, fill=False, ec="tab:red", lw=2)
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def plot_explain(e, image: np.ndarray, max_channels: int = 3) -> Figure:
    """One number taken apart (an :class:`~classic_cnn.explain.Explanation`): the input image
    with the unit's receptive field, then for a convolution the patch × kernel = product of the
    input channels that contribute most, and the sum, bias and each following step; for
    pooling the window with the winner outlined."""
    if e.kind == "conv":
        contrib = np.abs(e.products).sum(axis=(0, 1))
        order = np.argsort(-contrib, kind="stable")[:max_channels]
        shown = sorted(int(ch) for ch in order if contrib[ch] > 0) or [int(order[0])]
    else:
        shown = [None]
    n_rows = len(shown)
    n_text = 2 + len(e.steps) + (1 if e.kind == "conv" and e.padded.any() else 0)
    text_h = 0.2 * n_text + 0.2
    fig = Figure(figsize=(10, 2.3 * n_rows + text_h + 0.6))
    gs = fig.add_gridspec(
        n_rows + 1, 4, height_ratios=[*([2.3] * n_rows), text_h], wspace=0.25, hspace=0.3
    )
    ax = fig.add_subplot(gs[:n_rows, 0])
    shown_image = display_image(image)
    ax.imshow(shown_image, cmap="gray", vmin=0, vmax=max(1, shown_image.max()))
    t, left, b, right = e.receptive_field
    ax.add_patch(
        Rectangle((left - 0.5, t - 0.5), right - left, b - t, fill=False, ec="tab:red", lw=2)
    )
    ax.set_title(f"input: receptive field\nrows {t}..{b - 1}, cols {left}..{right - 1}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if e.kind == "conv":
        pmax = float(np.abs(e.patch).max()) or 1.0
        kmax = float(np.abs(e.kernel).max()) or 1.0
        qmax = float(np.abs(e.products).max()) or 1.0
        for row, ch in enumerate(shown):
            source = "input" if e.input_name.startswith("the input") else e.input_name
            where = f"{source} ch {ch}"
            _grid_panel(
                fig.add_subplot(gs[row, 1]),
                e.patch[..., ch],
                f"patch ({where})",
                "RdBu_r",
                -pmax,
                pmax,
                padded=e.padded,
            )
            _grid_panel(
                fig.add_subplot(gs[row, 2]),
                e.kernel[..., ch],
                f"× kernel {e.channel}, ch {ch}",
                "RdBu_r",
                -kmax,
                kmax,
            )
            _grid_panel(
                fig.add_subplot(gs[row, 3]),
                e.products[..., ch],
                f"= products (sum {e.products[..., ch].sum():.4g})",
                "RdBu_r",
                -qmax,
                qmax,
            )
        lines = [
            f"sum of all {e.products.size} products ({e.patch.shape[2]} input channels"
            + (f", {len(shown)} shown" if len(shown) < e.patch.shape[2] else "")
            + ") = "
            f"{e.total:.5g};  + bias {e.bias:.4g}  =  {e.conv_value:.5g}"
        ]
        if e.padded.any():
            lines.append(f"hatched cells lie in the zero padding ({int(e.padded.sum())} cells)")
    else:
        _grid_panel(
            fig.add_subplot(gs[0, 1:3]),
            e.patch,
            f"{e.input_name}, channel {e.channel}: window rows {e.origin[0]}.."
            f"{e.origin[0] + e.patch.shape[0] - 1}, cols {e.origin[1]}.."
            f"{e.origin[1] + e.patch.shape[1] - 1}",
            "viridis",
            float(e.patch.min()),
            float(e.patch.max()) if e.patch.max() > e.patch.min() else float(e.patch.min()) + 1,
            mark=e.winner,
        )
        what = "max" if e.kind == "max_pool" else "mean"
        lines = [f"{what} of the window = {e.conv_value:.5g}"]
    lines += [f"{s.layer}: {s.formula} = {s.value:.5g}" for s in e.steps]
    lines.append(f"→ {e.layer}[{e.position[0]}, {e.position[1]}, {e.channel}] = {e.value:.5g}")
    ax = fig.add_subplot(gs[n_rows, :])
    ax.axis("off")
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace")
    fig.suptitle(
        f"{e.layer} ({e.layer_type}, {'×'.join(map(str, e.output_shape))}) at row "
        f"{e.position[0]}, col {e.position[1]}, "
        f"{'filter' if e.kind == 'conv' else 'channel'} {e.channel}",
        fontsize=10,
    )
    return fig


# --------------------------------------------------------------------------------------------
# Training and testing
# --------------------------------------------------------------------------------------------


def plot_curves(history: list[dict], title: str = "") -> Figure:
    """Loss and accuracy per epoch, training and validation."""
    h = history_columns(history)
    fig = Figure(figsize=(10, 3.6))
    for i, (key, label) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        scale = 100 if key == "accuracy" else 1
        for split, style in (("train", "o-"), ("val", "s--")):
            ax.plot(h["epoch"], scale * h[f"{split}_{key}"], style, label=f"{split}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label + (" (%)" if key == "accuracy" else ""))
        ax.set_xticks(h["epoch"])
        ax.grid(alpha=0.3)
        ax.legend(["training", "validation"], fontsize=8)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, classes: list[str], title: str = "") -> Figure:
    """The confusion matrix as a heat map: rows true class, columns predicted, each cell's
    count written in it; colour is the fraction of the row (so every class reads alike)."""
    cm = np.asarray(cm)
    n = len(cm)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(1.6 + 0.62 * n, 1.2 + 0.55 * n))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if frac[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(n), classes, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    cb = fig.colorbar(im, ax=ax, fraction=0.04)
    cb.set_label("fraction of the true class", fontsize=8)
    ax.set_title(title or "confusion matrix", fontsize=9)
    return fig


def plot_misclassified(
    images: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    classes: list[str],
    title: str = "",
    cols: int = 8,
) -> Figure:
    """A grid of images with their true and predicted labels and the prediction's
    probability."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.35 * cols, 1.7 * rows + 0.5))
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(display_image(images[i]), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(
            f"true {classes[true[i]]}\npred {classes[predicted[i]]} {confidence[i]:.2f}",
            fontsize=7,
            color="tab:red",
        )
    if n == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center")
    fig.suptitle(title or "most confidently misclassified", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# The article's figures (cnn tour)
# --------------------------------------------------------------------------------------------


def plot_curve_detector(image: np.ndarray, kernel: np.ndarray, fmap: np.ndarray) -> Figure:
    """The article's curve detector: the kernel, the image with the curve at the top left, and
    the 26×26 map that is 6600 where the curve is and 0 where nothing is."""
    fig = Figure(figsize=(10, 3.4))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    _grid_panel(axes[0], kernel, "7×7 curve detector (30 on the curve)", "Greys", 0, 60, fontsize=8)
    axes[1].imshow(image, cmap="gray", vmin=0, vmax=100, interpolation="nearest")
    axes[1].add_patch(Rectangle((-0.5, -0.5), 7, 7, fill=False, ec="tab:red", lw=2))
    axes[1].add_patch(
        Rectangle((image.shape[1] - 7.5, -0.5), 7, 7, fill=False, ec="tab:blue", lw=2)
    )
    axes[1].set_title("32×32 image: red, a curve; blue, nothing", fontsize=8)
    im = axes[2].imshow(fmap, cmap="viridis", interpolation="nearest")
    axes[2].set_title(
        f"26×26 feature map: [0,0] = {fmap[0, 0]:g}, [0,{fmap.shape[1] - 1}] = {fmap[0, -1]:g}",
        fontsize=8,
    )
    fig.colorbar(im, ax=axes[2], fraction=0.045)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_pooling(grid: np.ndarray, results: list[tuple[str, np.ndarray]]) -> Figure:
    """Max pooling of a small grid with several windows and strides."""
    fig = Figure(figsize=(3 + 2.6 * len(results), 3))
    ax = fig.add_subplot(1, len(results) + 1, 1)
    _grid_panel(ax, grid, "input", "Blues", 0, grid.max() * 1.6, fontsize=11)
    for i, (label, y) in enumerate(results):
        ax = fig.add_subplot(1, len(results) + 1, i + 2)
        _grid_panel(ax, y, label, "Oranges", 0, grid.max() * 1.6, fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# Why this class (saliency, Grad-CAM, occlusion: classic_cnn.attribution)
# --------------------------------------------------------------------------------------------

#: how strongly an attribution map covers the image under it
OVERLAY_ALPHA = 0.6
METHOD_TITLES = {
    "gradcam": "Grad-CAM",
    "saliency": "saliency |d score / d pixel|",
    "gradient-x-input": "gradient × input",
    "occlusion": "occlusion",
}


def _why_cmap(attr):
    return _cmap("RdBu_r" if attr.scale[0] < 0 else "inferno")


def why_title(attr) -> str:
    """The method (its layer, or its patch and stride), the class explained and its probability."""
    what = METHOD_TITLES[attr.method]
    if attr.method == "gradcam":
        what += f" of {attr.layer}"
    elif attr.method == "occlusion":
        what += f" ({attr.patch}×{attr.patch} grey patch, stride {attr.stride})"
    chosen = "the top class" if attr.chosen == "top" else "the class asked for"
    return f"{what}: why '{attr.class_name}' ({chosen}, p = {attr.probability:.3f})"


def _overlay(ax, image: np.ndarray, attr, colorbar: bool = True, fontsize: int = 7):
    """The image in gray, the map over it under its stated scale (and a colour bar)."""
    gray = display_image(image)
    if gray.ndim == 3:
        gray = gray.mean(axis=-1)
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    vmin, vmax = attr.scale
    shown = ax.imshow(
        attr.map, cmap=_why_cmap(attr), vmin=vmin, vmax=vmax, alpha=OVERLAY_ALPHA,
        interpolation="nearest",
    )  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        from matplotlib.ticker import FuncFormatter

        bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
        # each tick its own number (8e-05), no shared "1e-5" offset over the panel's title
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        bar.ax.tick_params(labelsize=fontsize)
    return shown


def _scale_words(attr) -> str:
    vmin, vmax = attr.scale
    if vmin < 0:
        return f"blue {vmin:.3g} · white 0 · red {vmax:+.3g}"
    return f"dark 0 · bright {vmax:.3g}"


def plot_why(image: np.ndarray, attr, label: str = "") -> Figure:
    """One image and one attribution (:class:`~classic_cnn.attribution.Attribution`): the input
    as the network sees it, and the map overlaid on it with its colour bar; the title names the
    method, the class and its probability, the caption the colour scale."""
    fig = Figure(figsize=(7.2, 3.9))
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    ax0.imshow(display_image(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax0.set_xticks([])
    ax0.set_yticks([])
    ax0.set_title(label or "the input", fontsize=8)
    _overlay(ax1, image, attr)
    ax1.set_title(
        f"{attr.scale_text()}\n{_scale_words(attr)} (overlaid at {OVERLAY_ALPHA:.0%})", fontsize=7
    )
    fig.suptitle(why_title(attr), fontsize=9)
    return fig


def plot_why_table(images, rows, row_labels, title: str = "") -> Figure:
    """The methods side by side: one row per image (its label on the left), the input, then
    each attribution of that row (``rows[i]``: a list, one per method) overlaid, each under its
    own scale (stated on its colour bar)."""
    n, m = len(images), max(len(r) for r in rows)
    fig = Figure(figsize=(2.25 * (m + 1), 2.35 * n + 0.5))
    axes = np.asarray(fig.subplots(n, m + 1, squeeze=False))
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(display_image(images[i]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(row_labels[i], fontsize=7)
        for j in range(m):
            ax = axes[i, j + 1]
            if j >= len(rows[i]):
                ax.axis("off")
                continue
            a = rows[i][j]
            _overlay(ax, images[i], a, fontsize=6)
            head = METHOD_TITLES[a.method].split(" |")[0]
            ax.set_title(f"{head}\n'{a.class_name}' p={a.probability:.2f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_why_gallery(images, attrs, captions, title: str = "", cols: int = 6) -> Figure:
    """A grid of images, each with its attribution overlaid (each map under its own scale,
    0 dark to its maximum bright) and its caption (e.g. the true and predicted class)."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.75 * cols, 2.0 * rows + 0.5))
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        _overlay(ax, images[i], attrs[i], colorbar=False)
        ax.set_title(captions[i], fontsize=7)
    if n == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no images", ha="center")
    fig.suptitle(title, fontsize=9)
    return fig
