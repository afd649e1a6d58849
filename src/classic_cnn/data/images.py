"""Images from files and folders, converted to a model's input (H×W×C uint8, channels-last).

Three steps, each a plain function:

- :func:`read_image` decodes one file with Pillow into H×W×1 (grayscale) or H×W×3 (colour)
  uint8, whatever the file's mode (palette, alpha, CMYK, 16-bit, ...).
- :func:`to_input` converts such an array to the size and channel count a model expects,
  keeping the aspect ratio (the rest is padded with the image's own background colour).
- :func:`load_image_folder` reads a folder of class sub-folders into a :class:`Dataset`,
  skipping (and reporting in ``Dataset.notes``) whatever it cannot use.

This module imports Pillow, so ``classic_cnn.data`` does not import it eagerly: import it as
``from classic_cnn.data.images import load_image_folder`` when images are needed.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dataset import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "border_background",
    "load_image_folder",
    "read_image",
    "to_input",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
"""File name endings :func:`load_image_folder` reads (compared in lower case)."""

_WHITE = 255  # alpha is composited onto white: see read_image
_MAX_LISTED = 5  # how many file names a note lists before "… and N more"

# What Pillow's decoders raise for a file that starts like an image but is damaged.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class ImageError(ValueError):
    """An image file that cannot be read: missing, not an image, damaged or too large.

    ``path`` is the file, ``reason`` what went wrong (short, for lists of skipped files); the
    message is ``"cannot read image <path>: <reason>"``.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# ---------------------------------------------------------------------------------------------
# One file → array


