"""What handing half of a compiled loop to a second thread costs, three ways: one thread alone;
the engine's way (a ``ThreadPoolExecutor`` worker runs its half while the caller runs the
other, the caller then waits on the future); and a worker that never leaves compiled code
(it spins on a flag with atomic loads, without the GIL, runs its half and sets a flag back,
while the caller posts, runs its half and spins in compiled code until that flag is set).

``python benchmarks/bench_handoff.py [--repeats 2000] [--sizes 0,1000,2000]``

The work is a compiled loop over ``size`` numbers (about 0.12 µs a number on a 2020s core:
2000 numbers take about 240 µs, a LeNet-5 convolution's share of a training step); each
figure is the median and the 90th percentile of ``--repeats`` calls, 0.2 ms apart, as a
step's operations are. On the 2-core virtual machines it was measured on, a thread woken
from a futex wait takes 50–100 µs, and the caller of a ``ThreadPoolExecutor`` pays that
twice per handoff. The engine's two-way splits now wait the compiled worker's way on both
sides (``ops._Handoff``), with the worker running its part's Python itself; this script
measures the bare mechanism.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: ctl's slots: the task posted, the task done, stop, and the worker's range
POSTED, DONE, STOP, START, END = range(5)


@intrinsic
def _load(typingctx, arr, idx):
    """``arr[idx]`` (int64) as an atomic load, sequentially consistent."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(arr, idx), codegen


@intrinsic
def _store(typingctx, arr, idx, val):
    """``arr[idx] = val`` (int64) as an atomic store, sequentially consistent."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        builder.store_atomic(args[2], ptr, "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(arr, idx, val), codegen


@njit(nogil=True)
def work(x, s, e):
    """The measured work: 200 passes over x[s:e]."""
    acc = 0.0
    for _ in range(200):
        for i in range(s, e):
            acc += x[i] * 1.000001
    return acc


@njit(nogil=True)
def serve(ctl, x, out):
    """The compiled worker: waits for a new task number in ctl, runs its range, says done."""
    seen = 0
    while True:
        task = _load(ctl, POSTED)
        if task == seen:
            if _load(ctl, STOP):
                return
            continue
        seen = task
        out[1] = work(x, ctl[START], ctl[END])
        _store(ctl, DONE, seen)


@njit(nogil=True)
def post_run_wait(ctl, task, x, out, s0, e0, s1, e1):
    """The caller's side: post the worker's range, run its own, spin until the worker is done."""
    ctl[START], ctl[END] = s1, e1
    _store(ctl, POSTED, task)
    out[0] = work(x, s0, e0)
    while _load(ctl, DONE) != task:
        pass


def run(sizes=(0, 1000, 2000), repeats=2000, print_fn=print) -> list[dict]:
    """Median and 90th percentile per way and size, in µs; prints one line each."""
    x = np.random.default_rng(0).random(max(sizes) + 1)
    out = np.zeros(2)
    ctl = np.zeros(8, np.int64)
    worker = threading.Thread(target=serve, args=(ctl, x, out), daemon=True)
    worker.start()
    pool = ThreadPoolExecutor(1)
    task = [0]

    def alone(n):
        out[0] = work(x, 0, n)

    def executor(n):
        future = pool.submit(work, x, n // 2, n)
        out[0] = work(x, 0, n // 2)
        out[1] = future.result()

    def compiled(n):
        task[0] += 1
        post_run_wait(ctl, task[0], x, out, 0, n // 2, n // 2, n)

    rows = []
    print_fn(f"CPU: {cpu_name()}; {repeats} calls per figure, 0.2 ms apart")
    try:
        for n in sizes:
            for way, fn in (("one thread", alone), ("executor", executor), ("compiled", compiled)):
                for _ in range(min(50, repeats)):
                    fn(n)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn(n)
                    times.append((time.perf_counter() - t) * 1e6)
                    time.sleep(0.0002)
                p90 = float(np.percentile(times, 90))
                row = {"size": n, "way": way, "median_us": statistics.median(times), "p90_us": p90}
                rows.append(row)
                print_fn(
                    f"size {n:6,d}  {way:10s}  median {row['median_us']:8.1f} µs  p90 {p90:8.1f}"
                )
    finally:
        _stop(ctl, worker)
        pool.shutdown()
    return rows


@njit(nogil=True)
def _set_stop(ctl):
    _store(ctl, STOP, 1)


def _stop(ctl, worker) -> None:
    _set_stop(ctl)
    worker.join(timeout=10)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2000, help="timed calls per figure")
    p.add_argument("--sizes", default="0,1000,2000", help="comma-separated work sizes")
    a = p.parse_args(argv)
    run(tuple(int(s) for s in a.sizes.split(",")), a.repeats)


if __name__ == "__main__":
    main()
