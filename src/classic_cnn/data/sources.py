"""One entry point for the command line's ``--data``: a name, a folder of IDX files, or a
folder of images."""

from __future__ import annotations

from pathlib import Path

from .dataset import Dataset
from .named import DATASETS, load_dataset


def _has_idx_files(folder: Path) -> bool:
    return any(folder.glob("*-idx[13]-ubyte*")) or any(folder.glob("*/*-idx[13]-ubyte*"))


def load(data: str, split: str = "train", classes: list[str] | None = None) -> Dataset:
    """Load ``data`` for ``split`` ('train' or 'test').

    - a known name (``fashion-mnist``, ``mnist``): found or downloaded as
      :func:`~classic_cnn.data.named.load_dataset` says;
    - a folder of IDX files: read as Fashion-MNIST, or as MNIST when the folder's name says
      ``mnist`` without ``fashion`` (for the class names);
    - a folder of class sub-folders of images; if it holds ``train/`` and ``test/`` sub-folders,
      the one for ``split`` is used. ``classes`` fixes the class order (a model's).
    """
    if data in DATASETS:
        return load_dataset(data, split)
    path = Path(data)
    if not path.exists():
        raise ValueError(
            f"no dataset named {data!r} and no such folder; known datasets: "
            f"{', '.join(DATASETS)}; or give a folder of IDX files or of class sub-folders of "
            "images"
        )
    if not path.is_dir():
        raise ValueError(f"--data must be a dataset name or a folder. Received: the file {path}")
    if _has_idx_files(path):
        lowered = path.name.lower()
        name = "mnist" if "mnist" in lowered and "fashion" not in lowered else "fashion-mnist"
        return load_dataset(name, split, data_dir=path)
    from .images import load_image_folder

    if (path / "train").is_dir() and (path / "test").is_dir():
        path = path / split
    return load_image_folder(path, classes=classes)
