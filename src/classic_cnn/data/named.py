"""The named datasets, ``fashion-mnist`` (the default) and ``mnist``: where they are, and download.

Each is four IDX files (training and test images and labels). ``load_dataset`` looks for a split
in this order and takes the first folder that holds both of its files:

1. an explicit folder, ``data_dir`` (``--data DIR`` on the command line): the files directly in
   it or in ``DIR/<name>/``. When given, it is the only place looked in;
2. the user cache folder, ``pooch.os_cache("classic-cnn") / <name>`` (``CLASSIC_CNN_CACHE``
   replaces ``pooch.os_cache("classic-cnn")``);
3. the system folder ``/usr/share/datasets/<name>``, where Debian's ``dataset-fashion-mnist``
   package installs Fashion-MNIST (``CLASSIC_CNN_SYSTEM_DATA`` replaces ``/usr/share/datasets``);
4. a download with pooch into the cache folder, verified against the SHA-256 sums below (the
   mirror's base URL is replaced by ``CLASSIC_CNN_MIRROR`` when set; ``{name}`` in it becomes the
   dataset's name). A file whose sum differs is deleted, never kept.

A file may also be stored uncompressed (the same name without ``.gz``): ``read_idx`` tells gzip
from raw by the first bytes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import Dataset
from .idx import load_idx_pair

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "ChecksumMismatch",
    "DatasetError",
    "DatasetNotFound",
    "NamedDataset",
    "cache_dir",
    "dataset_status",
    "fetch",
    "load_dataset",
    "system_dir",
]

ENV_CACHE = "CLASSIC_CNN_CACHE"
ENV_SYSTEM = "CLASSIC_CNN_SYSTEM_DATA"
ENV_MIRROR = "CLASSIC_CNN_MIRROR"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")
SPLITS = ("train", "test")
_DOWNLOAD_TIMEOUT_S = 30


class DatasetError(RuntimeError):
    """A named dataset could not be had: base class of the two errors below."""


class DatasetNotFound(DatasetError):
    """Not in any folder looked in, and not downloadable (offline, ``download=False``, no sums)."""


class ChecksumMismatch(DatasetError):
    """A downloaded file's SHA-256 differs from the known one; the file was deleted."""


@dataclass
class NamedDataset:
    """What the code knows about one named dataset.

    ``sha256`` maps each file name to the SHA-256 of the file exactly as the mirrors serve it;
    ``None`` means unknown, and then downloading that file is refused rather than left
    unverified. ``mirrors`` are base URLs tried in order (a file's URL is ``base + name``).
    """

    name: str
    description: str
    classes: tuple[str, ...]
    files: dict[str, str]  # "train_images", "train_labels", "test_images", "test_labels" → name
    sha256: dict[str, str | None]
    mirrors: tuple[str, ...]
    homepage: str = ""
    background: str = "dark"
    debian_package: str | None = None
    # SHA-256 of the files as the Debian package ships them, where they differ from upstream's
    debian_sha256: dict[str, str] = field(default_factory=dict)

    def split_files(self, split: str) -> tuple[str, str]:
        """The (images, labels) file names of ``split``."""
        return self.files[f"{split}_images"], self.files[f"{split}_labels"]


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

