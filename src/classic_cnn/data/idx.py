"""MNIST's IDX file format: read (raw or gzip), write (atomically), and load an image/label pair.

An IDX file is a 4-byte magic number, one big-endian uint32 per dimension, then the data in C
order::

    byte 0–1   0x00 0x00
    byte 2     type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
               0x0D float32, 0x0E float64)
    byte 3     number of dimensions
    then       ndim × uint32 (big-endian): the size of each dimension
    then       the data, prod(dims) items

MNIST and Fashion-MNIST store images as ``N×H×W`` unsigned bytes (``idx3``) and labels as ``N``
unsigned bytes (``idx1``), usually gzip-compressed. Files are read with bounded reads: the header
is checked, and the size it implies is refused if absurd, before the data is allocated or read.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .dataset import Dataset

__all__ = ["MAX_IDX_BYTES", "IDXError", "load_idx_pair", "read_idx", "write_idx"]

#: The largest data section ``read_idx`` accepts by default (2 GiB). The whole MNIST training set
#: is 47 MB; a header that claims more than this is a corrupt or hostile file.
MAX_IDX_BYTES = 2**31

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08
_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
_MAX_NDIM = 4
_CHUNK = 1 << 20  # read the data 1 MiB at a time


class IDXError(ValueError):
    """A file that is not a valid IDX file of the kind expected (it names the file)."""


def _fail(path, what: str, expected: str, received: str) -> IDXError:
    return IDXError(f"{path}: {what}. Expected {expected}. Received: {received}")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _read_exactly(f, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the stream)."""
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _parse_header(f, path) -> tuple[int, tuple[int, ...], int]:
    """Read and check the magic number and dimensions; return ``(type_code, dims, header_len)``."""
    magic = _read_exactly(f, 4)
    if len(magic) < 4:
        raise _fail(
            path,
            "too short to be an IDX file",
            "a 4-byte magic number (0x00 0x00 type ndim)",
            f"{len(magic)} byte(s)",
        )
    zero, type_code, ndim = magic[:2], magic[2], magic[3]
    if zero != b"\x00\x00":
        raise _fail(
            path,
            "not an IDX file (bad magic number)",
            "the magic number to start with two zero bytes (0x00 0x00 type ndim)",
            f"0x{magic.hex()}",
        )
    if type_code != _UBYTE:
        kind = _TYPE_NAMES.get(type_code)
        received = (
            f"type code 0x{type_code:02X} ({kind}), a valid IDX type that these datasets never use"
            if kind
            else f"type code 0x{type_code:02X}, which is not an IDX type"
        )
        raise _fail(path, "unsupported IDX data type", "type code 0x08 (unsigned byte)", received)
    if not 1 <= ndim <= _MAX_NDIM:
        raise _fail(path, "unsupported number of dimensions", f"1 to {_MAX_NDIM}", f"ndim={ndim}")
    raw_dims = _read_exactly(f, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise _fail(
            path,
            "header truncated",
            f"{ndim} dimension sizes ({4 * ndim} bytes) after the magic number",
            f"{len(raw_dims)} byte(s)",
        )
    dims = struct.unpack(f">{ndim}I", raw_dims)
    return type_code, dims, 4 + 4 * ndim


def read_idx(path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file of unsigned bytes, gzip-compressed or raw, into an array.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Gzip compression is detected from the first two bytes (``1f 8b``), whatever the
        file is called.
    max_bytes : int
        Refuse a file whose header implies more data than this (default 2 GiB), before
        allocating anything.

    Returns
    -------
    np.ndarray
        ``uint8`` array of the shape the header gives (``N×H×W`` for ``idx3``, ``N`` for
        ``idx1``).

    Raises
    ------
    IDXError (a ValueError)
        Bad magic number, a type other than 0x08, 0 or more than 4 dimensions, a size above
        ``max_bytes``, truncated data or trailing bytes, or a corrupt gzip stream. The message
        names the file, what was expected and what was received.
    FileNotFoundError
        The file does not exist.
    """
    path = Path(path)
    try:
        compressed = _is_gzip(path)
        opener = gzip.open if compressed else open
        with opener(path, "rb") as f:
            return _read_body(f, path, compressed, max_bytes)
    except IDXError:
        raise
    except EOFError as e:
        raise _fail(
            path,
            "gzip stream truncated (a download or copy cut short?)",
            "a complete gzip file",
            f"a stream that ends early ({e})",
        ) from e
    except (zlib.error, gzip.BadGzipFile) as e:
        # a damaged gzip stream: bad CRC or length, bad deflate data, garbage after the member
        raise _fail(
            path, "corrupt gzip stream", "a valid gzip file", f"{type(e).__name__}: {e}"
        ) from e


def _read_body(f, path: Path, compressed: bool, max_bytes: int) -> np.ndarray:
    _, dims, header_len = _parse_header(f, path)
    n = math.prod(dims)  # Python ints: no overflow, however large the header claims
    shape = "×".join(str(d) for d in dims)
    if n > max_bytes:
        raise _fail(
            path,
            "header dimensions imply an absurd amount of data; refusing to allocate it",
            f"at most {max_bytes:,} bytes",
            f"dimensions {shape} = {n:,} bytes",
        )
    if not compressed:
        # a raw file's size is known up front: check it before reading anything
        size = os.fstat(f.fileno()).st_size
        expected = header_len + n
        if size != expected:
            short = size < expected
            raise _fail(
                path,
                "data truncated" if short else "trailing bytes after the data",
                f"{header_len} header bytes + {n:,} data bytes ({shape}) = {expected:,} bytes",
                f"a file of {size:,} bytes ({abs(expected - size):,} "
                + ("missing)" if short else "more)"),
            )
    data = np.empty(n, dtype=np.uint8)  # pages are only committed as data arrives
    view, got = memoryview(data), 0
    while got < n:
        k = f.readinto(view[got : got + min(_CHUNK, n - got)])
        if not k:
            break
        got += k
    if got < n:
        raise _fail(
            path,
            "data truncated",
            f"{n:,} data bytes for dimensions {shape}",
            f"{got:,} bytes ({n - got:,} missing)",
        )
    extra = f.read(1)  # in a gzip stream this also reaches the end, where the CRC is checked
    if extra:
        rest = 1 + len(_read_exactly(f, _CHUNK))
        more = "+" if rest > _CHUNK else ""
        raise _fail(
            path,
            "trailing bytes after the data",
            f"exactly {n:,} data bytes for dimensions {shape}",
            f"{rest:,}{more} more byte(s)",
        )
    return data.reshape(dims)


def write_idx(path, array) -> Path:
    """Write a ``uint8`` array (1 to 4 dimensions) as an IDX file; gzip it if ``path`` ends in .gz.

    The file is written to a temporary name in the same folder and renamed into place, so a
    reader never sees half a file. The gzip header carries no name or time, so the same array
    always gives the same bytes. Returns the path.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays only. Received: dtype {array.dtype}")
    if not 1 <= array.ndim <= _MAX_NDIM:
        raise ValueError(
            f"write_idx writes arrays of 1 to {_MAX_NDIM} dimensions. Received: shape {array.shape}"
        )
    if any(d >= 2**32 for d in array.shape):
        raise ValueError(f"IDX dimensions must fit in 32 bits. Received: shape {array.shape}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = np.ascontiguousarray(array).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                    gz.write(header)
                    gz.write(payload)
            else:
                raw.write(header)
                raw.write(payload)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_idx_pair(
    images_path,
    labels_path,
    classes,
    name: str = "",
    source: str = "",
    split: str = "",
    background: str = "dark",
) -> Dataset:
    """An image file (``N×H×W`` IDX) and a label file (``N`` IDX) as a :class:`Dataset`.

    Parameters
    ----------
    images_path, labels_path : str or os.PathLike
        IDX files (raw or gzip) of unsigned bytes: images ``N×H×W``, labels ``N``.
    classes : sequence of str
        The class names; labels must lie in ``[0, len(classes))``.
    name, source, split, background
        Stored in the Dataset. ``source`` defaults to the images' folder.

    Returns
    -------
    Dataset
        ``images`` uint8 ``N×H×W×1``, ``labels`` int64 ``(N,)``.

    Raises
    ------
    IDXError (a ValueError)
        Either file is malformed, the images are not 3-D or the labels not 1-D, the counts
        differ, or a label is outside the classes.
    """
    images = read_idx(images_path)
    if images.ndim != 3:
        raise _fail(
            images_path,
            "not an image file",
            "a 3-D IDX file of N×H×W images (idx3)",
            f"{images.ndim} dimension(s), shape {images.shape}",
        )
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise _fail(
            labels_path,
            "not a label file",
            "a 1-D IDX file of N labels (idx1)",
            f"{labels.ndim} dimension(s), shape {labels.shape}",
        )
    if len(labels) != len(images):
        raise _fail(
            labels_path,
            f"the label count does not match the image count of {images_path}",
            f"one label per image: {len(images):,} labels",
            f"{len(labels):,} labels for {len(images):,} images",
        )
    classes = [str(c) for c in classes]
    if len(labels) and int(labels.max()) >= len(classes):
        bad = int(np.count_nonzero(labels >= len(classes)))
        raise _fail(
            labels_path,
            "labels out of range of the classes",
            f"labels in [0, {len(classes) - 1}] for {len(classes)} classes",
            f"labels up to {int(labels.max())} ({bad:,} label(s) out of range)",
        )
    return Dataset(
        images[..., None],
        labels,
        classes,
        name=name,
        source=source or str(Path(images_path).parent),
        split=split,
        background=background,
    )
