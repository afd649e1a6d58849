"""The matrix products' library (classic_cnn/_blas.py): oneMKL where the ``mkl`` extra is
installed, NumPy's BLAS otherwise, the same products either way."""

from __future__ import annotations

import json
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


def _choice_in_child(env: dict) -> dict:
    """``_blas.choice()`` in a fresh process with ``env`` added to the environment."""
    code = "import json; from classic_cnn import _blas; print(json.dumps(_blas.choice()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_library_in_use_is_the_one_chosen():
    """In this process: oneMKL when asked, or when measured (or remembered) at least as fast;
    NumPy's BLAS when asked, when measured faster, or when oneMKL is not installed."""
    chosen = _blas.choice()
    assert _blas.backend() == chosen["backend"]
    asked = os.environ.get("CLASSIC_CNN_BLAS", "").lower()
    if asked == "numpy" or not _mkl_installed():
        assert chosen["backend"] == "numpy"
    elif asked == "mkl":
        assert chosen["backend"] == "mkl" and "mkl_rt" in _blas._STATE["path"]
    else:
        g = chosen["gflops"]
        faster = "numpy" if g["numpy"] > _blas.CHOICE_MARGIN * g["mkl"] else "mkl"
        assert chosen["backend"] == faster, chosen


@pytest.mark.skipif(not _mkl_installed(), reason="oneMKL (the mkl extra) is not installed")
def test_the_choice_is_measured_once_per_machine_and_remembered(tmp_path):
    env = {"CLASSIC_CNN_CACHE": str(tmp_path), "CLASSIC_CNN_BLAS": "auto"}
    first = _choice_in_child(env)
    assert first["how"] == "measured now"
    assert set(first["gflops"]) == {"mkl", "numpy"} and min(first["gflops"].values()) > 0
    record = json.loads((tmp_path / "blas-choice.json").read_text())
    assert len(record) == 1
    again = _choice_in_child(env)
    assert again["how"].startswith("remembered") and again["backend"] == first["backend"]
    # other kernels (oneMKL's SSE4.2 path, which every x86-64 CPU it runs on has, and which
    # the AVX2 runs of `make test` do not use): another machine as far as the choice goes
    other = _choice_in_child({**env, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"})
    assert other["how"] == "measured now" and other["mkl_code_path"] == "SSE4_2"
    assert len(json.loads((tmp_path / "blas-choice.json").read_text())) == 2


@pytest.mark.skipif(not _mkl_installed(), reason="oneMKL (the mkl extra) is not installed")
@pytest.mark.parametrize("asked", ["mkl", "numpy"])
def test_asking_for_a_library_skips_the_measurement(tmp_path, asked):
    got = _choice_in_child({"CLASSIC_CNN_CACHE": str(tmp_path), "CLASSIC_CNN_BLAS": asked})
    assert got["backend"] == asked and got["how"].startswith("asked")
    assert not (tmp_path / "blas-choice.json").exists()


@pytest.mark.skipif(not _mkl_installed(), reason="oneMKL (the mkl extra) is not installed")
def test_a_damaged_choice_file_is_measured_around_and_rewritten(tmp_path):
    (tmp_path / "blas-choice.json").write_text('{"half a rec')
    got = _choice_in_child({"CLASSIC_CNN_CACHE": str(tmp_path), "CLASSIC_CNN_BLAS": ""})
    assert got["how"] == "measured now"
    assert json.loads((tmp_path / "blas-choice.json").read_text())


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
