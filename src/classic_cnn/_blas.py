"""The matrix products of the im2col convolutions and the dense layers.

NumPy's ``matmul`` runs them on the BLAS NumPy ships (OpenBLAS). Where Intel's oneMKL is
installed too (the ``mkl`` extra: ``pip install 'classic-cnn[mkl]'``, as ``make`` does on
x86-64), float32 products can go to its ``cblas_sgemm`` instead, one thread per call (its
sequential layer; the engine splits the work over its own threads, see
``ops.engine_threads``).

Which of the two computes them is chosen per machine by measurement, not by the CPU's vendor:
on the first product, both multiply the shapes of the ``fashion`` preset's layers on one
thread (about 0.1 s), and the faster wins; the choice is kept in ``blas-choice.json`` in the
cache folder (``$CLASSIC_CNN_CACHE`` or ``~/.cache/classic-cnn``), one entry per CPU, library
versions and kernel settings, so later processes on the same machine make the same choice
(and give the same bits). On an Intel Xeon (AVX-512) oneMKL measured 10-45% more GFLOP/s than
OpenBLAS on these shapes; on AMD CPUs oneMKL may take a slower path, and OpenBLAS's own
kernel may win. ``CLASSIC_CNN_BLAS=numpy`` or ``=mkl`` in the environment skips the
measurement and uses that library. Nothing is loaded at import (start-up stays fast).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import threading
import time

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


#: the shapes (M, K, N) of the products timed to choose the library: the fashion preset's
#: second convolution on a piece of 4 images (patches · kernels, and its weight gradient with
#: a transposed operand) and its first dense layer at batch 64
CHOICE_SHAPES = ((3136, 288, 32), (288, 3136, 32), (64, 3136, 256))
#: a library must be this much faster to be chosen over oneMKL (measurements jitter)
CHOICE_MARGIN = 1.03
_MKL_BRANCHES = {4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2"}
_MKL_BRANCHES.update({11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"})


def _load_mkl():
    """``(library, cblas_sgemm)`` of oneMKL set to its sequential layer, or None."""
    path = _find_mkl()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        # before any other call: one thread per product, no OpenMP runtime needed
        lib.MKL_Set_Threading_Layer(ctypes.c_int(_SEQUENTIAL))
        sgemm = lib.cblas_sgemm
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        sgemm.restype = None
    except (OSError, AttributeError):
        return None
    _STATE["path"] = path
    return lib, sgemm


def _load():
    """oneMKL's ``cblas_sgemm`` when it computes the float32 products, else None (not
    installed, asked for NumPy's BLAS, measured slower, or failing to load)."""
    with _LOCK:
        if "sgemm" in _STATE:
            return _STATE["sgemm"]
        asked = os.environ.get("CLASSIC_CNN_BLAS", "").strip().lower()
        loaded = None if asked == "numpy" else _load_mkl()
        if loaded is None:
            why = "asked (CLASSIC_CNN_BLAS=numpy)" if asked == "numpy" else "oneMKL not installed"
            choice = {"backend": "numpy", "how": why}
        elif asked == "mkl":
            choice = {"backend": "mkl", "how": "asked (CLASSIC_CNN_BLAS=mkl)"}
        else:
            choice = _remembered_choice(loaded[1])
        if loaded is not None:
            try:
                branch = int(loaded[0].mkl_cbwr_get_auto_branch())
                choice["mkl_code_path"] = _MKL_BRANCHES.get(branch, str(branch))
            except (AttributeError, OSError):
                pass
        _STATE["choice"] = choice
        _STATE["sgemm"] = loaded[1] if loaded and choice["backend"] == "mkl" else None
        return _STATE["sgemm"]


def backend() -> str:
    """Which library computes float32 products: ``"mkl"`` or ``"numpy"``."""
    return "mkl" if _load() is not None else "numpy"


def choice() -> dict:
    """How the library was chosen: ``backend``, ``how`` (asked, measured now, remembered,
    not installed), and where measured ``gflops`` of each; oneMKL's ``mkl_code_path``."""
    _load()
    return dict(_STATE["choice"])


