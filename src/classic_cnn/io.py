"""Model files: one ``.safetensors`` file holds a whole usable model.

The tensors are the model's parameters and buffers (no pickle, nothing executed on load). The
metadata (strings, JSON where structured) holds the format and its version, the architecture,
the input shape, the class names, the preprocessing (size, colour, normalisation, background
polarity), the dataset's name and split seed, the hyperparameters and the final metrics.
Writes are atomic: a temporary file in the same folder, flushed to disk, then renamed over the
target, so a crash never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .model import Sequential

FORMAT = "classic-cnn"
FORMAT_VERSION = 1
JSON_KEYS = ("architecture", "classes", "preprocessing", "dataset", "hyperparameters", "metrics")


class ModelFileError(ValueError):
    """A file that is not a usable classic-cnn model; the message says why."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OSError(f"cannot write {path}: its parent {parent} is a file, not a folder")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        kept = "the existing file is unchanged" if path.exists() else "nothing was written"
        raise OSError(exc.errno, f"could not write {path} ({exc.strerror or exc}); {kept}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model: Sequential, path, *, dataset=None, hyperparameters=None, metrics=None) -> Path:
    """Save ``model`` with its classes and preprocessing, then load it back and check that it
    predicts the same on a probe batch (raising if not). Returns the path."""
    from safetensors.numpy import save as st_save

    path = Path(path)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "architecture": model.get_config(),
        "classes": model.classes,
        "preprocessing": model.preprocessing.to_dict() if model.preprocessing else None,
        "dataset": dataset or model.metadata.get("dataset"),
        "hyperparameters": hyperparameters or model.metadata.get("hyperparameters"),
        "metrics": metrics or model.metadata.get("metrics"),
    }
    from . import __version__

    meta["classic_cnn_version"] = __version__
    strings = {k: (json.dumps(v) if k in JSON_KEYS else str(v)) for k, v in meta.items()}
    tensors = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    atomic_write_bytes(path, st_save(tensors, metadata=strings))
    probe = np.random.default_rng(0).random((4, *model.input_shape)).astype(model.dtype)
    again = load(path)
    if not np.array_equal(again.forward(probe), model.forward(probe)):
        raise ModelFileError(f"{path}: the saved model does not predict as the original")
    return path


def load(path) -> Sequential:
    """Load a model file written by :func:`save`: the model, with ``classes``,
    ``preprocessing`` and ``metadata`` set."""
    from safetensors import SafetensorError, safe_open

    from .data.batches import Preprocessing

    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: a folder, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            strings = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        hint = ""
        if path.suffix.lower() == ".onnx":
            hint = f"; an ONNX file becomes one with: cnn import {path} --out MODEL.safetensors"
        raise ModelFileError(
            f"{path}: not a safetensors model file ({str(exc).splitlines()[0][:120]}){hint}"
        ) from None
    if strings.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: a safetensors file, but not a classic-cnn model (metadata 'format' is "
            f"{strings.get('format')!r}, expected {FORMAT!r})"
        )
    version = strings.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version!r}; this classic-cnn reads versions up to "
            f"{FORMAT_VERSION} (upgrade classic-cnn to read it)"
        )
    try:
        meta = {k: (json.loads(v) if k in JSON_KEYS else v) for k, v in strings.items()}
        config = meta["architecture"]
        _check_tensors(config, tensors)  # before building: nothing hostile gets allocated
        model = Sequential.from_config(config)
        model.load_state_dict(tensors)
        classes = meta.get("classes")
        if classes is not None and (
            not isinstance(classes, list)
            or not all(isinstance(c, str) for c in classes)
            or len(classes) != model.output_shape[-1]
        ):
            raise ValueError(
                f"'classes' must list {model.output_shape[-1]} names. Received: {classes!r}"[:300]
            )
        model.classes = classes
        if meta.get("preprocessing"):
            model.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ModelFileError(f"{path}: the model cannot be rebuilt ({exc})"[:500]) from None
    model.metadata = meta
    return model


def _check_tensors(config, tensors: dict[str, np.ndarray]) -> None:
    """The file's tensors must be exactly the architecture's, in shape, with float dtypes."""
    from .model import expected_tensors

    if not isinstance(config, dict):
        raise ValueError(f"'architecture' must be a model config. Received: {config!r}"[:300])
    expected = expected_tensors(config)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"the weights do not match the architecture: missing {missing}, unexpected {extra}"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"weight {name!r} should have shape {tuple(shape)}. "
                f"Received: shape {tuple(t.shape)}"
            )
        if t.dtype.kind != "f":
            raise ValueError(f"weight {name!r} must be floating point. Received: dtype {t.dtype}")
