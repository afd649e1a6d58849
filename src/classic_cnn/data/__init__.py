"""Where images come from: IDX files, named datasets, folders of images, arrays."""

from .dataset import Dataset
from .idx import IDXError, load_idx_pair, read_idx, write_idx
from .named import (
    DATASETS,
    DEFAULT_DATASET,
    ChecksumMismatch,
    DatasetError,
    DatasetNotFound,
    cache_dir,
    dataset_status,
    fetch,
    load_dataset,
)

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "ChecksumMismatch",
    "Dataset",
    "DatasetError",
    "DatasetNotFound",
    "IDXError",
    "cache_dir",
    "dataset_status",
    "fetch",
    "load_dataset",
    "load_idx_pair",
    "read_idx",
    "write_idx",
]
