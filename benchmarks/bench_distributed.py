"""Benchmark: data-parallel training on a local Ray cluster, and the scaling model on paper.

Trains one epoch of Fashion-MNIST (the 55,000 training images left after the 5,000 held out;
``--limit`` for fewer) with the ``fashion`` network (``--arch``), batch 64, SGD, in these set-ups
(``--setups``; each ``KIND:N``):

    local:T   in this process, T threads (the baseline: ``cnn train --threads T``)
    ray:N     N Ray workers on a local cluster, one thread each (``cnn train --workers N``)

and prints images per second (training only, the workers already started and warmed up on a few
batches) and, for the Ray set-ups, per step: the round trip (driver → workers → driver), the
slowest worker's own compute, their difference (the communication and scheduling overhead) and
the driver's sum of the gradients.

Then the model on paper: with P parameters a step moves 4P bytes of gradients from each of N
machines to the driver and 4P bytes of weights back; on a link of ``--gbits`` Gbit/s the
driver's link carries about 2·N·4P bytes a step (gather + broadcast; a ring all-reduce would
carry 2·(N-1)/N·4P per machine). The per-image compute time t (measured here, one thread) gives
a step of b·t + communication on each of N machines with b images each; the speed-up over one
machine is N·b·t / (b·t + communication). Printed for N = 8 and 64, and the per-machine batch at
which communication is 10% of a step.

Run: ``python benchmarks/bench_distributed.py [--setups local:2,ray:1,ray:2] [--limit N]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import time

import numpy as np


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def load(limit):
    from classic_cnn.data import sources

    full = sources.load("fashion-mnist", "train")
    train, _ = full.stratified_split(5000, seed=0)
    return train.take(limit) if limit else train


def train_epoch(arch, train, batch_size, workers=None, threads=None):
    from rich.console import Console
    from threadpoolctl import threadpool_limits

    import classic_cnn as cc
    from classic_cnn import presets

    model = presets.build(arch, classes=10, seed=0)
    with threadpool_limits(limits=threads):
        state = cc.fit(
            model,
            train,
            epochs=1,
            batch_size=batch_size,
            optimizer=cc.SGD(0.01, momentum=0.9),
            console=Console(file=io.StringIO()),
            workers=workers,
        )
    return state.history[-1]["images_per_second"], model


def per_image_seconds(arch, batch, threads=1, steps=5):
    """One thread's training time per image at this batch size (forward, backward, update)."""
    from threadpoolctl import threadpool_limits

    import classic_cnn as cc
    from classic_cnn import presets

    model = presets.build(arch, classes=10, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((batch, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    loss, opt = cc.CrossEntropyLoss(), cc.SGD(0.01, momentum=0.9)
    with threadpool_limits(limits=threads):
        model.train_step(x, y, loss, opt)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_step(x, y, loss, opt)
    return (time.perf_counter() - t0) / steps / batch


def paper_model(params, t_image, gbits, machines=(8, 64), batch=64):
    bandwidth = gbits * 1e9 / 8  # bytes/s
    rows = []
    for n in machines:
        gather_broadcast = 2 * n * 4 * params / bandwidth
        ring = 2 * (n - 1) / n * 4 * params / bandwidth
        compute = batch * t_image
        rows.append(
            {
                "machines": n,
                "batch_per_machine": batch,
                "compute_ms": 1e3 * compute,
                "driver_comm_ms": 1e3 * gather_broadcast,
                "ring_comm_ms": 1e3 * ring,
                "speedup_driver": n * compute / (compute + gather_broadcast),
                "speedup_ring": n * compute / (compute + ring),
                # communication at most 10% of a step: b·t ≥ 9·comm
                "batch_10pct_driver": int(np.ceil(9 * gather_broadcast / t_image)),
                "batch_10pct_ring": int(np.ceil(9 * ring / t_image)),
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="fashion")
    ap.add_argument("--setups", default="local:2,ray:1,ray:2")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--gbits", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from classic_cnn import presets
    from classic_cnn.distributed import WorkerGroup

    train = load(args.limit)
    params = presets.build(args.arch, classes=10).count_params()
    print(f"{cpu_name()}; {args.arch}: {params:,} parameters ({4 * params / 1e6:.2f} MB)")
    print(f"one epoch: {len(train):,} images, batch {args.batch_size}")
    results = []
    for setup in args.setups.split(","):
        kind, n = setup.split(":")
        n = int(n)
        if kind == "local":
            train_epoch(args.arch, train.take(4 * args.batch_size), args.batch_size, threads=n)
            rate, _ = train_epoch(args.arch, train, args.batch_size, threads=n)
            results.append({"setup": setup, "images_per_second": rate})
            print(f"{setup:>8}: {rate:8.0f} img/s")
            continue
        with WorkerGroup(n) as group:
            train_epoch(args.arch, train.take(4 * args.batch_size), args.batch_size, group)
            group.seconds = {k: 0 * v for k, v in group.seconds.items()}
            rate, _ = train_epoch(args.arch, train, args.batch_size, group)
            s = group.seconds
            steps = s["steps"]
            row = {
                "setup": setup,
                "images_per_second": rate,
                "round_trip_ms": 1e3 * s["round_trip"] / steps,
                "worker_ms": 1e3 * s["worker"] / steps,
                "overhead_ms": 1e3 * (s["round_trip"] - s["worker"]) / steps,
                "reduce_ms": 1e3 * s["reduce"] / steps,
            }
        results.append(row)
        print(
            f"{setup:>8}: {rate:8.0f} img/s; per step: round trip {row['round_trip_ms']:.1f} ms, "
            f"slowest worker {row['worker_ms']:.1f} ms, overhead {row['overhead_ms']:.1f} ms, "
            f"driver's sum {row['reduce_ms']:.2f} ms"
        )
    t_image = per_image_seconds(args.arch, args.batch_size)
    print(f"one thread, batch {args.batch_size}: {1e3 * t_image:.2f} ms per image")
    model = paper_model(params, t_image, args.gbits, batch=args.batch_size)
    for r in model:
        print(
            f"{r['machines']:>3} machines × batch {r['batch_per_machine']}: compute "
            f"{r['compute_ms']:.0f} ms; through the driver {r['driver_comm_ms']:.1f} ms "
            f"(speed-up {r['speedup_driver']:.1f}x, 10% at batch {r['batch_10pct_driver']}); "
            f"ring {r['ring_comm_ms']:.1f} ms (speed-up {r['speedup_ring']:.1f}x, 10% at "
            f"batch {r['batch_10pct_ring']})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "cpu": cpu_name(),
                    "arch": args.arch,
                    "params": params,
                    "images": len(train),
                    "batch_size": args.batch_size,
                    "setups": results,
                    "ms_per_image_one_thread": 1e3 * t_image,
                    "model": model,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
