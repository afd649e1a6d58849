"""The IDX reader and writer: round trips, and a clear ValueError for every malformed file."""

from __future__ import annotations

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classic_cnn.data import Dataset, IDXError, load_idx_pair, read_idx, write_idx

from .conftest import FUZZ_EXAMPLES


def idx_bytes(dims, type_code=0x08, data=None, ndim=None):
    """An IDX file's bytes, built by hand so that malformed ones can be made too."""
    ndim = len(dims) if ndim is None else ndim
    header = bytes([0, 0, type_code, ndim]) + struct.pack(f">{len(dims)}I", *dims)
    if data is None:
        data = bytes(int(np.prod(dims)))
    return header + data


def write_bytes(path, content, compress=None):
    compress = str(path).endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
    return path


@pytest.fixture(params=["raw", "gz"])
def suffix(request):
    return ".gz" if request.param == "gz" else ""


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (5, 4), (6, 28, 28), (2, 3, 4, 5), (0, 28, 28)])
def test_round_trip(tmp_path, rng, suffix, shape):
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path / f"a.idx{suffix}", a)
    b = read_idx(path)
    assert b.dtype == np.uint8 and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone


def test_gz_written_as_gzip_and_detected_by_content_not_name(tmp_path, rng):
    a = rng.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    gz = write_idx(tmp_path / "a.gz", a)
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    raw = write_idx(tmp_path / "a.idx", a)
    assert raw.read_bytes()[:4] == b"\x00\x00\x08\x03"
    assert raw.stat().st_size == 4 + 3 * 4 + a.size
    disguised = tmp_path / "gzipped-but-not-named-so"
    disguised.write_bytes(gz.read_bytes())
    np.testing.assert_array_equal(read_idx(disguised), a)
    misnamed = tmp_path / "raw-but-named.gz"
    misnamed.write_bytes(raw.read_bytes())
    np.testing.assert_array_equal(read_idx(misnamed), a)


def test_write_is_deterministic_and_replaces(tmp_path, rng):
    a = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    p1 = write_idx(tmp_path / "x.gz", a).read_bytes()
    p2 = write_idx(tmp_path / "x.gz", a).read_bytes()
    assert p1 == p2  # no time or name in the gzip header
    write_idx(tmp_path / "x.gz", a[:2])
    assert read_idx(tmp_path / "x.gz").shape == (2, 6)


