"""Inject each fault and bad input of the "never lose work, never trust input" promise and
print what classic-cnn did, as a Markdown table (the tests in tests/ hold each row; this script
shows the actual messages a person sees).

    .venv/bin/python scripts/fault_table.py
"""

from __future__ import annotations

import gzip
import io as pyio
import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import classic_cnn as cc
from classic_cnn import io, presets
from classic_cnn.data import images as im
from classic_cnn.data.idx import read_idx, write_idx

ROWS: list[tuple[str, str]] = []


def row(fault: str, action):
    try:
        result = action()
        what = f"accepted: {result}"
    except Exception as exc:  # the table shows whatever happened, including the type
        what = f"{type(exc).__name__}: {exc}"
    ROWS.append((fault, what.replace("\n", " ").replace("|", "\\|")))


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    model = presets.build("lenet5", seed=0)
    good = io.save(model, tmp / "good.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header, body = json.loads(good[8 : 8 + n]), good[8 + n :]

    def model_bytes(name: str, data: bytes):
        path = tmp / name
        path.write_bytes(data)
        return lambda: cc.load(path)

    def with_header(h: dict, b: bytes = body) -> bytes:
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + b

    row("model file of zero bytes", model_bytes("empty.safetensors", b""))
    row("model file truncated to half", model_bytes("half.safetensors", good[: len(good) // 2]))
    row("a PNG renamed .safetensors", model_bytes("png.safetensors", b"\x89PNG\r\n\x1a\n" * 8))
    lying = json.loads(json.dumps(header))
    name = next(k for k in lying if k != "__metadata__")
    lying[name]["data_offsets"][1] += 10**12
    row(
        "header that lies about a tensor's size", model_bytes("lie.safetensors", with_header(lying))
    )
    other = {k: v for k, v in header.items() if k != "__metadata__"}
    row(
        "safetensors from another tool (no metadata)",
        model_bytes("o.safetensors", with_header(other)),
    )
    future = json.loads(json.dumps(header))
    future["__metadata__"]["format_version"] = "99"
    row("a future format version", model_bytes("future.safetensors", with_header(future)))
    unknown = json.loads(json.dumps(header))
    cfg = json.loads(unknown["__metadata__"]["architecture"])
    cfg["layers"][0]["class_name"] = "EvalLayer"
    unknown["__metadata__"]["architecture"] = json.dumps(cfg)
    row(
        "architecture naming an unknown layer", model_bytes("unk.safetensors", with_header(unknown))
    )
    bigger = json.loads(json.dumps(header))
    cfg = json.loads(bigger["__metadata__"]["architecture"])
    for layer in cfg["layers"]:
        if layer["class_name"] == "Dense":
            layer["config"]["units"] = 10**9
            break
    bigger["__metadata__"]["architecture"] = json.dumps(cfg)
    row(
        "architecture asking for 10⁹-unit dense weights the file lacks",
        model_bytes("big.safetensors", with_header(bigger)),
    )

    row(
        "IDX file with a bad magic number", lambda: read_idx(_write(tmp / "m.idx", b"\1\2\3\4" * 4))
    )
    row(
        "IDX dimensions that would allocate terabytes",
        lambda: read_idx(
            _write(tmp / "tb.idx", b"\0\0\x08\x03" + struct.pack(">III", 10**6, 10**6, 10**3))
        ),
    )
    ok = write_idx(tmp / "ok.idx", np.zeros((10, 28, 28), np.uint8)).read_bytes()
    row("IDX data truncated", lambda: read_idx(_write(tmp / "t.idx", ok[:-100])))
    row(
        "IDX .gz with a corrupt CRC",
        lambda: read_idx(_write(tmp / "c.idx.gz", gzip.compress(ok)[:-8] + b"\0" * 8)),
    )

    row("image file that does not exist", lambda: im.read_image(tmp / "nope.png"))
    row(
        "a text file named .jpg",
        lambda: im.read_image(_write(tmp / "t.jpg", b"hello, not an image")),
    )
    png = pyio.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    row("PNG truncated", lambda: im.read_image(_write(tmp / "tr.png", png.getvalue()[:60])))
    row(
        "decompression bomb (a PNG header claiming 100,000 × 100,000 pixels)",
        lambda: im.read_image(_write(tmp / "bomb.png", _bomb_png())),
    )
    gif = pyio.BytesIO()
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    row(
        "animated GIF",
        lambda: f"first frame, value {im.read_image(_write(tmp / 'a.gif', gif.getvalue()))[0, 0]}",
    )

    target = tmp / "keep.safetensors"
    io.save(model, target)
    before = target.read_bytes()
    real_fdopen = io.os.fdopen

    class FillsUp:
        """A file that takes the first 1,000 bytes, then reports a full disk."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:1000])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    io.os.fdopen = lambda fd, mode: FillsUp(real_fdopen(fd, mode))
    try:
        row("a disk that fills while a model file is replaced", lambda: io.save(model, target))
    finally:
        io.os.fdopen = real_fdopen
    ROWS.append(
        (
            "… the model file that was there",
            "unchanged" if target.read_bytes() == before else "CHANGED",
        )
    )

    print("| fault or bad input | what classic-cnn did |\n|---|---|")
    for fault, what in ROWS:
        print(f"| {fault} | {what} |")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bomb_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


if __name__ == "__main__":
    main()
