"""Where images come from: IDX files, named datasets, folders of images, arrays."""

from .dataset import Dataset

__all__ = ["Dataset"]
