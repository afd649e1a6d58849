"""Shared helpers for the tests: finite differences and the relative-error measure."""

from __future__ import annotations

import os

import numpy as np
import pytest

#: examples per fuzz test; CI runs this bounded count, CLASSIC_CNN_FUZZ_EXAMPLES=20000 runs longer
FUZZ_EXAMPLES = int(os.environ.get("CLASSIC_CNN_FUZZ_EXAMPLES", "150"))


def rel_error(a, n) -> float:
    """``max|a − n| / max(max|a|, max|n|, 1e-8)``, the measure the issue fixes."""
    a, n = np.asarray(a, np.float64), np.asarray(n, np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0), 1e-8)
    return float(np.abs(a - n).max(initial=0.0) / scale)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function f at x (x is nudged in place, then restored)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
