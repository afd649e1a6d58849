"""Weight initialisation from an explicit ``np.random.Generator``.

``fan_in`` is the number of inputs that feed one output (KH·KW·C_in for a kernel, ``in`` for a
dense layer); ``fan_out`` the number of outputs one input feeds (KH·KW·C_out, ``out``).

- He (Kaiming), for ReLU networks: variance ``2 / fan_in``.
- Glorot (Xavier), for tanh / sigmoid networks: variance ``2 / (fan_in + fan_out)``.
- Fan-in uniform: U(−1/√fan_in, 1/√fan_in), variance ``1 / (3·fan_in)``: PyTorch's default
  for ``nn.Conv2d`` and ``nn.Linear`` kernels; its standard deviation is 1/√6 of He's. In
  front of batch norm, whose output does not depend on the kernel's scale, smaller kernels take
  relatively larger steps for the same learning rate.

The normal variants draw from N(0, std²); the uniform ones from U(−limit, limit) with
``limit = sqrt(3)·std``, which has the same variance.
"""

from __future__ import annotations

import numpy as np

INITIALIZERS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "fan_in_uniform")


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel ``KH×KW×C_in×C_out`` or a dense weight ``in×out``."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def initialize(name: str, shape: tuple[int, ...], rng: np.random.Generator, dtype) -> np.ndarray:
    """Draw a weight array of ``shape`` with the named scheme."""
    if name not in INITIALIZERS:
        raise ValueError(f"initializer must be one of {INITIALIZERS}. Received: {name!r}")
    fan_in, fan_out = fans(shape)
    if name == "fan_in_uniform":
        limit = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-limit, limit, size=shape).astype(dtype)
    var = 2.0 / fan_in if name.startswith("he") else 2.0 / (fan_in + fan_out)
    std = np.sqrt(var)
    if name.endswith("normal"):
        w = rng.normal(0.0, std, size=shape)
    else:
        limit = np.sqrt(3.0) * std
        w = rng.uniform(-limit, limit, size=shape)
    return w.astype(dtype)
