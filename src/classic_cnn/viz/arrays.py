"""The arrays behind each picture: NumPy only, no drawing.

Every picture maps numbers to grey levels or colours through one *stated* scale, so a reader
can turn a shade back into a number; the functions here compute those scales and the tiles, and
the tests check that each tile, mapped back, is exactly the kernel or feature map it shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class FilterGrid:
    """A layer's kernels as tiles under one shared, symmetric colour scale.

    ``tiles`` are in [0, 1]: ``tile = (w − vmin) / (vmax − vmin)`` with ``vmin = −vmax`` and
    ``vmax = max |w|`` over the whole layer, so 0.5 (mid-grey) is a zero weight, white the most
    positive and black the most negative. ``colour`` (the input has 3 channels and the picture
    shows kernel k as one RGB tile): ``tiles`` is (C_out, KH, KW, 3). Otherwise one grayscale
    tile per input channel: ``tiles`` is (C_out, C_in, KH, KW).
    """

    tiles: np.ndarray
    vmin: float
    vmax: float
    colour: bool

    def weights(self) -> np.ndarray:
        """The tiles mapped back through the scale: the kernel values they show."""
        return self.vmin + self.tiles * (self.vmax - self.vmin)

    def scale_text(self) -> str:
        return (
            f"shared scale: black {self.vmin:+.3g}, mid-grey 0, white {self.vmax:+.3g} "
            f"(the layer's largest |weight|)"
        )


def filter_grid(kernel: np.ndarray, colour: bool | None = None) -> FilterGrid:
    """Tiles of a conv kernel (KH, KW, C_in, C_out) under a shared symmetric scale.

    ``colour`` defaults to ``C_in == 3`` (a first layer on RGB images).
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"a conv kernel is KH×KW×C_in×C_out. Received: shape {kernel.shape}")
    colour = kernel.shape[2] == 3 if colour is None else colour
    vmax = float(np.abs(kernel).max()) or 1.0
    vmin = -vmax
    scaled = (kernel - vmin) / (vmax - vmin)
    if colour:
        tiles = scaled.transpose(3, 0, 1, 2)  # (C_out, KH, KW, 3)
    else:
        tiles = scaled.transpose(3, 2, 0, 1)  # (C_out, C_in, KH, KW)
    return FilterGrid(np.ascontiguousarray(tiles), vmin, vmax, bool(colour))


@dataclass
class MapGrid:
    """One layer's feature maps as tiles: ``tiles`` (C, H, W) are the maps themselves, drawn
    with one colour scale per layer from ``vmin`` to ``vmax``. ``signed``: the layer has
    negative numbers, and the scale is symmetric around 0 (a diverging colour map: blue
    negative, white 0, red positive); otherwise it runs from 0 (dark) to the largest number
    (bright)."""

    name: str
    type: str
    tiles: np.ndarray
    vmin: float
    vmax: float
    signed: bool = False

    @property
    def shape_text(self) -> str:
        c, h, w = self.tiles.shape
        return f"{h}×{w}×{c}"


def map_grid(name: str, type_: str, maps: np.ndarray) -> MapGrid:
    """Feature maps (H, W, C) of one layer → tiles (C, H, W) with the layer's shared scale."""
    maps = np.asarray(maps)
    tiles = np.ascontiguousarray(maps.transpose(2, 0, 1))
    lo, hi = float(maps.min()), float(maps.max())
    if lo < 0:
        top = max(-lo, hi)
        return MapGrid(name, type_, tiles, -top, top, signed=True)
    return MapGrid(name, type_, tiles, 0.0, hi if hi > 0 else 1.0)


def mosaic(tiles: np.ndarray, cols: int, gap: int = 1) -> np.ndarray:
    """Tiles (N, h, w[, 3]) laid out in rows of ``cols``, separated by ``gap`` NaN pixels
    (drawn as background), as one array; the tile n sits at row n // cols, column n % cols."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    extra = tiles.shape[3:]
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *extra), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tiles[i]
    return out


def mosaic_tile(m: np.ndarray, index: int, tile_hw, cols: int, gap: int = 1) -> np.ndarray:
    """Tile ``index`` cut back out of a :func:`mosaic`."""
    h, w = tile_hw
    r, c = divmod(index, cols)
    return m[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w]


def grid_columns(n: int, max_cols: int = 16) -> int:
    """How many tiles per row: all of them up to ``max_cols``, else rows as even as possible."""
    if n <= max_cols:
        return max(n, 1)
    rows = math.ceil(n / max_cols)
    return math.ceil(n / rows)


def most_confident_mistakes(probs: np.ndarray, labels: np.ndarray, k: int = 16) -> np.ndarray:
    """Indices of the (at most ``k``) misclassified images the model was surest about, surest
    first: the wrong prediction's probability, descending."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:k]


def history_columns(history: list[dict]) -> dict[str, np.ndarray]:
    """A run's history (one dict per epoch) as columns: epoch, train/val loss and accuracy."""
    keys = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
    if not history:
        raise ValueError("the history is empty: no epoch was completed")
    return {
        k: np.array([np.nan if r.get(k) is None else r[k] for r in history], dtype=float)
        for k in keys
    }


def display_image(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 1|3) → what imshow takes: (H, W) gray or (H, W, 3)."""
    image = np.asarray(image)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