def read_image(path) -> np.ndarray:
    """Decode an image file (JPG, PNG, BMP, GIF, WebP, or anything Pillow reads) to uint8.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    image : np.ndarray, uint8, shape (H, W, 1) for grayscale sources or (H, W, 3) for colour

    Notes
    -----
    How each Pillow mode becomes 1 or 3 channels:

    - ``RGB`` stays RGB (3 channels, even if every pixel happens to be gray); ``L`` stays one
      channel; ``1`` (bilevel) becomes 0/255 in one channel.
    - ``P`` (palette) becomes one channel when every colour it uses is a gray, else RGB.
    - Alpha (``RGBA``, ``LA``, ``PA``, a palette's or PNG's transparent colour) is composited onto
      **white**: ``c·a/255 + 255·(1 − a/255)``. White because the transparent parts of icons,
      logos and cut-out photos are meant as the page behind them, which is usually white.
    - ``CMYK`` (and ``YCbCr``, ``LAB``, ``HSV``) are converted to RGB by Pillow (no ICC colour
      management).
    - 16-bit grayscale (``I;16``, ``I;16B``, ...) is scaled by 255/65535 with rounding, so the
      full 16-bit range maps onto 0–255. 32-bit integer (``I``) and float (``F``) images are
      mapped by their value range: values already in 0–255 are kept, integers in 0–65535 are
      scaled as 16-bit, floats in [0, 1] are multiplied by 255, anything else is stretched
      linearly from its minimum and maximum to 0–255.
    - An animated image (GIF, WebP, APNG) gives its **first frame** only.
    - The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a phone photo
      stands as it was taken.

    Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is kept, and enforced
    strictly: an image with more pixels than the limit is refused with an :class:`ImageError`
    (Pillow by itself only warns up to twice the limit). The limit is never changed here.

    Raises
    ------
    ImageError
        (a ``ValueError``) naming the file and the reason: no such file, not an image file,
        damaged or truncated data, or too many pixels.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now, so damaged data fails here and not later
                im = ImageOps.exif_transpose(im)
        return _to_array(im)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(path, "cannot identify image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's message has the count
        count = f"{found.group(1)} pixels" if found else str(exc)
        raise ImageError(
            path,
            f"too many pixels to decode safely: {count}, over Pillow's decompression-bomb limit "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}",
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageError(path, f"damaged or truncated image data: {exc}") from None


def _to_array(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode → H×W×1 or H×W×3 uint8 (see :func:`read_image`)."""
    mode = im.mode
    if mode in ("RGBa", "La"):  # premultiplied alpha: let Pillow undo the premultiplication
        im = im.convert(mode[0] + "A" if mode == "La" else "RGBA")
        mode = im.mode
    has_transparency = "transparency" in im.info

    if mode == "P" or mode == "PA":
        rgba = np.asarray(im.convert("RGBA"))
        rgb = _composite(rgba[..., :3], rgba[..., 3:])
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., :1])  # a gray palette: one channel
        return rgb
    if mode == "1":
        return np.asarray(im.convert("L"))[..., None]
    if mode == "L":
        if has_transparency:
            la = np.asarray(im.convert("LA"))
            return _composite(la[..., :1], la[..., 1:])
        return np.asarray(im)[..., None]
    if mode == "LA":
        la = np.asarray(im)
        return _composite(la[..., :1], la[..., 1:])
    if mode == "RGB":
        if has_transparency:
            rgba = np.asarray(im.convert("RGBA"))
            return _composite(rgba[..., :3], rgba[..., 3:])
        return np.asarray(im)
    if mode == "RGBA":
        rgba = np.asarray(im)
        return _composite(rgba[..., :3], rgba[..., 3:])
    if mode.startswith("I;16"):
        x = np.asarray(im).astype(np.uint32)  # uint16 in the file's byte order
        return ((x * 255 + 32767) // 65535).astype(np.uint8)[..., None]
    if mode in ("I", "F"):
        return _range_to_uint8(np.asarray(im), mode)[..., None]
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, ...


def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour`` (H×W×C uint8) over white with ``alpha`` (H×W×1 uint8), rounded to uint8."""
    a = alpha.astype(np.uint32)
    out = (colour.astype(np.uint32) * a + _WHITE * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _range_to_uint8(x: np.ndarray, mode: str) -> np.ndarray:
    """32-bit integer or float pixels → uint8 by their value range (see :func:`read_image`)."""
    x = np.nan_to_num(x.astype(np.float64))
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo >= 0 and hi <= 255 and (mode == "I" or hi > 1):
        y = x
    elif mode == "I" and lo >= 0 and hi <= 65535:
        y = x * (255 / 65535)
    elif mode == "F" and lo >= 0 and hi <= 1:
        y = x * 255
    else:
        y = (x - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Array → model input


def _border_pixels(images: np.ndarray) -> np.ndarray:
    """The outermost pixels of each image: (..., H, W, C) → (..., K, C), each pixel once."""
    h, w = images.shape[-3], images.shape[-2]
    if h <= 2 or w <= 2:  # every pixel is on the border
        return images.reshape(*images.shape[:-3], h * w, images.shape[-1])
    return np.concatenate(
        [
            images[..., 0, :, :],
            images[..., -1, :, :],
            images[..., 1:-1, 0, :],
            images[..., 1:-1, -1, :],
        ],
        axis=-2,
    )


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of (..., 3) uint8 → (...) uint8, bit for bit as Pillow's ``convert("L")``.

    L = 0.299·R + 0.587·G + 0.114·B, in Pillow's 16-bit fixed point (19595, 38470, 7471 / 2¹⁶,
    rounded).
    """
    x = rgb.astype(np.uint32)
    luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(
            "image must be a uint8 array of shape H×W×1 or H×W×3 (or H×W). "
            f"Received: shape {image.shape}, dtype {image.dtype}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have at least one pixel. Received: shape {image.shape}")
    return image


def border_background(image) -> str:
    """``"dark"`` or ``"light"``: the polarity of an image, judged from its border.

    The median luma of the outermost pixels (top and bottom rows, left and right columns) is
    compared with the middle of the range: ``"light"`` if it is 128 or more, else ``"dark"``.
    MNIST-like images (light strokes on black) are ``"dark"``, most photos and scans of
    writing on paper ``"light"``.

    Parameters
    ----------
    image : np.ndarray, uint8, shape (H, W, C) with C in {1, 3}, or (H, W)
    """
    border = _border_pixels(_check_image(image))
    gray = _luma(border) if border.shape[-1] == 3 else border[..., 0]
    return "light" if np.median(gray) >= 128 else "dark"


def _size_pair(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in pair):
        raise ValueError(f"size must be (height, width) of positive ints. Received: size={size!r}")
    return int(pair[0]), int(pair[1])


def _check_channels(channels) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB). Received: {channels!r}")
    return int(channels)


