"""Named architectures and architecture files.

A preset is a function of the number of classes returning ``(layers, input_shape)``. An
architecture file is JSON or TOML holding ``input_shape`` (optional) and a list of layers, each
a table with ``type`` and the layer's arguments::

    input_shape = [28, 28, 1]

    [[layers]]
    type = "Conv2D"
    filters = 6
    kernel_size = 5
    padding = "same"

    [[layers]]
    type = "ReLU"
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .init import INITIALIZERS
from .layers import (
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    Layer,
    MaxPool2D,
    ReLU,
    layer_from_config,
)
from .model import Sequential


def _lenet_features(first_padding: str) -> list[Layer]:
    """LeNet's feature extractor: 6 then 16 kernels of 5×5, each followed by ReLU and 2×2 max
    pooling, flattened for the fully connected layers."""
    return [
        Conv2D(6, 5, padding=first_padding),
        ReLU(),
        MaxPool2D(2),
        Conv2D(16, 5),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
    ]


def lenet5(classes: int = 10):
    """LeNet-5 with ReLU and max pooling, for 28×28×1 images ('same' first conv, as the
    28×28 digits were padded to LeNet's 32×32), then dense 120, 84 and the classes."""
    return [
        *_lenet_features("same"),
        Dense(120),
        ReLU(),
        Dense(84),
        ReLU(),
        Dense(classes),
    ], (28, 28, 1)


def tinyvgg(classes: int = 10):
    """CNN Explainer's TinyVGG: 64×64×3 input, two blocks of two 3×3 convolutions with 10
    filters, each block ending in 2×2 max pooling, then one dense layer."""

    def block():
        return [Conv2D(10, 3), ReLU(), Conv2D(10, 3), ReLU(), MaxPool2D(2)]

    return [*block(), *block(), Flatten(), Dense(classes)], (64, 64, 3)


def article(classes: int = 10):
    """The article's network: a 32×32×3 input, 5×5×3 kernels (28×28 feature maps), an activation
    after each convolution, max pooling, and a fully connected layer giving the 10 classes.
    Grayscale 28×28 data is padded to 32×32 and repeated into three channels."""
    return [*_lenet_features("valid"), Dense(classes)], (32, 32, 3)


def small(classes: int = 10):
    """The default: two 5×5 convolution blocks with batch norm, dropout and a 128-unit dense
    layer. Reaches about 91% on Fashion-MNIST in a few minutes on two CPU cores."""
    return [
        Conv2D(16, 5, padding="same", use_bias=False),
        BatchNorm(),
        ReLU(),
        MaxPool2D(2),
        Conv2D(32, 5, use_bias=False),
        BatchNorm(),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dropout(0.3),
        Dense(128),
        ReLU(),
        Dense(classes),
    ], (28, 28, 1)


def fashion(classes: int = 10):
    """The strong Fashion-MNIST network, classic parts only: two blocks of two 3×3 convolutions
    (32, then 64 filters) with batch norm and ReLU, each block ending in 2×2 max pooling and
    dropout, then dense 256 with dropout. Train it with augmentation (shifts of 2 pixels; flips
    lost on the validation split, see README "Accuracy") and a one-cycle schedule."""

    def block(filters):
        return [
            Conv2D(filters, 3, padding="same", use_bias=False),
            BatchNorm(),
            ReLU(),
            Conv2D(filters, 3, padding="same", use_bias=False),
            BatchNorm(),
            ReLU(),
            MaxPool2D(2),
            Dropout(0.25),
        ]

    return [
        *block(32),
        *block(64),
        Flatten(),
        Dense(256),
        ReLU(),
        Dropout(0.5),
        Dense(classes),
    ], (28, 28, 1)


PRESETS = {
    "small": small,
    "lenet5": lenet5,
    "tinyvgg": tinyvgg,
    "article": article,
    "fashion": fashion,
}
DEFAULT_PRESET = "small"


class ArchitectureError(ValueError):
    """An architecture file that cannot be built; the message names the file, line and layer."""


def build(
    arch: str,
    classes: int = 10,
    input_shape=None,
    seed: int | None = 0,
    kernel_initializer: str | None = None,
) -> Sequential:
    """A model from a preset name or an architecture file path.

    ``input_shape`` overrides the preset's or file's (e.g. TinyVGG on 28×28×1 data);
    ``kernel_initializer`` (one of ``init.INITIALIZERS``) the initialisation of a preset's
    convolution and dense kernels.
    """
    if kernel_initializer is not None and kernel_initializer not in INITIALIZERS:
        raise ValueError(
            f"kernel_initializer must be one of {INITIALIZERS}. "
            f"Received: kernel_initializer={kernel_initializer!r}"
        )
    if arch in PRESETS:
        layers, shape = PRESETS[arch](classes)
        _set_initializer(layers, kernel_initializer)
        return Sequential(layers, input_shape or shape, seed=seed, name=arch)
    path = Path(arch)
    if path.suffix.lower() not in (".json", ".toml") or not path.exists():
        raise ValueError(
            f"unknown architecture {arch!r}: expected a preset ({', '.join(PRESETS)}) or an "
            f"existing .json or .toml file. Received: {arch!r}"
        )
    layers, shape = read_architecture(path)
    _set_initializer(layers, kernel_initializer)
    shape = input_shape or shape
    if shape is None:
        raise ArchitectureError(f"{path}: no input_shape given (e.g. input_shape = [28, 28, 1])")
    try:
        return Sequential(layers, shape, seed=seed, name=path.stem)
    except ValueError as exc:
        raise ArchitectureError(f"{path}: {exc}") from None


def _set_initializer(layers: list[Layer], name: str | None) -> None:
    if name is not None:
        for layer in layers:
            if hasattr(layer, "kernel_initializer"):
                layer.kernel_initializer = name


def read_architecture(path: Path) -> tuple[list[Layer], tuple | None]:
    """Parse a JSON or TOML architecture file into layers; errors name the line and layer."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArchitectureError(
                f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})"
            ) from None
        if isinstance(data, list):
            data = {"layers": data}
        starts = [m.start() for m in re.finditer(r"\{", text)][1 if "layers" in text else 0 :]
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ArchitectureError(f"{path}: invalid TOML ({exc})") from None
        starts = [m.start() for m in re.finditer(r"^[ \t]*\[\[[ \t]*layers[ \t]*\]\]", text, re.M)]
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or not data["layers"]:
        raise ArchitectureError(f"{path}: expected a non-empty list 'layers' of layer tables")

    def line_of(i: int) -> int:
        return text.count("\n", 0, starts[i]) + 1 if i < len(starts) else 0

    layers = []
    for i, spec in enumerate(data["layers"]):
        where = f"{path}, line {line_of(i)}, layer {i + 1}"
        if not isinstance(spec, dict) or "type" not in spec:
            raise ArchitectureError(f"{where}: each layer needs a 'type'. Received: {spec!r}")
        config = {k: v for k, v in spec.items() if k != "type"}
        try:
            layers.append(layer_from_config({"class_name": spec["type"], "config": config}))
        except ValueError as exc:
            raise ArchitectureError(f"{where} ({spec['type']}): {exc}") from None
    shape = data.get("input_shape")
    return layers, (tuple(shape) if shape is not None else None)
