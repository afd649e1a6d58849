"""How many images per forward pass should ``predict_proba`` and ``evaluate`` use?

Times ``model.predict_proba`` on 1,000 random images for each candidate piece size and
each benchmark network (``Sequential.inference_batch`` is the current default of each),
interleaved (every size once per repeat, in a rotating order), and prints the median
images per second of each with its min–max and the ratio to the current default. Run it
on a quiet machine:

    .venv/bin/python benchmarks/tune_inference_batch.py [--threads 2] [--repeats 5]
        [--sizes 32 64 128 256 1000] [--networks lenet5,tinyvgg,article,fashion]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from classic_cnn import presets


def images_per_second(net, x, size, min_time):
    runs, start = 0, time.perf_counter()
    while True:
        net.predict_proba(x, batch_size=size)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return runs * len(x) / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 1000])
    p.add_argument("--networks", default="lenet5,tinyvgg,article,fashion")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=args.threads)  # the engine splits its work over as many
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, {args.repeats} repeats")
    for name in args.networks.split(","):
        net = presets.build(name, seed=0)
        default = net.inference_batch
        sizes = sorted(set(args.sizes) | {default})
        print(f"{name}: current default {default}")
        x = rng.random((1000, *net.input_shape), dtype=np.float32)
        for size in sizes:  # warm-up: compile, fault in the pages
            net.predict_proba(x[:size], batch_size=size)
        samples = {size: [] for size in sizes}
        for r in range(args.repeats):
            order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)]
            for size in order:
                samples[size].append(images_per_second(net, x, size, args.min_time))
        base = statistics.median(samples[default])
        for size in sizes:
            med = statistics.median(samples[size])
            print(
                f"{name:8s} pieces of {size:5d}: {med:9,.0f} img/s "
                f"({min(samples[size]):,.0f}–{max(samples[size]):,.0f}), "
                f"{med / base:.2f}× the default"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
