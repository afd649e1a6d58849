"""Named datasets: the lookup order, downloads from a local server, and the real Debian files.

No test reaches the network: the cache and system folders are temporary folders (through
CLASSIC_CNN_CACHE and CLASSIC_CNN_SYSTEM_DATA), and downloads come from an HTTP server on
127.0.0.1 (through CLASSIC_CNN_MIRROR).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import socket
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from classic_cnn.data import (
    DATASETS,
    ChecksumMismatch,
    DatasetNotFound,
    cache_dir,
    dataset_status,
    fetch,
    load_dataset,
    named,
    read_idx,
    write_idx,
)

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_dataset(folder, fill, n_train=20, n_test=10, splits=("train", "test"), gz=True):
    """Small IDX files of 28×28 images, every pixel ``fill`` (to tell the folders apart)."""
    sizes = {"train": n_train, "test": n_test}
    spec = DATASETS["fashion-mnist"]
    for split in splits:
        images_name, labels_name = spec.split_files(split)
        if not gz:
            images_name, labels_name = images_name[:-3], labels_name[:-3]
        n = sizes[split]
        write_idx(Path(folder) / images_name, np.full((n, 28, 28), fill, np.uint8))
        write_idx(Path(folder) / labels_name, (np.arange(n) % 10).astype(np.uint8))
    return Path(folder)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(folder) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty cache and system folders; no mirror override; no proxy for 127.0.0.1."""
    cache, system = tmp_path / "cache", tmp_path / "system"
    monkeypatch.setenv("CLASSIC_CNN_CACHE", str(cache))
    monkeypatch.setenv("CLASSIC_CNN_SYSTEM_DATA", str(system))
    monkeypatch.delenv("CLASSIC_CNN_MIRROR", raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return {"cache": cache / "fashion-mnist", "system": system / "fashion-mnist", "tmp": tmp_path}


# --- lookup order -------------------------------------------------------------------------------


def test_loads_from_the_system_folder_with_the_class_names(places):
    write_dataset(places["system"], fill=1)
    train = load_dataset("fashion-mnist", "train", download=False)
    test = load_dataset("fashion-mnist", "test", download=False)
    assert train.images.shape == (20, 28, 28, 1) and test.images.shape == (10, 28, 28, 1)
    assert train.images.dtype == np.uint8 and (train.images == 1).all()
    np.testing.assert_array_equal(test.labels, np.arange(10))
    assert train.classes == FASHION_CLASSES
    assert (train.name, train.split, test.split) == ("fashion-mnist", "train", "test")
    assert train.source == str(places["system"]) and train.background == "dark"


def test_default_is_fashion_mnist_train(places):
    write_dataset(places["system"], fill=1)
    ds = load_dataset()
    assert (ds.name, ds.split, len(ds)) == ("fashion-mnist", "train", 20)


def test_mnist_class_names(places):
    write_dataset(places["cache"].parent / "mnist", fill=3)
    ds = load_dataset("MNIST", "test", download=False)  # names are case-insensitive
    assert ds.name == "mnist" and ds.classes == [str(d) for d in range(10)]
    assert ds.source == str(places["cache"].parent / "mnist")


def test_cache_wins_over_system(places):
    write_dataset(places["system"], fill=1)
    write_dataset(places["cache"], fill=2)
    ds = load_dataset("fashion-mnist", "train", download=False)
    assert (ds.images == 2).all() and ds.source == str(places["cache"])


def test_a_split_missing_from_the_cache_comes_from_the_system_folder(places):
    write_dataset(places["system"], fill=1)
    write_dataset(places["cache"], fill=2, splits=("test",))
    assert (load_dataset("fashion-mnist", "test", download=False).images == 2).all()
    assert (load_dataset("fashion-mnist", "train", download=False).images == 1).all()


def test_explicit_data_dir_wins_over_both(places):
    write_dataset(places["system"], fill=1)
    write_dataset(places["cache"], fill=2)
    mine = write_dataset(places["tmp"] / "mine", fill=3)
    ds = load_dataset("fashion-mnist", "train", data_dir=mine)
    assert (ds.images == 3).all() and ds.source == str(mine)
    # a folder holding <name>/ works too
    nested = write_dataset(places["tmp"] / "datasets" / "fashion-mnist", fill=4)
    ds = load_dataset("fashion-mnist", "test", data_dir=str(nested.parent))
    assert (ds.images == 4).all() and ds.source == str(nested)


def test_explicit_data_dir_without_the_files_does_not_fall_back(places):
    write_dataset(places["cache"], fill=2)
    empty = places["tmp"] / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", "train", data_dir=empty)
    message = str(info.value)
    assert str(empty) in message and "train-images-idx3-ubyte.gz" in message
    assert "only --data DIR is looked in" in message


def test_uncompressed_files_are_found(places):
    write_dataset(places["system"], fill=5, gz=False)
    ds = load_dataset("fashion-mnist", "test", download=False)
    assert (ds.images == 5).all() and len(ds) == 10


def test_unknown_name_lists_the_known_ones(places):
    with pytest.raises(ValueError, match="fashion-mnist, mnist") as info:
        load_dataset("cifar-10")
    assert "'cifar-10'" in str(info.value)


def test_bad_split(places):
    with pytest.raises(ValueError, match="Received: split='val'"):
        load_dataset("fashion-mnist", "val")


def test_not_found_without_download_says_how_to_get_it(places, monkeypatch):
    monkeypatch.setenv("CLASSIC_CNN_MIRROR", f"http://127.0.0.1:{free_port()}/")

    def no_download(*args, **kwargs):
        raise AssertionError("download=False must not try to download")

    monkeypatch.setattr(named, "_download", no_download)
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", "test", download=False)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for fragment in (
        "sudo apt-get install dataset-fashion-mnist",
        "--data DIR",
        str(places["cache"]),
        str(places["system"]),
        "t10k-images-idx3-ubyte.gz",
        "download=False",
    ):
        assert fragment in message, message


