"""The matrix products' library (classic_cnn/_blas.py): oneMKL where the ``mkl`` extra is
installed, NumPy's BLAS otherwise, the same products either way."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from classic_cnn import _blas

#: every test here checks bits: `make test` runs them again on the AVX2 kernels
pytestmark = pytest.mark.determinism


def _mkl_installed() -> bool:
    try:
        metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_the_installed_mkl_is_the_one_used():
    """Where ``pip install '.[mkl]'`` put oneMKL, float32 products go to it (unless turned off)."""
    if os.environ.get("CLASSIC_CNN_BLAS", "").lower() == "numpy":
        assert _blas.backend() == "numpy"
    elif _mkl_installed():
        assert _blas.backend() == "mkl"
        assert (
            "libmkl_rt" in os.path.basename(_blas._STATE["path"])
            or "mkl_rt" in (_blas._STATE["path"])
        )
    else:
        assert _blas.backend() == "numpy"


def _cases(rng, dtype):
    a = rng.normal(size=(37, 29)).astype(dtype)
    b = rng.normal(size=(29, 11)).astype(dtype)
    big = rng.normal(size=(40, 60)).astype(dtype)
    yield "row · row", a, b, np.empty((37, 11), dtype)
    yield "transposed · row", np.ascontiguousarray(a.T).T, b, np.empty((37, 11), dtype)
    yield "row · transposed", a, np.ascontiguousarray(b.T).T, np.empty((37, 11), dtype)
    yield "column block of b and of out", a, big[:29, 7:18], np.empty((37, 30), dtype)[:, 5:16]
    yield "row block of a", big[3:40, 10:39], b, np.empty((37, 11), dtype)
    yield "strided columns (no BLAS layout)", big[:37, ::2][:, :29], b, np.empty((37, 11), dtype)
    yield "strided rows of b", a, big.T[:58:2, :11], np.empty((37, 11), dtype)
    yield "transposed out", a, b, np.empty((11, 37), dtype).T
    yield "one strided column", a, big[:29, 3:4][::1], np.empty((37, 2), dtype)[:, :1]
    yield "one row", a[:1], b, np.empty((1, 11), dtype)
    yield "one column", a, b[:, :1], np.empty((37, 1), dtype)
    yield "inner size 1", a[:, :1], b[:1], np.empty((37, 11), dtype)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 0.0)])
def test_products_equal_numpys_for_every_layout(rng, dtype, tol):
    for name, a, b, out in _cases(rng, dtype):
        # into an array of out's own layout: NumPy's bits depend on it (a transposed out)
        want = np.matmul(a, b, out=np.empty_like(out))
        got = _blas.matmul(a, b, out)
        assert got is out, name
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= tol, (name, err)


def test_shapes_that_do_not_fit_are_refused(rng):
    a = rng.normal(size=(4, 3)).astype(np.float32)
    with pytest.raises(ValueError):
        _blas.matmul(a, a, np.empty((4, 3), np.float32))
    with pytest.raises(ValueError):
        _blas.matmul(a, a.T, np.empty((4, 5), np.float32))


def test_products_are_the_same_bits_each_time(rng):
    """Same inputs, same result, wherever and however the arrays lie in memory (the engine's
    determinism rests on it): each product repeated from copies at other offsets, and from
    contiguous copies (a layout that BLAS cannot take must not send the product to another
    library: NumPy's own loop and oneMKL's AVX2 kernels differ in the last bits)."""
    for name, a, b, out in _cases(rng, np.float32):
        first = _blas.matmul(a, b, out).copy()
        for shift in (1, 3, 8):
            buf = np.empty(a.size + 16, np.float32)
            a2 = buf[shift : shift + a.size].reshape(a.shape)
            a2[...] = a
            out2 = np.empty(out.shape, np.float32)
            np.testing.assert_array_equal(_blas.matmul(a2, b, out2), first, err_msg=name)
        a3, b3 = np.ascontiguousarray(a), np.ascontiguousarray(b)
        got = _blas.matmul(a3, b3, np.empty(out.shape, np.float32))
        np.testing.assert_array_equal(got, first, err_msg=f"{name}: contiguous copies")


def test_numpy_only_when_asked_and_nothing_loaded_at_import(tmp_path):
    code = (
        "import os, classic_cnn\n"
        "from classic_cnn import _blas\n"
        "maps = open('/proc/self/maps').read() if os.path.exists('/proc/self/maps') else ''\n"
        "assert 'mkl' not in maps and not _blas._STATE, 'loaded at import'\n"
        "print(_blas.backend())\n"
    )
    env = {**os.environ, "CLASSIC_CNN_BLAS": "numpy"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "numpy"
