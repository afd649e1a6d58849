"""Images from files and folders: every Pillow mode, aspect-keeping resize, folders with junk.

Every image file is written here with Pillow into ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from classic_cnn.data import Dataset
from classic_cnn.data.images import (
    ImageError,
    border_background,
    load_image_folder,
    read_image,
    to_input,
)


def save(path, image: Image.Image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def gray(value: int, h: int = 8, w: int = 8) -> Image.Image:
    return Image.new("L", (w, h), value)


# ---------------------------------------------------------------------------------------------
# read_image: each mode


def test_rgb_stays_three_channels_with_exact_values(tmp_path, rng):
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = save(tmp_path / "rgb.png", Image.fromarray(pixels))
    image = read_image(path)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, pixels)


def test_rgb_that_happens_to_be_gray_stays_rgb(tmp_path):
    image = read_image(save(tmp_path / "g.png", Image.new("RGB", (4, 3), (90, 90, 90))))
    assert image.shape == (3, 4, 3)


def test_grayscale_gives_one_channel(tmp_path, rng):
    pixels = rng.integers(0, 256, (6, 4), dtype=np.uint8)
    image = read_image(save(tmp_path / "l.png", Image.fromarray(pixels)))
    assert image.shape == (6, 4, 1)
    np.testing.assert_array_equal(image[..., 0], pixels)


def test_bilevel_mode_1_gives_0_and_255(tmp_path):
    im = Image.new("1", (4, 2), 0)
    im.putpixel((1, 0), 1)
    image = read_image(save(tmp_path / "one.png", im))
    expected = np.zeros((2, 4, 1), np.uint8)
    expected[0, 1] = 255
    np.testing.assert_array_equal(image, expected)


def test_colour_palette_gives_rgb(tmp_path):
    im = Image.new("P", (3, 2))
    im.putpalette([255, 0, 0, 0, 128, 255, 10, 20, 30] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 2, 1, 0])
    image = read_image(save(tmp_path / "p.png", im))
    assert image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image[0], [[255, 0, 0], [0, 128, 255], [10, 20, 30]])
    np.testing.assert_array_equal(image[1], [[10, 20, 30], [0, 128, 255], [255, 0, 0]])


def test_gray_palette_gives_one_channel(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([v for g in range(256) for v in (255 - g, 255 - g, 255 - g)])
    im.putdata([0, 100, 255])
    image = read_image(save(tmp_path / "pg.png", im))
    assert image.shape == (1, 3, 1)
    np.testing.assert_array_equal(image[0, :, 0], [255, 155, 0])


def test_palette_transparency_becomes_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.putdata([0, 1])
    image = read_image(save(tmp_path / "pt.png", im, transparency=0))
    np.testing.assert_array_equal(image[0], [[255, 255, 255], [255, 0, 0]])


def test_rgba_is_composited_onto_white(tmp_path):
    pixels = np.array(
        [[[0, 0, 0, 0], [200, 100, 0, 255], [0, 0, 0, 128], [40, 80, 120, 64]]], np.uint8
    )
    image = read_image(save(tmp_path / "rgba.png", Image.fromarray(pixels)))
    assert image.shape == (1, 4, 3)
    a = pixels[..., 3:].astype(np.float64) / 255
    expected = np.rint(pixels[..., :3] * a + 255 * (1 - a))
    np.testing.assert_allclose(image, expected, atol=0.5 + 1e-9)
    np.testing.assert_array_equal(image[0, 0], [255, 255, 255])  # fully transparent: white
    np.testing.assert_array_equal(image[0, 1], [200, 100, 0])  # opaque: unchanged


def test_la_is_composited_onto_white_and_stays_gray(tmp_path):
    pixels = np.array([[[100, 0], [100, 255], [100, 128]]], np.uint8)
    image = read_image(save(tmp_path / "la.png", Image.fromarray(pixels, mode="LA")))
    assert image.shape == (1, 3, 1)
    # 100·128/255 + 255·127/255 = 177.2
    np.testing.assert_array_equal(image[0, :, 0], [255, 100, 177])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    im = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    image = read_image(save(tmp_path / "cmyk.jpg", im, quality=95))
    assert image.shape == (16, 16, 3)
    np.testing.assert_allclose(image.reshape(-1, 3), [[0, 255, 255]] * 256, atol=3)


def test_16_bit_png_is_scaled_to_0_255(tmp_path):
    pixels = np.array([[0, 257, 128 * 257, 65535, 1000]], np.uint16)
    im = Image.fromarray(pixels)
    assert im.mode == "I;16"
    path = save(tmp_path / "sixteen.png", im)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I;16")  # the file really is 16-bit
    image = read_image(path)
    assert image.shape == (1, 5, 1) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, :, 0], [0, 1, 128, 255, 4])  # 1000/257 = 3.9


def test_32_bit_integer_and_float_images(tmp_path):
    wide = np.array([[0, 30000, 65535]], np.int32)  # 16-bit data in a 32-bit container
    image = read_image(save(tmp_path / "i.tif", Image.fromarray(wide)))
    np.testing.assert_array_equal(image[0, :, 0], [0, 117, 255])
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    image = read_image(save(tmp_path / "f.tif", Image.fromarray(unit)))
    np.testing.assert_array_equal(image[0, :, 0], [0, 128, 255])
    stretched = np.array([[-1.0, 0.0, 1.0]], np.float32)
    image = read_image(save(tmp_path / "s.tif", Image.fromarray(stretched)))
    np.testing.assert_array_equal(image[0, :, 0], [0, 128, 255])


def test_one_by_one_image(tmp_path):
    image = read_image(save(tmp_path / "dot.png", Image.new("RGB", (1, 1), (1, 2, 3))))
    assert image.shape == (1, 1, 3)
    np.testing.assert_array_equal(image[0, 0], [1, 2, 3])
    x = to_input(image, (5, 4), 1)
    assert x.shape == (5, 4, 1)
    assert (x == to_input(image, (1, 1), 1)[0, 0]).all()  # padded with its own colour


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [gray(50, 6, 5), gray(200, 6, 5), gray(120, 6, 5)]
    path = save(tmp_path / "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.n_frames == 3
    image = read_image(path)
    assert image.shape == (6, 5, 1)
    assert (image == 50).all()


def test_animated_colour_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = save(tmp_path / "anim.gif", frames[0], save_all=True, append_images=frames[1:])
    image = read_image(path)
    assert image.shape == (4, 4, 3)
    assert (image == [255, 0, 0]).all()


def test_exif_orientation_is_applied(tmp_path, rng):
    pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = save(tmp_path / "turned.png", Image.fromarray(pixels), exif=exif)
    image = read_image(path)
    assert image.shape == (6, 4, 3)
    np.testing.assert_array_equal(image, np.rot90(pixels, k=-1))


# ---------------------------------------------------------------------------------------------
# read_image: errors


def test_missing_file_is_an_image_error(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageError, match=r"nowhere\.png: no such file") as info:
        read_image(path)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path)


def test_non_image_file_is_an_image_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n")
    with pytest.raises(ImageError, match=r"notes.png: cannot identify image file"):
        read_image(path)


def test_folder_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)


def test_truncated_png_is_an_image_error(tmp_path, rng):
    path = save(tmp_path / "full.png", Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)))
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: damaged or truncated image data: .*trunc"):
        read_image(cut)


def _jpeg(path, rng) -> bytes:
    """A real 96×128 colour JPEG (a gradient with noise, so its scan data is not trivial)."""
    h, w = 96, 128
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return save(path, Image.fromarray(pixels), quality=90).read_bytes()


def test_truncated_jpeg_is_an_image_error(tmp_path, rng):
    data = _jpeg(tmp_path / "full.jpg", rng)
    scan = data.index(b"\xff\xda")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert int(len(data) * 0.6) > scan + 100  # the cut is inside the scan data, not the header
    with pytest.raises(
        ImageError, match=r"cut\.jpg: damaged or truncated image data: .*trunc"
    ) as info:
        read_image(cut)
    assert info.value.path == str(cut)


def test_jpeg_with_garbage_scan_data_is_an_error_or_a_whole_image(tmp_path, rng):
    data = bytearray(_jpeg(tmp_path / "full.jpg", rng))
    scan = data.index(b"\xff\xda")
    start = scan + 2 + int.from_bytes(data[scan + 2 : scan + 4], "big")  # after the SOS header
    end = len(data) - 2  # keep the EOI marker
    garbage = np.random.default_rng(1).integers(0, 256, end - start, np.uint8).tobytes()
    data[start:end] = garbage
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(bytes(data))
    try:
        image = read_image(bad)
    except ImageError as exc:  # libjpeg may give up on the data ...
        assert "garbage.jpg: damaged or truncated image data" in str(exc)
        assert exc.path == str(bad)
    else:  # ... or decode it into glitches: then it must still be a whole, valid image
        assert image.dtype == np.uint8 and image.shape == (96, 128, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height 1-bit pixels but holds almost no data (a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_and_the_limit_kept(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and 20000 * 20000 > 2 * limit  # Pillow's own error zone
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 20000))
    assert path.stat().st_size < 200
    with pytest.raises(
        ImageError,
        match=r"bomb\.png: too many pixels to decode safely: 400000000 pixels, over .* = \d+$",
    ):
        read_image(path)
    assert Image.MAX_IMAGE_PIXELS == limit


@pytest.mark.parametrize("side", [40, 50])  # 1600 px: Pillow only warns; 2500 px: Pillow raises
def test_any_image_over_the_limit_is_refused(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = save(tmp_path / "big.png", gray(7, side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Pillow's own default for the 1600-px image: a warning
        with pytest.raises(
            ImageError,
            match=r"too many pixels to decode safely: \d+ pixels, over .*MAX_IMAGE_PIXELS = 1000$",
        ):
            read_image(path)
    assert caught == []  # refused, and no warning leaks out
    assert Image.MAX_IMAGE_PIXELS == 1000
    assert read_image(save(tmp_path / "small.png", gray(7, 30, 30))).shape == (30, 30, 1)


# ---------------------------------------------------------------------------------------------
# to_input


def bar_image() -> np.ndarray:
    """20 rows × 60 columns, black, with a white bar across rows 6–13 (full width)."""
    image = np.zeros((20, 60, 1), np.uint8)
    image[6:14] = 255
    return image


def test_wide_image_is_centred_and_padded_not_stretched():
    x = to_input(bar_image(), (30, 30), 1)
    # scale 1/2 → 10×30 placed at rows 10–19; the bar lands on rows 13–16; rows 0–9 and 20–29
    # are padding (black, the border's median)
    expected = np.zeros((30, 30, 1), np.uint8)
    expected[13:17] = 255
    np.testing.assert_array_equal(x, expected)


def test_tall_image_is_padded_left_and_right():
    x = to_input(bar_image().transpose(1, 0, 2), (30, 30), 1)
    expected = np.zeros((30, 30, 1), np.uint8)
    expected[:, 13:17] = 255
    np.testing.assert_array_equal(x, expected)


def test_padding_takes_the_border_colour():
    image = 255 - bar_image()  # a black bar on white
    image[0, :5] = 0  # a few dark border pixels do not move the median
    x = to_input(image, (30, 30), 1)
    assert (x[:10] == 255).all() and (x[20:] == 255).all()
    assert (x[13:17, 3:] == 0).all()


def test_padding_uses_the_median_border_colour_per_channel():
    image = np.empty((4, 8, 3), np.uint8)
    image[...] = (10, 200, 30)
    image[1:3, 2:6] = (255, 255, 255)
    x = to_input(image, (8, 8), 3)  # scale 1: 4 rows of image, 2 of padding above and below
    assert (x[:2] == (10, 200, 30)).all() and (x[6:] == (10, 200, 30)).all()
    np.testing.assert_array_equal(x[2:6], image)


def test_an_odd_leftover_goes_to_the_bottom():
    image = np.full((11, 30, 1), 9, np.uint8)
    image[1:-1, 1:-1] = 200
    x = to_input(image, (30, 30), 1)  # no resize: 19 rows of padding, 9 above, 10 below
    assert (x[:9] == 9).all() and (x[20:] == 9).all()
    np.testing.assert_array_equal(x[9:20], image)


def test_downscaling_averages_areas():
    image = np.zeros((4, 4, 1), np.uint8)
    image[0, 0] = 200  # one pixel in the top-left 2×2 block
    x = to_input(image, (2, 2), 1)
    np.testing.assert_array_equal(x[..., 0], [[50, 0], [0, 0]])  # BOX: mean of the block


def test_upscaling_fills_the_target():
    image = np.full((2, 3, 3), 77, np.uint8)
    x = to_input(image, (9, 12), 3)  # scale 4 → 8×12, one row of padding
    assert x.shape == (9, 12, 3) and (x == 77).all()


def test_rgb_to_gray_is_itu_601_luma(rng):
    pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    x = to_input(pixels, (7, 9), 1)
    assert x.shape == (7, 9, 1)
    luma = pixels.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(x[..., 0] - luma).max() <= 0.51
    # ... and bit for bit what Pillow gives
    np.testing.assert_array_equal(x[..., 0], np.asarray(Image.fromarray(pixels).convert("L")))
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    np.testing.assert_array_equal(to_input(primaries, (1, 4), 1)[0, :, 0], [76, 150, 29, 255])


def test_gray_to_rgb_repeats(rng):
    pixels = rng.integers(0, 256, (5, 5, 1), dtype=np.uint8)
    x = to_input(pixels, (5, 5), 3)
    assert x.shape == (5, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(x[..., c], pixels[..., 0])
    np.testing.assert_array_equal(to_input(pixels[..., 0], (5, 5), 1), pixels)  # H×W accepted


def test_invert(rng):
    pixels = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    plain = to_input(pixels, (8, 8), 1)
    inverted = to_input(pixels, (8, 8), 1, invert=True)
    np.testing.assert_array_equal(inverted, 255 - plain)
    assert to_input(np.zeros((2, 2, 1), np.uint8), (2, 2), 1, invert=True).max() == 255


def test_to_input_returns_a_new_array():
    image = np.full((3, 3, 1), 5, np.uint8)
    x = to_input(image, (3, 3), 1)
    x[...] = 0
    assert (image == 5).all()


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"size": (0, 4), "channels": 1}, "size=(0, 4)"),
        ({"size": (4,), "channels": 1}, "size=(4,)"),
        ({"size": (4, 4), "channels": 2}, "Received: 2"),
    ],
)
def test_to_input_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        to_input(np.zeros((4, 4, 1), np.uint8), **kwargs)


def test_to_input_rejects_bad_images():
    with pytest.raises(ValueError, match="dtype float64"):
        to_input(np.zeros((4, 4, 1)), (4, 4), 1)
    with pytest.raises(ValueError, match=r"shape \(4, 4, 4\)"):
        to_input(np.zeros((4, 4, 4), np.uint8), (4, 4), 1)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    th=st.integers(1, 30),
    tw=st.integers(1, 30),
    c_in=st.sampled_from([1, 3]),
    c_out=st.sampled_from([1, 3]),
)
def test_to_input_keeps_the_aspect_ratio(h, w, th, tw, c_in, c_out):
    # a white image with a black border one pixel wide where it fits: padding is black
    image = np.full((h, w, c_in), 255, np.uint8)
    if h > 2 and w > 2:
        image[0], image[-1], image[:, 0], image[:, -1] = 0, 0, 0, 0
    x = to_input(image, (th, tw), c_out)
    assert x.shape == (th, tw, c_out) and x.dtype == np.uint8
    scale = min(th / h, tw / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    assert new_h == th or new_w == tw  # the limiting side fits exactly
    top, left = (th - new_h) // 2, (tw - new_w) // 2
    background = 0 if (h > 2 and w > 2) else 255
    outside = np.ones((th, tw), bool)
    outside[top : top + new_h, left : left + new_w] = False
    assert (x[outside] == background).all()


# ---------------------------------------------------------------------------------------------
# border_background


def test_border_background_dark_and_light():
    digit = np.zeros((28, 28, 1), np.uint8)
    digit[5:23, 12:16] = 255
    assert border_background(digit) == "dark"
    assert border_background(255 - digit) == "light"
    photo = np.full((10, 12, 3), (230, 220, 200), np.uint8)
    photo[3:7, 3:9] = (20, 30, 40)
    assert border_background(photo) == "light"
    assert border_background(255 - photo) == "dark"


def test_border_background_goes_by_the_median_not_the_mean():
    image = np.zeros((10, 10), np.uint8)  # H×W accepted
    image[0, :4] = 255  # a few bright border pixels: the mean rises, the median stays 0
    image[2:8, 2:8] = 255  # the middle is not the border
    assert border_background(image) == "dark"


# ---------------------------------------------------------------------------------------------
# load_image_folder


def messy_folder(root, rng):
    """birds/ (empty), cats/ and dogs/ with good images, junk, hidden files and damaged files."""
    save(root / "cats" / "a.png", gray(10))
    save(root / "cats" / "b.PNG", gray(20))  # upper-case extension counts
    save(root / "cats" / ".hidden.png", gray(99))  # hidden: ignored even though readable
    (root / "cats" / "bad.jpg").write_bytes(rng.integers(0, 256, 500, np.uint8).tobytes())
    (root / "cats" / "notes.txt").write_text("good cats\n")
    save(root / "dogs" / "c.png", gray(30))
    save(root / "dogs" / "d.bmp", gray(40))
    full = save(
        root / "dogs" / "full.png", Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8))
    )
    data = full.read_bytes()
    full.unlink()
    (root / "dogs" / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "dogs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    (root / "birds").mkdir()
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    save(root / ".thumbnails" / "x.png", gray(5))  # a hidden folder is not a class
    return root


def test_messy_folder_loads_the_good_images_and_reports_the_rest(tmp_path, rng):
    root = messy_folder(tmp_path / "pets", rng)
    ds = load_image_folder(root)
    assert isinstance(ds, Dataset)
    assert ds.classes == ["birds", "cats", "dogs"]
    assert ds.images.shape == (4, 8, 8, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [10, 20, 30, 40])
    np.testing.assert_array_equal(ds.labels, [1, 1, 2, 2])
    assert ds.name == "pets" and ds.source == str(root) and ds.background == "dark"

    notes = "\n".join(ds.notes)
    assert any(
        n.startswith("skipped 2 unreadable files: cats/bad.jpg (cannot identify image file)")
        for n in ds.notes
    ), notes
    assert "dogs/cut.png (damaged or truncated image data" in notes
    assert "ignored 1 file without an image extension" in notes and "cats/notes.txt" in notes
    assert "class folder 'birds' has no images" in ds.notes
    assert "DS_Store" not in notes and "hidden" not in notes and "thumbnails" not in notes
    assert len(ds.notes) == 3


def test_classes_argument_sets_the_label_order(tmp_path, rng):
    root = messy_folder(tmp_path / "pets", rng)
    ds = load_image_folder(root, classes=["dogs", "cats", "birds"])
    assert ds.classes == ["dogs", "cats", "birds"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])  # images in class order
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [30, 40, 10, 20])
    with pytest.raises(ValueError, match=r"missing \['fish'\], unexpected \['birds'\]"):
        load_image_folder(root, classes=["cats", "dogs", "fish"])


def test_mixed_sizes_use_the_most_common_size_and_channels(tmp_path):
    root = tmp_path / "shapes"
    for i in range(3):
        save(root / "a" / f"{i}.png", gray(200, 8, 8))
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[2:6] = 255
    save(root / "b" / "wide.png", Image.fromarray(wide))
    ds = load_image_folder(root)
    assert ds.images.shape == (4, 8, 8, 1)
    expected = np.zeros((8, 8), np.uint8)  # 8×16 → 4×8 at rows 2–5, the bar on rows 3–4
    expected[3:5] = 255
    np.testing.assert_array_equal(ds.images[3, ..., 0], expected)
    assert any(n.startswith("converted 1 image of another size") for n in ds.notes), ds.notes
    assert ds.background == "light"  # three light images against one dark

    fixed = load_image_folder(root, size=(12, 10), channels=3)
    assert fixed.images.shape == (4, 12, 10, 3)
    assert any(n.startswith("converted 4 images") for n in fixed.notes), fixed.notes


def test_folder_without_class_sub_folders_is_refused(tmp_path):
    root = tmp_path / "flat"
    save(root / "a.png", gray(1))
    with pytest.raises(ValueError, match=r"flat has no class sub-folders.*<class name>"):
        load_image_folder(root)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere does not exist.*<class name>"):
        load_image_folder(tmp_path / "nowhere")
    path = save(tmp_path / "a.png", gray(1))
    with pytest.raises(ValueError, match="is not a folder"):
        load_image_folder(path)


def test_folder_without_readable_images_is_refused(tmp_path):
    root = tmp_path / "junk"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"not a jpeg")
    (root / "b").mkdir()
    with pytest.raises(ValueError, match=r"no readable images in .*junk.*a/x.jpg") as info:
        load_image_folder(root)
    assert "class folder 'b' has no images" in str(info.value)


def test_many_small_images_load(tmp_path):
    root = tmp_path / "many"
    for c in range(3):
        for i in range(100):
            save(root / f"c{c}" / f"{i:03}.png", gray(c * 100 + 5, 12, 12))
    ds = load_image_folder(root, size=(12, 12), channels=1)
    assert ds.images.shape == (300, 12, 12, 1) and ds.notes == []
    np.testing.assert_array_equal(np.bincount(ds.labels), [100, 100, 100])
    np.testing.assert_array_equal(ds.images[::100, 0, 0, 0], [5, 105, 205])


def test_importing_the_data_package_does_not_import_pillow():
    code = "import sys, classic_cnn.data; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