def test_malformed_file_in_a_folder_is_a_clear_value_error(places):
    write_dataset(places["system"], fill=1)
    labels = places["system"] / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, np.arange(9, dtype=np.uint8))
    with pytest.raises(ValueError, match="9 labels for 10 images"):
        load_dataset("fashion-mnist", "test", download=False)


def test_dataset_status(places):
    rows = {row["name"]: row for row in dataset_status()}
    assert set(rows) == {"fashion-mnist", "mnist"}
    assert rows["fashion-mnist"]["status"] == "missing" and rows["fashion-mnist"]["path"] is None
    assert rows["fashion-mnist"]["cache"] == str(places["cache"])
    write_dataset(places["system"], fill=1)
    write_dataset(places["cache"], fill=2, splits=("test",))
    row = {row["name"]: row for row in dataset_status()}["fashion-mnist"]
    assert row["status"] == "found"
    assert row["splits"] == {"train": "system", "test": "cache"}
    assert (row["where"], row["path"]) == ("system", str(places["system"]))
    assert row["downloadable"] is True
    mine = write_dataset(places["tmp"] / "mine", fill=3, splits=("train",))
    row = {row["name"]: row for row in dataset_status(data_dir=mine)}["fashion-mnist"]
    assert row["status"] == "partial" and row["splits"] == {"train": "data_dir", "test": None}


def test_cache_dir_follows_the_environment(places, monkeypatch):
    assert cache_dir("fashion-mnist") == places["cache"]
    monkeypatch.delenv("CLASSIC_CNN_CACHE")
    import pooch

    assert cache_dir("mnist") == Path(pooch.os_cache("classic-cnn")) / "mnist"


# --- downloads from a local server --------------------------------------------------------------


class Server:
    """An HTTP server on 127.0.0.1 serving ``folder``, in a thread; it records the paths asked."""

    def __init__(self, folder: Path):
        self.folder, self.requests = folder, []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(places, monkeypatch, request):
    """A local mirror serving small fashion-mnist files whose sums the registry is given."""
    served = write_dataset(places["tmp"] / "served", fill=7, n_train=30, n_test=12)
    spec = DATASETS["fashion-mnist"]
    for fname in spec.files.values():
        monkeypatch.setitem(spec.sha256, fname, sha256(served / fname))
    srv = Server(served)
    request.addfinalizer(srv.stop)
    monkeypatch.setenv("CLASSIC_CNN_MIRROR", srv.url)
    return srv


def test_download_verifies_and_loads(places, server):
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (12, 28, 28, 1) and (ds.images == 7).all()
    assert ds.classes == FASHION_CLASSES and ds.source == str(places["cache"])
    # only the test split was downloaded, and no temporary file is left behind
    assert [p.name for p in files_under(places["cache"])] == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert sorted(server.requests) == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz"]
    # the second time it comes from the cache, without a request
    load_dataset("fashion-mnist", "test")
    assert len(server.requests) == 2


