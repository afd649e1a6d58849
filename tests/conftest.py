"""Shared helpers for the tests: finite differences and the relative-error measure."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

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


@contextlib.contextmanager
def serving(args, cwd=None):
    """A real ``cnn serve`` process (``args``: what follows ``cnn``, ``--port 0`` added) on a
    free loopback port, answering ``/api/summary``; yields ``(base URL, process)`` and stops
    it afterwards."""
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "classic_cnn.cli", *map(str, args), "--port", "0"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert found, line
        url = found.group(0)
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(url + "api/summary", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                assert time.time() < deadline, "the server did not answer"
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