def to_input(image, size, channels: int, invert: bool = False) -> np.ndarray:
    """Convert an image to a model's input: ``size`` = (H, W), ``channels`` = 1 or 3.

    1. **Colour.** RGB → grayscale by ITU-R 601 luma L = 0.299·R + 0.587·G + 0.114·B, computed
       bit for bit as Pillow's ``convert("L")``; grayscale → RGB by repeating the channel.
    2. **Size, keeping the aspect ratio.** The image is scaled by one factor so that its longer
       side (relative to the target) fits exactly; a tall photo is *not* stretched. Downscaling
       uses Pillow's ``BOX`` filter (each output pixel is the area-weighted mean of the source
       pixels it covers: thin strokes keep their weight, and there is no ringing or overshoot
       around sharp edges as Lanczos gives, which matters for stroke images like MNIST);
       upscaling uses ``BILINEAR`` (smooth, again without overshoot).
    3. **Padding.** The rest of the target is filled with the image's background colour,
       estimated as the median of its outermost pixels (per channel, before resizing), split
       symmetrically; an odd leftover row or column goes to the bottom or right (as Keras's
       'same' padding does).
    4. **Polarity.** ``invert=True`` returns 255 − x (padding included), e.g. to feed a dark-on-
       light photo to a model trained on light-on-dark data such as MNIST.

    Parameters
    ----------
    image : np.ndarray, uint8, shape (h, w, C) with C in {1, 3}, or (h, w)
    size : (int, int) or int
        Target (H, W); an int means square.
    channels : int
        1 or 3.
    invert : bool

    Returns
    -------
    x : np.ndarray, uint8, shape (H, W, channels); always a new array.
    """
    image = _check_image(image)
    height, width = _size_pair(size)
    channels = _check_channels(channels)
    if image.shape[-1] == 3 and channels == 1:
        image = _luma(image)[..., None]

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        out = image.copy()
    else:
        background = np.rint(np.median(_border_pixels(image), axis=0)).astype(np.uint8)
        scale = min(height / h, width / w)
        new_h = min(height, max(1, round(h * scale)))
        new_w = min(width, max(1, round(w * scale)))
        out = np.empty((height, width, image.shape[-1]), np.uint8)
        out[...] = background
        top, left = (height - new_h) // 2, (width - new_w) // 2
        out[top : top + new_h, left : left + new_w] = _resize(image, new_h, new_w)

    if out.shape[-1] == 1 and channels == 3:
        out = np.repeat(out, 3, axis=-1)
    if invert:
        np.subtract(255, out, out=out)
    return out