def test_fetch_downloads_all_four_files(places, server):
    folder = fetch("fashion-mnist")
    assert folder == places["cache"]
    assert [p.name for p in files_under(folder)] == sorted(DATASETS["fashion-mnist"].files.values())
    assert read_idx(folder / "train-images-idx3-ubyte.gz").shape == (30, 28, 28)
    n = len(server.requests)
    fetch("fashion-mnist")  # already there, with the right sums: nothing downloaded again
    assert len(server.requests) == n
    assert dataset_status()[0]["splits"] == {"train": "cache", "test": "cache"}


def test_cnn_data_fetch_downloads_into_the_cache(places, server):
    """`cnn data fetch NAME` on the command line: from the local mirror into the cache folder."""
    from typer.testing import CliRunner

    from classic_cnn.cli import app

    result = CliRunner().invoke(app, ["data", "fetch", "fashion-mnist"])
    assert result.exit_code == 0, result.output
    assert str(places["cache"]) in result.output
    assert [p.name for p in files_under(places["cache"])] == sorted(
        DATASETS["fashion-mnist"].files.values()
    )
    train = load_dataset("fashion-mnist", "train", download=False)
    test = load_dataset("fashion-mnist", "test", download=False)
    assert train.images.shape == (30, 28, 28, 1) and test.images.shape == (12, 28, 28, 1)
    assert (train.images == 7).all() and train.source == str(places["cache"])
    unknown = CliRunner().invoke(app, ["data", "fetch", "cifar"])
    assert unknown.exit_code == 1 and "fashion-mnist, mnist" in unknown.output