def test_write_refuses_what_idx_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 arrays only\. Received: dtype float32"):
        write_idx(tmp_path / "f.idx", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"1 to 4 dimensions\. Received: shape \(\)"):
        write_idx(tmp_path / "s.idx", np.uint8(3))
    with pytest.raises(ValueError, match="Received: shape"):
        write_idx(tmp_path / "5d.idx", np.zeros((1,) * 5, np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    import classic_cnn.data.idx as idx

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(idx.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_idx(tmp_path / "a.gz", np.zeros(3, np.uint8))
    assert list(tmp_path.iterdir()) == []


# --- malformed files: each a clear ValueError naming the file -------------------------------


def check_error(path, *fragments):
    with pytest.raises(ValueError) as info:
        read_idx(path)
    message = str(info.value)
    assert isinstance(info.value, IDXError)
    assert str(path) in message
    assert "Expected" in message and "Received" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_bad_magic(tmp_path, suffix):
    path = write_bytes(tmp_path / f"m{suffix}", b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"ab")
    check_error(path, "bad magic number", "0x12340801")


def test_not_idx_at_all(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_text("hello, world")
    check_error(path, "bad magic number")
    short = write_bytes(tmp_path / "short", b"\x00\x00")
    check_error(short, "too short", "2 byte(s)")
    empty = write_bytes(tmp_path / "empty", b"")
    check_error(empty, "too short", "0 byte(s)")


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (0x0D, "0x0D (float32)"),
        (0x0C, "0x0C (int32)"),
        (0x09, "0x09 (signed byte)"),
        (0x42, "0x42"),
    ],
)
def test_unsupported_type_code(tmp_path, suffix, code, fragment):
    path = write_bytes(tmp_path / f"t{suffix}", idx_bytes((2,), type_code=code, data=bytes(8)))
    check_error(path, "unsupported IDX data type", "0x08 (unsigned byte)", fragment)


@pytest.mark.parametrize("ndim", [0, 5, 255])
def test_wrong_dimension_count(tmp_path, suffix, ndim):
    path = write_bytes(tmp_path / f"d{suffix}", bytes([0, 0, 8, ndim]) + bytes(64))
    check_error(path, "number of dimensions", "1 to 4", f"ndim={ndim}")


def test_header_truncated(tmp_path, suffix):
    path = write_bytes(tmp_path / f"h{suffix}", bytes([0, 0, 8, 3]) + struct.pack(">2I", 10, 28))
    check_error(path, "header truncated", "3 dimension sizes (12 bytes)", "8 byte(s)")


def test_truncated_data(tmp_path, suffix):
    full = idx_bytes((20, 28, 28))
    path = write_bytes(tmp_path / f"images{suffix}", full[:-100])
    check_error(path, "data truncated", "20×28×28")


def test_truncated_gzip_stream(tmp_path, rng):
    a = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    good = write_idx(tmp_path / "good.gz", a).read_bytes()
    cut = write_bytes(tmp_path / "cut.gz", good[: len(good) // 2], compress=False)
    check_error(cut, "truncated")


def test_trailing_bytes(tmp_path, suffix):
    path = write_bytes(tmp_path / f"labels{suffix}", idx_bytes((10,)) + b"\x07" * 3)
    check_error(path, "trailing bytes", "10 data bytes", "3 more")


def test_corrupt_gzip_crc(tmp_path, rng):
    a = rng.integers(0, 256, size=(50,), dtype=np.uint8)
    data = bytearray(write_idx(tmp_path / "good.gz", a).read_bytes())
    data[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    path = write_bytes(tmp_path / "crc.gz", bytes(data), compress=False)
    check_error(path, "corrupt gzip stream")


@pytest.mark.parametrize("compress", [False, True])
def test_absurd_dimensions_refused_before_allocating(tmp_path, compress):
    # a 28-byte file claiming 10**6 × 10**6 × 10**6 bytes (an exabyte)
    path = write_bytes(
        tmp_path / "huge", idx_bytes((10**6, 10**6, 10**6), data=b"\x00" * 16), compress
    )
    tracemalloc.start()
    try:
        message = check_error(path, "absurd", "1000000×1000000×1000000")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"allocated {peak} bytes before refusing"
    assert "2,147,483,648" in message


def test_max_bytes_is_adjustable(tmp_path):
    path = write_idx(tmp_path / "a.idx", np.zeros((10, 10), np.uint8))
    assert read_idx(path, max_bytes=100).shape == (10, 10)
    with pytest.raises(IDXError, match="at most 99 bytes"):
        read_idx(path, max_bytes=99)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.gz")


# --- image/label pairs ------------------------------------------------------------------------


def make_pair(tmp_path, rng, n_images=20, n_labels=20, n_classes=10, suffix=".gz"):
    images = rng.integers(0, 256, size=(n_images, 28, 28), dtype=np.uint8)
    labels = (np.arange(n_labels) % n_classes).astype(np.uint8)
    return (
        write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images),
        write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", labels),
        images,
        labels,
    )


def test_load_idx_pair(tmp_path, rng):
    ip, lp, images, labels = make_pair(tmp_path, rng)
    ds = load_idx_pair(ip, lp, list("abcdefghij"), name="toy", split="train")
    assert isinstance(ds, Dataset)
    assert ds.images.shape == (20, 28, 28, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64
    assert (ds.name, ds.split, ds.source, ds.background) == ("toy", "train", str(tmp_path), "dark")
    assert ds.classes == list("abcdefghij")


def test_label_image_count_mismatch(tmp_path, rng):
    ip, lp, _, _ = make_pair(tmp_path, rng, n_images=20, n_labels=19)
    with pytest.raises(ValueError, match="label count") as info:
        load_idx_pair(ip, lp, [str(i) for i in range(10)])
    message = str(info.value)
    assert "19 labels for 20 images" in message and str(lp) in message and str(ip) in message


def test_labels_out_of_range(tmp_path, rng):
    ip, lp, _, _ = make_pair(tmp_path, rng, n_classes=10)
    with pytest.raises(ValueError, match="out of range") as info:
        load_idx_pair(ip, lp, ["a", "b", "c"])
    message = str(info.value)
    assert "labels in [0, 2] for 3 classes" in message
    assert "labels up to 9" in message and str(lp) in message


def test_pair_with_swapped_files(tmp_path, rng):
    ip, lp, _, _ = make_pair(tmp_path, rng)
    with pytest.raises(ValueError, match="not an image file") as info:
        load_idx_pair(lp, ip, [str(i) for i in range(10)])
    assert "shape (20,)" in str(info.value)
    with pytest.raises(ValueError, match="not a label file"):
        load_idx_pair(ip, ip, [str(i) for i in range(10)])


# --- fuzz: nothing but ValueError, whatever the bytes ------------------------------------------


def read_or_value_error(path):
    try:
        a = read_idx(path)
    except ValueError as e:
        assert str(path) in str(e)
        return None
    assert a.dtype == np.uint8 and 1 <= a.ndim <= 4
    return a


FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(content=st.binary(max_size=200), compress=st.booleans())
def test_fuzz_random_bytes(tmp_path, content, compress):
    read_or_value_error(write_bytes(tmp_path / "fuzz", content, compress))


@FUZZ
@given(
    data=st.data(),
    layer=st.sampled_from(["raw", "idx-inside-gzip", "gzip-bytes"]),
    n_edits=st.integers(1, 6),
)
def test_fuzz_mutations_of_a_valid_file(tmp_path, data, layer, n_edits):
    """Flip, set, insert and delete bytes of a valid file: in a raw file, in the IDX bytes
    before gzipping them (headers that lie about a well-formed stream), or in the gzip bytes."""
    a = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    suffix = ".gz" if layer == "gzip-bytes" else ""
    content = bytearray(write_idx(tmp_path / f"valid{suffix}", a).read_bytes())
    for _ in range(n_edits):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(content) - 1, 0)))
        if kind == "flip" and content:
            content[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and content:
            content[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del content[pos:]
        elif kind == "insert":
            content[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and content:
            del content[pos]
    compress = layer == "idx-inside-gzip"
    read_or_value_error(write_bytes(tmp_path / "mutant", bytes(content), compress=compress))
