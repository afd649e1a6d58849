"""A dataset in memory: uint8 images N×H×W×C, integer labels and the class names."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Dataset:
    """Images as stored (uint8 0–255, N×H×W×C), labels (N,) in ``[0, len(classes))``.

    ``name`` says what it is (``"fashion-mnist"``, a folder's name); ``source`` where it came
    from (a folder or file path); ``split`` is ``"train"``, ``"test"``, ``"val"`` or ``""``.
    ``background`` is the polarity of the images: ``"dark"`` (light objects on black, as MNIST and
    Fashion-MNIST) or ``"light"`` (most photos).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str = ""
    source: str = ""
    split: str = ""
    background: str = "dark"
    notes: list[str] = field(default_factory=list)  # what was skipped while loading, and why

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim == 3:  # N×H×W grayscale: add the channel axis
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"images must be N×H×W×C. Received: shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (0–255). Received: dtype {images.dtype}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"expected one label per image ({len(images)}). Received: labels of shape "
                f"{labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must be in [0, {len(self.classes) - 1}] for {len(self.classes)} classes. "
                f"Received: labels from {labels.min()} to {labels.max()}"
            )
        if self.background not in ("dark", "light"):
            raise ValueError(f"background must be 'dark' or 'light'. Received: {self.background!r}")
        self.images, self.labels = images, labels.astype(np.int64, copy=False)
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index, split: str | None = None) -> Dataset:
        """The images at ``index`` (an index array, a slice or a boolean mask)."""
        return Dataset(
            self.images[index],
            self.labels[index],
            list(self.classes),
            self.name,
            self.source,
            self.split if split is None else split,
            self.background,
            list(self.notes),
        )

    def take(self, n: int) -> Dataset:
        """The first ``n`` images (all if there are fewer)."""
        return self.subset(slice(0, n))

    def stratified_split(self, n_val: int | float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Hold out ``n_val`` images (a count, or a fraction < 1) as a validation set.

        Each class keeps the same share in both parts (up to rounding); which images go where is
        decided by ``seed`` alone. Returns ``(train, val)``, both in the original order.
        """
        n = len(self)
        count = round(n_val * n) if isinstance(n_val, float) and n_val < 1 else int(n_val)
        if not 0 < count < n:
            raise ValueError(
                f"the validation split must leave images on both sides of {n}. "
                f"Received: n_val={n_val!r}"
            )
        rng = np.random.default_rng(seed)
        classes = np.unique(self.labels)
        per_class = {c: np.flatnonzero(self.labels == c) for c in classes}
        # largest-remainder apportionment of `count` over the classes by their share
        exact = np.array([len(per_class[c]) * count / n for c in classes])
        take = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - take), kind="stable")[: count - take.sum()]:
            take[i] += 1
        val_idx = np.concatenate(
            [rng.permutation(per_class[c])[:k] for c, k in zip(classes, take, strict=True)]
        )
        mask = np.zeros(n, dtype=bool)
        mask[val_idx] = True
        return self.subset(~mask, "train"), self.subset(mask, "val")

    def __repr__(self):
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, classes={len(self.classes)})"
        )