def _fingerprint() -> str:
    """This machine as far as the choice goes: the CPU (model and feature flags), the two
    libraries' versions and the settings that change their kernels."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        cpu = "|".join(
            next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags")
        )
    except OSError:
        cpu = platform.processor()
    from importlib import metadata

    versions = []
    for dist in ("numpy", "mkl"):
        try:
            versions.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            versions.append("")
    env = [os.environ.get(k, "") for k in ("OPENBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS")]
    text = json.dumps([platform.machine(), cpu, versions, env, CHOICE_SHAPES])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _choice_file():
    from .data.named import cache_dir

    return cache_dir() / "blas-choice.json"


def _remembered_choice(sgemm) -> dict:
    """The choice recorded for this machine in the cache file, or measured now and recorded
    (a file that cannot be read or written is measured around, never an error)."""
    key, path, known = _fingerprint(), None, {}
    try:
        path = _choice_file()
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    known = known if isinstance(known, dict) else {}
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("backend") in ("mkl", "numpy"):
        return {**entry, "how": f"remembered from {path}"}
    entry = measure_products(sgemm)
    try:
        from .io import atomic_write_bytes

        known[key] = entry
        atomic_write_bytes(path, json.dumps(known, indent=1).encode())
    except (OSError, ValueError, TypeError):
        pass
    return {**entry, "how": "measured now"}


def measure_products(sgemm, repeats: int = 5) -> dict:
    """GFLOP/s of oneMKL (``sgemm``) and of NumPy's BLAS on :data:`CHOICE_SHAPES`, one thread
    each, the best of ``repeats`` per shape, taken in turns; the faster is the backend (oneMKL
    unless NumPy's BLAS is :data:`CHOICE_MARGIN` times faster)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    cases = []
    for m, k, n in CHOICE_SHAPES:
        a = rng.random((m, k), dtype=np.float32)
        if m < k:  # a transposed operand, as in a weight gradient
            a = np.ascontiguousarray(a.T).T
        cases.append((a, rng.random((k, n), dtype=np.float32), np.empty((m, n), np.float32)))
    best = {"mkl": [np.inf] * len(cases), "numpy": [np.inf] * len(cases)}
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(repeats + 1):  # the first round warms up both
            for name, lib in (("mkl", sgemm), ("numpy", None)):
                for i, (a, b, out) in enumerate(cases):
                    t = time.perf_counter()
                    _product(a, b, out, lib)
                    best[name][i] = min(best[name][i], time.perf_counter() - t)
    flops = sum(2.0 * m * k * n for m, k, n in CHOICE_SHAPES)
    gflops = {name: flops / sum(times) / 1e9 for name, times in best.items()}
    chosen = "numpy" if gflops["numpy"] > CHOICE_MARGIN * gflops["mkl"] else "mkl"
    return {"backend": chosen, "gflops": {k: round(v, 2) for k, v in gflops.items()}}


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


def gemm_address(dtype) -> int | None:
    """The address of the ``cblas_sgemm`` that computes this process's float32 products when
    it is oneMKL's (for compiled code to call it directly, see ``_kernels._gemm``); None for
    other dtypes or when NumPy's BLAS computes them."""
    if np.dtype(dtype) != np.float32:
        return None
    sgemm = _STATE["sgemm"] if "sgemm" in _STATE else _load()
    return None if sgemm is None else ctypes.cast(sgemm, ctypes.c_void_p).value


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
        return _product(a, b, out, _STATE["sgemm"] if "sgemm" in _STATE else _load())
    return np.matmul(a, b, out=out)


def _product(a: np.ndarray, b: np.ndarray, out: np.ndarray, sgemm) -> np.ndarray:
    """:func:`matmul` of float32 2-D arrays whose shapes fit, on oneMKL's ``sgemm`` or, when
    it is None, on NumPy's BLAS."""
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
