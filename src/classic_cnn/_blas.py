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


def _layout(a: np.ndarray) -> tuple[int, int] | None:
    """``(transpose flag, leading dimension)`` describing the 2-D array a to CBLAS (row-major),
    or None when its strides fit neither layout."""
    rows, cols = a.shape
    item = a.itemsize
    s0, s1 = a.strides
    if cols == 1 or s1 == item:  # rows stored one after another
        ld = cols if rows == 1 else s0 // item
        if ld >= max(cols, 1) and (rows == 1 or s0 % item == 0):
            return _ROW, ld
    if rows == 1 or s0 == item:  # a transposed view: columns stored one after another
        ld = rows if cols == 1 else s1 // item
        if ld >= max(rows, 1) and (cols == 1 or s1 % item == 0):
            return _TRANS, ld
    return None


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[...] = a @ b`` for 2-D a (M, K), b (K, N) and out (M, N): NumPy's ``matmul``
    numbers up to rounding (the sums may be added in another order)."""
    if (
        a.dtype == b.dtype == out.dtype == np.float32
        and a.ndim == b.ndim == out.ndim == 2
        and a.size
        and b.size
    ):
        sgemm = _STATE["sgemm"] if "sgemm" in _STATE else _load()
        if sgemm is not None:
            la, lb = _layout(a), _layout(b)
            lc = _layout(out)
            if la and lb and lc and lc[0] == _ROW:
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
                    out.ctypes.data,
                    lc[1],
                )
                return out
    return np.matmul(a, b, out=out)