def _resize(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Resize H×W×C uint8 with Pillow: BOX when shrinking, BILINEAR when enlarging."""
    h, w = image.shape[:2]
    if (new_h, new_w) == (h, w):
        return image
    shrinking = new_h * new_w < h * w
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    source = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(source.resize((new_w, new_h), resample))
    return resized[..., None] if resized.ndim == 2 else resized


# ---------------------------------------------------------------------------------------------
# Folder of class sub-folders → Dataset


def _listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … and {len(items) - limit} more" if len(items) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def load_image_folder(root, size=None, channels: int | None = None, classes=None) -> Dataset:
    """Read a folder laid out as ``root/<class name>/<image files>`` into a :class:`Dataset`.

    Parameters
    ----------
    root : str or os.PathLike
        The folder. Each non-hidden sub-folder is a class; the class names are the sorted
        sub-folder names, unless ``classes`` is given.
    size : (int, int) or int, optional
        (H, W) of every image in the result. None: the most common size among the images.
    channels : int, optional
        1 or 3. None: the most common channel count among the images.
    classes : sequence of str, optional
        The class names in label order; the sub-folders must be exactly these.

    Returns
    -------
    Dataset
        ``images`` N×H×W×C uint8 (in class order, then file-name order), ``labels`` (N,),
        ``classes``, ``name`` the folder's name, ``source`` ``str(root)``, ``background`` the
        majority of :func:`border_background` over the images (``"light"`` on a tie), and
        ``notes``: one human-readable line per kind of problem met.

    Notes
    -----
    Nothing in the folder stops a run midway; what cannot be used is skipped and reported in
    ``notes``: files whose names do not end in a known image extension (listed), unreadable or
    damaged images (listed with the reason), class folders without images (by name), nested
    folders inside a class folder (not searched), and how many images were converted because
    their size or channel count differed. Hidden files and folders (names starting with '.',
    such as ``.DS_Store``) are ignored silently. Images of another size are converted with
    :func:`to_input` (aspect ratio kept, padded with their border colour).

    Raises
    ------
    ValueError
        If ``root`` is not a folder, has no class sub-folders, its sub-folders do not match
        ``classes``, or no image in it can be read.
    """
    root_path = Path(root)
    expected = f"expected {root_path}{os.sep}<class name>{os.sep}<image files>"
    if not root_path.is_dir():
        what = "is not a folder" if root_path.exists() else "does not exist"
        raise ValueError(f"image folder {root_path} {what}; {expected}")
    if size is not None:
        size = _size_pair(size)
    if channels is not None:
        channels = _check_channels(channels)

    folders = sorted(
        p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not folders:
        raise ValueError(f"image folder {root_path} has no class sub-folders; {expected}")
    if classes is None:
        classes = folders
    else:
        classes = [str(c) for c in classes]
        missing = [c for c in classes if c not in folders]
        unexpected = [f for f in folders if f not in classes]
        if missing or unexpected or len(set(classes)) != len(classes):
            raise ValueError(
                f"the class sub-folders of {root_path} do not match the given classes "
                f"{classes}: missing {missing}, unexpected {unexpected}"
                + ("; the classes repeat a name" if len(set(classes)) != len(classes) else "")
            )

    images: list[np.ndarray] = []
    labels: list[int] = []
    not_images: list[str] = []
    unreadable: list[str] = []
    nested: list[str] = []
    empty: list[str] = []
    all_unreadable: list[str] = []
    n_converted = 0
    for label, name in enumerate(classes):
        n_found = n_read = 0
        for entry in sorted(os.scandir(root_path / name), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            relative = f"{name}/{entry.name}"
            if entry.is_dir():
                nested.append(relative + "/")
                continue
            if Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                not_images.append(relative)
                continue
            n_found += 1
            try:
                image = read_image(entry.path)
            except ImageError as exc:
                unreadable.append(f"{relative} ({exc.reason})")
                continue
            if size is not None and channels is not None and image.shape != (*size, channels):
                image = to_input(image, size, channels)  # convert now: keeps memory low
                n_converted += 1
            images.append(image)
            labels.append(label)
            n_read += 1
        if n_found == 0:
            empty.append(name)
        elif n_read == 0:
            all_unreadable.append(name)

    notes: list[str] = []
    if unreadable:
        notes.append(
            f"skipped {_plural(len(unreadable), 'unreadable file')}: " + _listing(unreadable)
        )
    if not_images:
        notes.append(
            f"ignored {_plural(len(not_images), 'file')} without an image extension "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}): " + _listing(not_images)
        )
    if nested:
        notes.append(
            f"ignored {_plural(len(nested), 'folder')} nested in class folders (not searched): "
            + _listing(nested)
        )
    notes += [f"class folder '{name}' has no images" for name in empty]
    notes += [f"class folder '{name}' has no readable images" for name in all_unreadable]

    if not images:
        details = ("; " + "; ".join(notes)) if notes else ""
        raise ValueError(f"no readable images in {root_path}; {expected}{details}")

    if size is None or channels is None:
        shapes = Counter(image.shape for image in images)
        if size is None:
            sizes: Counter = Counter()
            for shape, count in shapes.items():
                sizes[shape[:2]] += count
            size = sizes.most_common(1)[0][0]
        if channels is None:
            counts: Counter = Counter()
            for shape, count in shapes.items():
                counts[shape[2]] += count
            channels = counts.most_common(1)[0][0]
    target = (*size, channels)
    n_converted += sum(image.shape != target for image in images)
    if n_converted:
        notes.append(
            f"converted {_plural(n_converted, 'image')} of another size or channel count to "
            f"{size[0]}×{size[1]}×{channels} (aspect ratio kept, padded with the border colour)"
        )
    stacked = np.stack(
        [image if image.shape == target else to_input(image, size, channels) for image in images]
    )
    del images

    # border_background over all images at once: the median border luma of each image
    border = _border_pixels(stacked)
    gray = _luma(border) if channels == 3 else border[..., 0]
    n_light = int((np.median(gray, axis=-1) >= 128).sum())
    background = "light" if 2 * n_light >= len(stacked) else "dark"

    return Dataset(
        stacked,
        np.asarray(labels, np.int64),
        list(classes),
        name=root_path.resolve().name,
        source=str(root),
        background=background,
        notes=notes,
    )