def test_download_with_a_progress_bar(places, server, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    ds = load_dataset("fashion-mnist", "train")
    assert len(ds) == 30


def test_checksum_mismatch_deletes_the_file(places, server):
    # the mirror now serves different bytes under the same name
    write_idx(server.folder / "t10k-images-idx3-ubyte.gz", np.zeros((12, 28, 28), np.uint8))
    with pytest.raises(ChecksumMismatch) as info:
        load_dataset("fashion-mnist", "test")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "SHA-256" in message
    assert (
        "deleted" in message
        and DATASETS["fashion-mnist"].sha256["t10k-images-idx3-ubyte.gz"] in message
    )
    assert files_under(places["cache"]) == []


def test_unreachable_mirror_says_how_to_get_it(places, monkeypatch):
    monkeypatch.setenv("CLASSIC_CNN_MIRROR", f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", "test")
    message = str(info.value)
    for fragment in (
        "dataset-fashion-mnist",
        "--data",
        str(places["cache"]),
        "download failed",
        "ConnectionError",
    ):
        assert fragment in message, message
    assert files_under(places["cache"]) == []


def test_stopped_server_says_how_to_get_it(places, server):
    server.stop()
    with pytest.raises(DatasetNotFound, match="dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", "train")
    assert "--data" in str(info.value)


def test_missing_file_on_the_mirror(places, server):
    (server.folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFound, match="404"):
        load_dataset("fashion-mnist", "test")
    assert "t10k-labels-idx1-ubyte.gz" not in [p.name for p in files_under(places["cache"])]


def test_unknown_checksum_refuses_to_download(places, server, monkeypatch):
    monkeypatch.setitem(DATASETS["fashion-mnist"].sha256, "t10k-labels-idx1-ubyte.gz", None)
    with pytest.raises(DatasetNotFound, match="no SHA-256 sum is known") as info:
        load_dataset("fashion-mnist", "test")
    assert "unverified download is never used" in str(info.value)
    assert server.requests == [] and files_under(places["cache"]) == []
    with pytest.raises(DatasetNotFound, match="no SHA-256 sum is known"):
        fetch("fashion-mnist")
    assert dataset_status()[0]["downloadable"] is False


def test_mirrors_are_tried_in_order(places, server, monkeypatch):
    monkeypatch.delenv("CLASSIC_CNN_MIRROR")
    dead = f"http://127.0.0.1:{free_port()}/"
    monkeypatch.setattr(DATASETS["fashion-mnist"], "mirrors", (dead, server.url))
    assert len(load_dataset("fashion-mnist", "test")) == 12


def test_mirror_name_placeholder(places, server, monkeypatch):
    nested = server.folder / "fashion-mnist"
    nested.mkdir()
    for p in list(server.folder.glob("*.gz")):
        p.rename(nested / p.name)
    monkeypatch.setenv("CLASSIC_CNN_MIRROR", server.url + "{name}/")
    assert len(load_dataset("fashion-mnist", "test")) == 12
    assert server.requests[0] == "/fashion-mnist/t10k-images-idx3-ubyte.gz"


def test_rich_download_bar_follows_the_protocol_pooch_uses():
    bar = named._RichDownloadBar("file.gz")
    bar.total = 1000
    bar.update(600)
    bar.update(600)
    bar.reset()
    bar.update(1000)
    bar.close()
    assert bar.total == 1000


# --- the registry and the real files -------------------------------------------------------------


def test_registry():
    fashion, mnist = DATASETS["fashion-mnist"], DATASETS["mnist"]
    assert list(fashion.classes) == FASHION_CLASSES
    assert list(mnist.classes) == [str(d) for d in range(10)]
    for spec in (fashion, mnist):
        assert spec.background == "dark"
        assert sorted(spec.files.values()) == sorted(spec.sha256)
        for value in spec.sha256.values():
            assert value is None or (len(value) == 64 and int(value, 16) >= 0)
        assert all(m.startswith(("http://", "https://")) and m.endswith("/") for m in spec.mirrors)
    assert fashion.debian_package == "dataset-fashion-mnist"


needs_debian = pytest.mark.skipif(
    not DEBIAN_DIR.is_dir(),
    reason="dataset-fashion-mnist not installed: sudo apt-get install dataset-fashion-mnist",
)


@needs_debian
def test_real_debian_fashion_mnist_test_split(monkeypatch, tmp_path):
    monkeypatch.setenv("CLASSIC_CNN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("CLASSIC_CNN_SYSTEM_DATA", raising=False)
    ds = load_dataset("fashion-mnist", "test", download=False)
    assert ds.source == str(DEBIAN_DIR)
    assert ds.images.shape == (10_000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), [1000] * 10)
    assert ds.classes == FASHION_CLASSES
    assert 0 < ds.images.mean() < 255 and ds.images.max() == 255


# Upstream's gzip headers: Debian's files are the same deflate streams with the header's file
# name and modification time stripped; these are the times of upstream's files.
UPSTREAM_GZIP_MTIME = {
    "train-images-idx3-ubyte.gz": 1504176606,
    "train-labels-idx1-ubyte.gz": 1504176606,
    "t10k-images-idx3-ubyte.gz": 1504176627,
    "t10k-labels-idx1-ubyte.gz": 1504176627,
}


@needs_debian
@pytest.mark.parametrize("fname", list(UPSTREAM_GZIP_MTIME))
def test_download_sums_match_the_debian_files_content(fname):
    """The SHA-256 sums used for downloads are upstream's files: rebuild them from Debian's."""
    spec = DATASETS["fashion-mnist"]
    debian = (DEBIAN_DIR / fname).read_bytes()
    if hashlib.sha256(debian).hexdigest() != spec.debian_sha256[fname]:
        pytest.skip(f"{fname}: a different dataset-fashion-mnist build than the one recorded")
    assert debian[:4] == b"\x1f\x8b\x08\x00"  # deflate, no flags: no name stored
    header = (
        b"\x1f\x8b\x08\x08"  # deflate, FNAME flag
        + struct.pack("<I", UPSTREAM_GZIP_MTIME[fname])
        + b"\x00\x03"  # no extra flags, OS = Unix
        + fname.removesuffix(".gz").encode()
        + b"\x00"
    )
    upstream = header + debian[10:]
    assert hashlib.sha256(upstream).hexdigest() == spec.sha256[fname]
    assert gzip.decompress(upstream)[:4] == b"\x00\x00\x08" + bytes([3 if "images" in fname else 1])


def test_an_interrupted_download_leaves_no_half_file(places, monkeypatch):
    """The server promises the whole file, sends half of it and hangs up: the download fails
    with a clear message, and nothing is left in the cache that a later run would take as
    complete."""
    served = write_dataset(places["tmp"] / "served-half", fill=3, n_train=30, n_test=12)
    spec = DATASETS["fashion-mnist"]
    for fname in spec.files.values():
        monkeypatch.setitem(spec.sha256, fname, sha256(served / fname))

    class HalfHandler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            data = (served / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfHandler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        monkeypatch.setenv("CLASSIC_CNN_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}/")
        with pytest.raises(DatasetNotFound, match="download failed"):
            load_dataset("fashion-mnist", "test")
        assert files_under(places["cache"]) == []
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    # with the files now served whole, the same call succeeds from scratch
    srv = Server(served)
    try:
        monkeypatch.setenv("CLASSIC_CNN_MIRROR", srv.url)
        assert len(load_dataset("fashion-mnist", "test")) == 12
    finally:
        srv.stop()