DATASETS: dict[str, NamedDataset] = {
    "fashion-mnist": NamedDataset(
        name="fashion-mnist",
        description="Zalando's article images: 60,000 train + 10,000 test, 28×28 grayscale",
        classes=(
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
        ),
        files=dict(_IDX_FILES),
        # Upstream's files (the S3 site and GitHub serve the same bytes; their MD5s are the ones
        # the Fashion-MNIST README lists). Checked offline against Debian's copies: Debian's
        # files are the same gzip streams with the header's file name and time stripped (by
        # strip-nondeterminism), so restoring that header reproduces exactly these sums; the
        # test suite does so when the package is installed.
        sha256={
            "train-images-idx3-ubyte.gz": (
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
            ),
            "train-labels-idx1-ubyte.gz": (
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
            ),
        },
        mirrors=(
            # the download links of the project's README
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        debian_package="dataset-fashion-mnist",
        # sha256sum of /usr/share/datasets/fashion-mnist/* (dataset-fashion-mnist
        # 0.0~git20200523.55506a9-1)
        debian_sha256={
            "train-images-idx3-ubyte.gz": (
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
            ),
            "train-labels-idx1-ubyte.gz": (
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
            ),
        },
    ),
    "mnist": NamedDataset(
        name="mnist",
        description="LeCun, Cortes & Burges' handwritten digits: 60,000 train + 10,000 test, 28×28",
        classes=tuple(str(d) for d in range(10)),
        files=dict(_IDX_FILES),
        # The original files (torchvision checks the same files by their MD5s f68b3c2d…,
        # d53e105e…, 9fb629c4…, ec29112d…); these SHA-256 values are the ones published with
        # the files in many independent projects. Not verified here against a download (no
        # network on the machine that wrote this).
        sha256={
            "train-images-idx3-ubyte.gz": (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
            ),
            "train-labels-idx1-ubyte.gz": (
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
            ),
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),  # torchvision's mirror
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
}

DEFAULT_DATASET = "fashion-mnist"


def _spec(name: str) -> NamedDataset:
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset. Expected one of: {', '.join(DATASETS)} (or a folder of IDX files "
            f"with --data DIR). Received: {name!r}"
        )
    return DATASETS[key]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(
            f"split must be one of {', '.join(repr(s) for s in SPLITS)} (a validation split is "
            f"held out of 'train' by Dataset.stratified_split). Received: split={split!r}"
        )


def cache_dir(name: str | None = None) -> Path:
    """The user cache folder for the named datasets (for ``name``'s files, when given).

    ``$CLASSIC_CNN_CACHE`` when set, else ``pooch.os_cache("classic-cnn")`` (e.g.
    ``~/.cache/classic-cnn`` on Linux).
    """
    base = os.environ.get(ENV_CACHE)
    if base:
        root = Path(base).expanduser()
    else:
        import pooch  # imported here: `cnn --help` should not pay for it

        root = Path(pooch.os_cache("classic-cnn"))
    return root / _spec(name).name if name is not None else root


def system_dir(name: str) -> Path:
    """Where a system package installs ``name``: ``/usr/share/datasets/<name>`` (Debian's
    ``dataset-fashion-mnist``), or ``$CLASSIC_CNN_SYSTEM_DATA/<name>`` when that is set."""
    base = os.environ.get(ENV_SYSTEM)
    return (Path(base).expanduser() if base else SYSTEM_DATA_DIR) / _spec(name).name


def _split_in(folder: Path, spec: NamedDataset, split: str) -> tuple[Path, Path] | None:
    """The split's (images, labels) paths in ``folder``, gzipped or not; None if either lacks."""
    found = []
    for fname in spec.split_files(split):
        for candidate in (fname, fname.removesuffix(".gz")):
            if (folder / candidate).is_file():
                found.append(folder / candidate)
                break
        else:
            return None
    return found[0], found[1]


def _places(spec: NamedDataset, data_dir=None) -> list[tuple[str, Path]]:
    """The folders looked in, in order, each with the name of its kind."""
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        return [("data_dir", data_dir), ("data_dir", data_dir / spec.name)]
    return [("cache", cache_dir(spec.name)), ("system", system_dir(spec.name))]


def _locate(spec: NamedDataset, split: str, data_dir=None):
    """``(kind, folder, images_path, labels_path)`` of the first folder holding the split."""
    for kind, folder in _places(spec, data_dir):
        paths = _split_in(folder, spec, split)
        if paths:
            return kind, folder, *paths
    return None


def _how_to_get(spec: NamedDataset) -> str:
    files = ", ".join(spec.files.values())
    ways = []
    if spec.debian_package:
        ways.append(
            f"  - sudo apt-get install {spec.debian_package}   (Debian/Ubuntu; installs into "
            f"{SYSTEM_DATA_DIR / spec.name})"
        )
    ways += [
        f"  - cnn data fetch {spec.name}   (downloads into the cache folder, SHA-256 verified)",
        f"  - copy the IDX files ({files}) into the cache folder {cache_dir(spec.name)}",
        "  - point at a folder that holds them: --data DIR (data_dir=DIR in Python)",
    ]
    return "To get it, any one of:\n" + "\n".join(ways)


def _not_found(spec: NamedDataset, split: str, data_dir, why: str) -> DatasetNotFound:
    wanted = " and ".join(spec.split_files(split))
    looked = "\n".join(
        f"  - {kind}: {folder}" + ("" if folder.is_dir() else " (no such folder)")
        for kind, folder in _places(spec, data_dir)
    )
    return DatasetNotFound(
        f"dataset {spec.name!r} ({split} split) not found: expected {wanted} (gzipped or not) "
        f"in one of:\n{looked}\n{why}\n{_how_to_get(spec)}"
    )


class _RichDownloadBar:
    """The tqdm-like object pooch drives (``total``, ``update``, ``reset``, ``close``), drawn
    with rich, which the project already depends on (pooch's own bar needs tqdm)."""

    def __init__(self, description: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._progress.add_task(description, total=None)
        self._total = None
        self._started = False

    @property
    def total(self):
        return self._total

    @total.setter
    def total(self, value):
        # pooch sets the total once the response arrives: start drawing then, after its log line
        self._total = value or None  # 0 means the server sent no Content-Length
        self._progress.update(self._task, total=self._total)
        if not self._started:
            self._progress.start()
            self._started = True

    def update(self, n):
        self._progress.advance(self._task, n)

    def reset(self):
        self._progress.reset(self._task, total=self._total)

    def close(self):
        if self._started:
            self._progress.stop()
            self._started = False


def _mirrors(spec: NamedDataset) -> list[str]:
    override = os.environ.get(ENV_MIRROR)
    if override:
        return [override.replace("{name}", spec.name)]
    return list(spec.mirrors)


def _download(spec: NamedDataset, filenames, folder: Path) -> None:
    """Download ``filenames`` into ``folder`` with pooch, each checked against its SHA-256.

    Mirrors are tried in order for each file; a network failure moves on to the next one, and
    so does a checksum mismatch (pooch has already deleted that file: it downloads to a
    temporary name in ``folder`` and moves it into place only once the sum matches).
    Raises ``DatasetNotFound`` (unknown sums, every mirror unreachable) or ``ChecksumMismatch``.
    """
    unknown = [f for f in filenames if not spec.sha256.get(f)]
    if unknown:
        raise DatasetNotFound(
            f"download refused: no SHA-256 sum is known for {', '.join(unknown)} of "
            f"{spec.name!r}, and an unverified download is never used"
        )
    import pooch
    import requests

    for fname in filenames:
        failures, mismatches = [], []
        for base in _mirrors(spec):
            url = base.rstrip("/") + "/" + fname
            bar, downloader = None, None  # other protocols: pooch's own downloader, no bar
            if url.startswith(("http://", "https://")):
                bar = _RichDownloadBar(fname) if sys.stderr.isatty() else None
                downloader = pooch.HTTPDownloader(
                    progressbar=bar or False, chunk_size=1 << 16, timeout=_DOWNLOAD_TIMEOUT_S
                )
            try:
                pooch.retrieve(
                    url,
                    known_hash=f"sha256:{spec.sha256[fname]}",
                    fname=fname,
                    path=folder,
                    downloader=downloader,
                )
                break
            except ValueError as e:
                if "hash" not in str(e).lower():
                    raise
                mismatches.append(f"{url}: {e}")
            except (requests.exceptions.RequestException, OSError) as e:
                failures.append(f"{url}: {type(e).__name__}: {e}")
            finally:
                if bar is not None:
                    bar.close()
        else:
            if mismatches:
                raise ChecksumMismatch(
                    f"the download of {fname} for {spec.name!r} does not have the expected "
                    f"SHA-256 {spec.sha256[fname]}; the file was deleted, nothing of it is kept in "
                    f"{folder}.\n" + "\n".join(mismatches + failures) + "\nThe mirror may serve a "
                    f"different or damaged file: try again, set {ENV_MIRROR} to another mirror, "
                    "or use --data DIR with files you trust."
                )
            raise DatasetNotFound("download failed:\n" + "\n".join(f"  {f}" for f in failures))


def load_dataset(
    name: str = DEFAULT_DATASET, split: str = "train", data_dir=None, download: bool = True
) -> Dataset:
    """Load a split of a named dataset, looking for it where the module docstring says.

    Parameters
    ----------
    name : str
        ``"fashion-mnist"`` or ``"mnist"``.
    split : str
        ``"train"`` (60,000 images) or ``"test"`` (10,000).
    data_dir : str or os.PathLike, optional
        A folder holding the IDX files (directly or in ``<name>/``); when given, the only place
        looked in.
    download : bool
        Download into the cache folder when found nowhere (the default).

    Returns
    -------
    Dataset
        uint8 images ``N×28×28×1``, labels ``(N,)``, the class names, ``source`` the folder.

    Raises
    ------
    ValueError
        Unknown name or split, or malformed files (``IDXError``).
    DatasetNotFound
        Found nowhere and not downloadable; the message says how to get it.
    ChecksumMismatch
        A downloaded file was not the expected one (it was deleted).
    """
    spec = _spec(name)
    _check_split(split)
    found = _locate(spec, split, data_dir)
    if found is None:
        if data_dir is not None:
            raise _not_found(spec, split, data_dir, "(only --data DIR is looked in when given)")
        if not download:
            raise _not_found(spec, split, None, "Download not attempted (download=False).")
        folder = cache_dir(spec.name)
        try:
            _download(spec, spec.split_files(split), folder)
        except DatasetNotFound as e:
            raise _not_found(spec, split, None, str(e)) from None
        found = _locate(spec, split)
    _, folder, images_path, labels_path = found
    return load_idx_pair(
        images_path,
        labels_path,
        spec.classes,
        name=spec.name,
        source=str(folder),
        split=split,
        background=spec.background,
    )


def fetch(name: str = DEFAULT_DATASET) -> Path:
    """Download all of ``name``'s files into the cache folder (verified); return that folder.

    Files already there with the right SHA-256 are not downloaded again.
    """
    spec = _spec(name)
    folder = cache_dir(spec.name)
    try:
        _download(spec, list(spec.files.values()), folder)
    except DatasetNotFound as e:
        raise DatasetNotFound(f"could not fetch {spec.name!r}: {e}\n{_how_to_get(spec)}") from None
    return folder


def dataset_status(data_dir=None) -> list[dict]:
    """Where each named dataset is (for ``cnn data list``).

    Returns one dict per dataset: ``name``, ``description``, ``classes`` (count), ``status``
    (``"found"``: both splits, ``"partial"`` or ``"missing"``), ``where`` and ``path`` (the kind
    — ``"data_dir"``, ``"cache"`` or ``"system"`` — and folder of the first split found, else
    None), ``splits`` (split → kind or None), ``cache`` (the folder downloads go to) and
    ``downloadable`` (every SHA-256 is known).
    """
    rows = []
    for spec in DATASETS.values():
        splits, where, path = {}, None, None
        for split in SPLITS:
            found = _locate(spec, split, data_dir)
            splits[split] = found[0] if found else None
            if found and where is None:
                where, path = found[0], str(found[1])
        n_found = sum(v is not None for v in splits.values())
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "classes": len(spec.classes),
                "status": "found"
                if n_found == len(SPLITS)
                else "partial"
                if n_found
                else "missing",
                "where": where,
                "path": path,
                "splits": splits,
                "cache": str(cache_dir(spec.name)),
                "downloadable": all(spec.sha256.get(f) for f in spec.files.values()),
            }
        )
    return rows
