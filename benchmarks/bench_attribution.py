"""How long "why this class?" takes for one image: Grad-CAM, saliency, gradient × input and
occlusion (patch 4, stride 2) on one 28×28 image, for the fashion preset and LeNet-5.

``python benchmarks/bench_attribution.py [--threads 2] [--repeats 30] [--model FILE ...]``

Each figure is the median (and the fastest) of ``--repeats`` timed calls after two warm-up calls,
with NumPy's BLAS and numba held to ``--threads`` threads. Without ``--model`` the presets are
built with random weights (seed 0): the time does not depend on the weights' values. The image is
Fashion-MNIST test image 0 when the dataset is on this machine, random pixels otherwise. The
targets (the issue's): Grad-CAM under 20 ms, occlusion (patch 4, stride 2) under 200 ms.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TARGETS_MS = {"gradcam": 20.0, "occlusion": 200.0}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def test_image() -> tuple[np.ndarray, str]:
    """Fashion-MNIST test image 0 (uint8 28×28×1) when on this machine, else random pixels."""
    try:
        from classic_cnn.data.named import load_dataset

        data = load_dataset("fashion-mnist", "test", download=False)
        return data.images[0], "Fashion-MNIST test image 0"
    except Exception:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "random pixels"


def models(paths) -> list[tuple[str, object]]:
    from classic_cnn import io, presets
    from classic_cnn.data.batches import Preprocessing

    if paths:
        return [(f"{p} (trained)", io.load(p)) for p in paths]
    out = []
    for arch in ("fashion", "lenet5"):
        model = presets.build(arch, classes=10, seed=0)
        model.preprocessing = Preprocessing((28, 28), 1, (0.286,), (0.353,), "dark")
        out.append((f"{arch} preset (random weights, seed 0)", model))
    return out


def time_ms(fn, repeats: int) -> tuple[float, float]:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - t))
    return statistics.median(samples), min(samples)


def run(threads: int, repeats: int, paths=(), print_fn=print) -> list[dict]:
    import numba
    import threadpoolctl

    from classic_cnn.attribution import attribute

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    image, what = test_image()
    print_fn(f"CPU: {cpu_name()}; {threads} thread(s); {repeats} timed calls each; {what}")
    rows = []
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        for name, model in models(paths):
            x = model.preprocessing.apply(image[None], model.dtype)
            for method, options in (
                ("gradcam", {}),
                ("saliency", {}),
                ("gradient-x-input", {}),
                ("occlusion", {"patch": 4, "stride": 2}),
            ):
                call = functools.partial(attribute, model, x, method, **options)
                median, best = time_ms(call, repeats)
                target = TARGETS_MS.get(method)
                verdict = ""
                if target is not None:
                    verdict = f"  target < {target:g} ms: {'met' if median < target else 'NOT met'}"
                print_fn(
                    f"{name:40} {method:17} median {median:7.2f} ms  fastest {best:7.2f} ms"
                    + verdict
                )
                rows.append(
                    {"model": name, "method": method, "median_ms": median, "fastest_ms": best}
                )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per figure (default 30)")
    p.add_argument("--model", action="append", default=[], help="a model file (repeatable)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error(f"--threads and --repeats must be ≥ 1. Received: {args.threads}, {args.repeats}")
    run(args.threads, args.repeats, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
