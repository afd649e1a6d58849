"""The benchmark's NumPy side, run for a couple of tiny steps so that benchmarks/bench_engine.py
cannot rot unnoticed. PyTorch is made unimportable here: the suite needs no ``bench`` extra."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


@pytest.fixture
def bench(monkeypatch):
    """bench_engine imported fresh, with ``import torch`` and ``import threadpoolctl`` failing
    (the engine's own use of threadpoolctl, a dependency of classic-cnn, is set up before)."""
    from classic_cnn import ops

    ops._blas_libraries()
    monkeypatch.setitem(sys.modules, "torch", None)  # None in sys.modules: ImportError on import
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    spec = importlib.util.spec_from_file_location("bench_engine_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_lenet_is_the_classic_lenet5(bench):
    model = bench.build_lenet(seed=0)
    assert model.count_params() == bench.LENET5_PARAMS == 61_706
    assert model.output_shape == (10,)
    shapes = [row["output_shape"] for row in model.summary_rows()]
    conv_pool = [(28, 28, 6), (28, 28, 6), (14, 14, 6), (10, 10, 16), (10, 10, 16), (5, 5, 16)]
    assert shapes[:7] == [*conv_pool, (400,)]


@pytest.mark.parametrize("kind", ["train", "infer"])
def test_numpy_side_measures_a_positive_finite_throughput(bench, kind):
    model = bench.build_lenet(seed=0)
    before = {k: v.copy() for k, v in model.parameters().items()}
    batches = bench.make_batches(batch=4, count=2, seed=0)
    work = bench.ours_workload(model, kind, batches)
    result = bench.measure({"ours": work}, repeats=2, min_time=1e-4, warmup_time=0.0)["ours"]

    rates = result["img_per_s"]
    assert len(rates["samples"]) == 2
    assert all(math.isfinite(r) and r > 0 for r in rates["samples"])
    assert rates["min"] <= rates["median"] <= rates["max"]
    assert result["steps_per_repeat"] >= 1
    assert 0 < result["seconds_per_step_median"] < math.inf
    changed = any(not np.array_equal(before[k], v) for k, v in model.parameters().items())
    if kind == "train":
        assert changed, "training steps did not update the weights"
        assert len(work.losses) >= 3 and all(math.isfinite(v) for v in work.losses)
    else:
        assert not changed, "inference changed the weights"
        probs = work.step()
        assert probs.shape == (4, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert "torch" not in sys.modules or sys.modules["torch"] is None


def test_table_formats_results(bench):
    sample = {"median": 100.0, "min": 90.0, "max": 110.0, "q1": 95.0, "q3": 105.0}
    side = {"steps_per_repeat": 3, "seconds_per_step_median": 0.01, "img_per_s": sample}
    results = [
        {
            "key": "train64",
            "label": "training step",
            "kind": "train",
            "batch": 64,
            "ours": side,
            "torch": side,
            "ratio_median": 1.0,
            "ratio_paired_min": 0.9,
            "ratio_paired_max": 1.1,
        }
    ]
    table = bench.format_table(results)
    assert "training step" in table and "1.00" in table and "0.90–1.10" in table


def test_without_torch_main_says_to_run_make_bench(bench):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick"])
    assert "make bench" in str(exc.value.code)


@pytest.mark.parametrize("network", ["lenet5", "tinyvgg", "article", "small", "fashion"])
def test_every_network_builds_and_counts_its_flops(bench, network):
    model = bench.build_network(network)
    macs = sum(r["macs"] for r in model.summary_rows())
    assert bench.flops_per_image(model, "infer") == 2 * macs
    assert 2 * macs < bench.flops_per_image(model, "train") < 6 * macs
    x, y = bench.make_batches(2, 1, 0, model.input_shape)[0]
    assert x.shape == (2, *model.input_shape) and y.shape == (2,)


def test_extras_report_memory_growth_and_startup(bench):
    mib = 1024**2
    memory = {
        "network": "small",
        "images": 60000,
        "epochs": 5,
        "torch_imported": False,
        "peak_rss_bytes": 500 * mib,
        "ru_maxrss_bytes": 900 * mib,
        "rss_after_epoch_bytes": [300 * mib, 300 * mib, 301 * mib, 302 * mib, 303 * mib],
        "epoch_seconds": [1.0] * 5,
    }
    startup = {"cnn --help": {"seconds_median": 0.2, "returncode": 0}}
    text = bench.format_extras(memory, startup)
    assert "peak RSS 500 MiB" in text and "+1.0%" in text and "`cnn --help` 0.20 s" in text


def test_matmul_peak_is_positive(bench):
    assert bench.matmul_peak(64, seconds=0.01) > 0


def test_child_peak_is_its_own_not_the_parents(bench):
    """Linux carries ru_maxrss over fork/vfork + exec, so a child started by a parent holding
    a large buffer reports the parent's size there; the child's own peak (VmHWM) must not."""
    import numpy as np

    big = np.ones(300 * 1024**2 // 8)  # 300 MiB resident in this process
    code = (
        f"import json, sys; sys.path.insert(0, {str(BENCH.parent)!r}); import bench_engine as b; "
        "print(json.dumps([b._peak_rss_bytes(), b._maxrss_bytes()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own_peak, _inherited = json.loads(out.stdout)
    assert big.sum() > 0
    assert own_peak < 250 * 1024**2, f"child peak {own_peak / 1024**2:.0f} MiB counts the parent"


@pytest.mark.parametrize("with_val", [False, True])
def test_a_fit_epoch_and_its_steps_alone_train_on_the_same_images(bench, tmp_path, with_val):
    """The end-to-end figure: one epoch through fit() (with validation and a checkpoint when
    asked) and the same epoch as train_step calls alone both update the weights and report a
    finite rate; the checkpoint is written."""
    model = bench.build_lenet(seed=0)
    images, labels = bench.make_images(70, seed=0)
    assert images.dtype == np.uint8 and images.shape == (70, 28, 28, 1)
    kw = {"val": bench.make_images(6, seed=1), "checkpoint": tmp_path / "state"} if with_val else {}
    fit_work = bench.ours_fit_workload(model, images, labels, 32, **kw)
    before = {k: v.copy() for k, v in model.parameters().items()}
    assert math.isfinite(fit_work.step())
    assert model.preprocessing is not None  # the statistics were taken on the first call
    assert any(not np.array_equal(before[k], v) for k, v in model.parameters().items())
    assert (tmp_path / "state").exists() == with_val
    steps = bench.ours_steps_workload(model.copy(), images, labels, 32)
    result = bench.measure({"fit": fit_work, "steps": steps}, 2, 1e-4, warmup_time=0.0)
    for side in result.values():
        assert all(math.isfinite(r) and r > 0 for r in side["img_per_s"]["samples"])
    assert fit_work.batch == steps.batch == 70


def test_peers_report_ort_ratios_and_fit_overhead(bench):
    sample = {"median": 100.0, "min": 90.0, "max": 110.0, "q1": 95.0, "q3": 105.0}
    side = {"steps_per_repeat": 3, "seconds_per_step_median": 0.01, "img_per_s": sample}
    results = [
        {
            "network": "lenet5",
            "label": "inference (predict_proba)",
            "batch": 1000,
            "ours": side,
            "ort": side,
            "ratio_ort_median": 1.25,
            "ratio_ort_paired_min": 1.1,
            "ratio_ort_paired_max": 1.3,
        },
        {
            "network": "fashion",
            "label": "fit() epoch",
            "images": 4096,
            "ours": side,
            "steps": side,
            "fit_over_steps": 1.031,
        },
    ]
    text = bench.format_peers(results, "1.0")
    assert "ours/ORT 1.25 (paired 1.10–1.30)" in text
    assert "fashion" in text and "4,096 images: 1.031" in text
    assert bench.format_peers([]) == ""


def test_the_header_names_the_kernels_that_ran(bench, monkeypatch):
    """The CPU's vector extensions, numba's target and the products' library with how it was
    chosen: what decides the figures on one CPU family or another."""
    from classic_cnn import _blas

    ext = bench.vector_extensions()
    assert ext and ("AVX2" in ext or ext in ("no AVX2", "unknown"))
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(numba.config, "CPU_NAME", "haswell")
    assert bench.compiled_target() == "haswell (NUMBA_CPU_NAME)"
    text = bench.engine_products()
    assert ("oneMKL" if _blas.backend() == "mkl" else "NumPy's BLAS") in text
    assert _blas.choice()["how"].split()[0] in text
    assert set(bench.ISA_ENV) >= {"OPENBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS", "NUMBA_CPU_NAME"}
