"""The matrix products of the im2col convolutions and the dense layers.

NumPy's ``matmul`` runs them on the BLAS NumPy ships (OpenBLAS). Where Intel's oneMKL is
installed (the ``mkl`` extra: ``pip install 'classic-cnn[mkl]'``, as ``make`` does on x86-64),
float32 products go to its ``cblas_sgemm`` instead, one thread per call (its sequential
layer; the engine splits the work over its own threads, see ``ops.engine_threads``). Measured
on the fashion preset's convolution shapes, one thread: 10-45% more GFLOP/s than OpenBLAS;
a whole training step at batch 64, 2 threads: 1.10x (``benchmarks/bench_engine.py``).

``CLASSIC_CNN_BLAS=numpy`` in the environment keeps every product on NumPy's BLAS. The
library is loaded on the first product, not at import (start-up stays fast).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

_LOCK = threading.Lock()
_STATE: dict = {}
_ROW, _TRANS = 111, 112  # CBLAS_TRANSPOSE: the matrix as stored, or transposed
_ROW_MAJOR = 101
_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL


def _find_mkl() -> str | None:
    """The path of oneMKL's single dynamic library (``libmkl_rt``) that the ``mkl`` package
    installed, or None."""
    from importlib import metadata

    try:
        files = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        name = f.name
        if name.startswith("libmkl_rt.so") or name == "mkl_rt.2.dll":
            path = str(f.locate())
            if os.path.exists(path):
                return path
    return None


def _load():
    """``cblas_sgemm`` of oneMKL set to its sequential layer, or None (not installed, turned
    off by ``CLASSIC_CNN_BLAS=numpy``, or failing to load)."""
    with _LOCK:
        if "sgemm" in _STATE:
            return _STATE["sgemm"]
        sgemm = None
        if os.environ.get("CLASSIC_CNN_BLAS", "").lower() != "numpy":
            path = _find_mkl()
            if path is not None:
                try:
                    lib = ctypes.CDLL(path)
                    # before any other call: one thread per product, no OpenMP runtime needed
                    lib.MKL_Set_Threading_Layer(ctypes.c_int(_SEQUENTIAL))
                    sgemm = lib.cblas_sgemm
                    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
                    sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
                    sgemm.restype = None
                    _STATE["path"] = path
                except (OSError, AttributeError):
                    sgemm = None
        _STATE["sgemm"] = sgemm
        return sgemm


def backend() -> str:
    """Which library computes float32 products: ``"mkl"`` or ``"numpy"``."""
    return "mkl" if _load() is not None else "numpy"


def _layout(a: np.ndarray, strict: bool = False) -> tuple[int, int] | None:
    """``(transpose flag, leading dimension)`` describing the 2-D array a to CBLAS (row-major),
    or None when its strides fit neither layout.

    strict: the rule NumPy's ``matmul`` applies before it hands a product to its BLAS (no
    allowance for a single row or column with another stride)."""
    rows, cols = a.shape
    item = a.itemsize
    s0, s1 = a.strides
    if s1 == item or (cols == 1 and not strict):  # rows stored one after another
        ld = cols if rows == 1 and not strict else s0 // item
        if ld >= max(cols, 1) and (rows == 1 or s0 % item == 0):
            return _ROW, ld
    if s0 == item or (rows == 1 and not strict):  # a transposed view: columns one after another
        ld = rows if cols == 1 and not strict else s1 // item
        if ld >= max(rows, 1) and (cols == 1 or s1 % item == 0):
            return _TRANS, ld
    return None


def _blas_ready(a: np.ndarray, strict: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """a itself with its CBLAS layout, or a contiguous copy of it where its strides fit none."""
    layout = _layout(a, strict)
    if layout is None:
        a = np.ascontiguousarray(a)
        layout = (_ROW, a.shape[1])
    return a, layout


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[...] = a @ b`` for 2-D a (M, K), b (K, N) and out (M, N): NumPy's ``matmul``
    numbers up to rounding (the sums may be added in another order).

    The library that computes a product, and so its bits, never depends on how the operands
    lie in memory: an operand whose strides fit no BLAS layout is copied to a contiguous array
    first (NumPy's ``matmul`` would otherwise add it up in its own loop, and the same product
    from a contiguous copy would go to BLAS: other bits on some CPUs), and a result that is not
    stored row by row is computed into one and copied.
    """
    if (
        a.dtype == b.dtype == out.dtype
        and a.dtype == np.float32
        and a.ndim == b.ndim == out.ndim == 2
        and a.size
        and b.size
        and a.shape[1] == b.shape[0]
        and out.shape == (a.shape[0], b.shape[1])
    ):  # anything else (float64 included): NumPy's matmul, which raises on shapes that do not fit
        sgemm = _STATE["sgemm"] if "sgemm" in _STATE else _load()
        strict = sgemm is None  # NumPy's own rule where NumPy's BLAS computes it
        a, la = _blas_ready(a, strict)
        b, lb = _blas_ready(b, strict)
        lc = _layout(out, strict)
        target = out if lc is not None and lc[0] == _ROW else np.empty(out.shape, out.dtype)
        lc = _layout(target, strict)
        if sgemm is not None:
            m, k = a.shape
            n = b.shape[1]
            sgemm(
                _ROW_MAJOR,
                la[0],
                lb[0],
                m,
                n,
                k,
                1.0,
                a.ctypes.data,
                la[1],
                b.ctypes.data,
                lb[1],
                0.0,
                target.ctypes.data,
                lc[1],
            )
        else:
            np.matmul(a, b, out=target)
        if target is not out:
            out[...] = target
        return out
    return np.matmul(a, b, out=out)
