"""Benchmark: classic-cnn against PyTorch (CPU, eager) on a LeNet-5-style network.

What is timed, for both engines, in the same run::

    training step     forward + cross-entropy + backward + SGD(lr 0.01, momentum 0.9), batch 64, 256
    inference         softmax probabilities (predict_proba / no_grad + softmax), batch 1000
    latency           the same on one image

Method: both models start from the same weights (ours copied into PyTorch, checked by comparing
logits and the first training losses); each measurement is warmed up first (not timed), then
timed in ``--repeats`` repeats, interleaved ours, torch, ours, torch, ..., each repeat running
enough steps to last ``--min-time`` seconds. Reported: the median images per second of each
engine, its spread (min–max; the JSON also has the quartiles and every sample) and the ratio
ours/torch of the medians, with the min–max of the per-repeat ratios (a repeat of ours and the
torch repeat right after it share the machine's conditions, so their ratio is less noisy than
either number). NumPy's BLAS and PyTorch use the same number of threads.

Run it with ``make bench`` (installs the ``bench`` extra: torch and threadpoolctl), or
``python benchmarks/bench_engine.py [--threads N] [--repeats R] [--json PATH] [--quick]``.

The NumPy side (:func:`build_lenet`, :func:`ours_workload`, :func:`measure`) imports neither
torch nor threadpoolctl, so the test suite can run it without the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import classic_cnn
from classic_cnn import SGD, Conv2D, CrossEntropyLoss, Dense, Sequential, presets

INPUT_SHAPE = (28, 28, 1)
CLASSES = 10
#: conv 6·(5·5·1) + 6, conv 16·(5·5·6) + 16, dense 400·120 + 120, 120·84 + 84, 84·10 + 10
LENET5_PARAMS = 61_706
LR, MOMENTUM = 0.01, 0.9
#: distinct training batches cycled through (the same data for both engines)
TRAIN_BATCHES = 4

#: (key, label, kind, batch): kind is "train" (train step) or "infer" (softmax probabilities)
BENCHMARKS = (
    ("train64", "training step", "train", 64),
    ("train256", "training step", "train", 256),
    ("infer1000", "inference (predict_proba)", "infer", 1000),
    ("latency1", "single-image latency", "infer", 1),
)

MISSING_EXTRA = (
    "bench_engine.py compares classic-cnn with PyTorch and needs the 'bench' extra "
    "(torch==2.13.0, threadpoolctl), which is not installed here ({err}).\n"
    "Run `make bench` (it installs the extra into .venv, then runs this script), "
    "or `.venv/bin/pip install -e '.[bench]'`."
)


# --------------------------------------------------------------------------------------------
# The NumPy side (no torch, no threadpoolctl)
# --------------------------------------------------------------------------------------------


def build_lenet(seed: int = 0) -> Sequential:
    """The LeNet-5-style network of the benchmark: the project's ``lenet5`` preset (float32,
    channels-last)."""
    return presets.build("lenet5", classes=CLASSES, seed=seed)


def make_batches(batch: int, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` batches of random images (N, 28, 28, 1) float32 in [0, 1) and labels (N,)."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((batch, *INPUT_SHAPE), dtype=np.float32),
            rng.integers(0, CLASSES, size=batch, dtype=np.int64),
        )
        for _ in range(count)
    ]


@dataclass
class Workload:
    """One engine's side of one measurement: ``step()`` processes ``batch`` images."""

    step: Callable[[], object]
    batch: int
    losses: list[float] = field(default_factory=list)  # training losses, in order


def ours_workload(model: Sequential, kind: str, batches) -> Workload:
    """classic-cnn: ``model.train_step`` (kind "train") or ``model.predict_proba`` ("infer")."""
    if kind == "infer":
        x = batches[0][0]
        return Workload(step=lambda: model.predict_proba(x), batch=len(x))
    loss, optimizer = CrossEntropyLoss(), SGD(lr=LR, momentum=MOMENTUM)
    cycle = itertools.cycle(batches)
    work = Workload(step=lambda: None, batch=len(batches[0][0]))

    def step():
        x, y = next(cycle)
        value = model.train_step(x, y, loss, optimizer)
        work.losses.append(value)
        return value

    work.step = step
    return work


def run_steps(work: Workload, steps: int) -> float:
    """Seconds for ``steps`` calls of ``work.step()``, garbage collection paused (as timeit)."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(steps):
            work.step()
        return time.perf_counter() - start
    finally:
        if gc_was_on:
            gc.enable()


def warm_up(work: Workload, min_time: float, min_steps: int = 3) -> float:
    """Run ``work`` (untimed for the results) for at least ``min_steps`` steps and ``min_time``
    seconds; returns the seconds per step of the last half, to size the timed repeats."""
    steps, elapsed, per_step = 0, 0.0, math.inf
    while steps < min_steps or elapsed < min_time:
        n = max(1, steps // 2)
        t = run_steps(work, n)
        steps, elapsed, per_step = steps + n, elapsed + t, t / n
    return per_step


def steps_for(per_step: float, min_time: float) -> int:
    """Steps per repeat so that one repeat lasts about ``min_time`` seconds."""
    return max(1, math.ceil(min_time / max(per_step, 1e-9)))


def summarize(samples: list[float]) -> dict:
    """Median, min, max and quartiles of throughput samples (images per second)."""
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {
        "median": float(med),
        "min": float(a.min()),
        "max": float(a.max()),
        "q1": float(q1),
        "q3": float(q3),
        "samples": [float(s) for s in a],
    }


def measure(
    works: dict[str, Workload], repeats: int, min_time: float, warmup_time: float | None = None
) -> dict[str, dict]:
    """Warm up every workload, then time ``repeats`` repeats of each, interleaved in the order
    of ``works`` (ours, torch, ours, torch, ...). Returns, per name, the steps per repeat, the
    median seconds per step and the throughput summary in images per second."""
    warmup_time = min_time if warmup_time is None else warmup_time
    steps = {name: steps_for(warm_up(w, warmup_time), min_time) for name, w in works.items()}
    seconds: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, w in works.items():
            seconds[name].append(run_steps(w, steps[name]))
    out = {}
    for name, w in works.items():
        per_step = [s / steps[name] for s in seconds[name]]
        out[name] = {
            "steps_per_repeat": steps[name],
            "seconds_per_step_median": float(np.median(per_step)),
            "img_per_s": summarize([w.batch / t for t in per_step]),
        }
    return out


# --------------------------------------------------------------------------------------------
# The PyTorch side
# --------------------------------------------------------------------------------------------


def import_bench_extra():
    """``(torch, threadpoolctl)``, or exit with a message that says how to install them."""
    try:
        torch = importlib.import_module("torch")
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError as exc:
        raise SystemExit(MISSING_EXTRA.format(err=exc)) from None
    return torch, threadpoolctl


def torch_lenet_from(torch, ours: Sequential):
    """The same network in PyTorch (NCHW), holding a copy of ``ours``'s weights.

    Kernels KH×KW×C_in×C_out become C_out×C_in×KH×KW, dense weights in×out become out×in, and
    the first dense layer's rows are reordered from our H·W·C flatten order to torch's C·H·W.
    'same' padding of a 5×5 kernel at stride 1 is 2 on every side, as ``padding=2``.
    """
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, CLASSES),
    )
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    ours_convs = [layer for layer in ours.layers if isinstance(layer, Conv2D)]
    ours_dense = [layer for layer in ours.layers if isinstance(layer, Dense)]
    flat_hwc = ours.layers[ours.layers.index(ours_dense[0]) - 1].input_shape  # Flatten's input
    with torch.no_grad():
        for t, o in zip(convs, ours_convs, strict=True):
            t.weight.copy_(torch.from_numpy(o.params["kernel"].transpose(3, 2, 0, 1).copy()))
            t.bias.copy_(torch.from_numpy(o.params["bias"]))
        for i, (t, o) in enumerate(zip(linears, ours_dense, strict=True)):
            w = o.params["kernel"]
            if i == 0:  # rows in H·W·C order → C·H·W order
                w = w.reshape(*flat_hwc, -1).transpose(2, 0, 1, 3).reshape(w.shape)
            t.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            t.bias.copy_(torch.from_numpy(o.params["bias"]))
    return net


def torch_count_params(net) -> int:
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def to_torch_batches(torch, batches):
    """NHWC NumPy batches → NCHW tensors (layout converted once, outside the timing)."""
    return [
        (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y))
        for x, y in batches
    ]


def torch_workload(torch, net, kind: str, tbatches) -> Workload:
    """PyTorch eager: SGD + CrossEntropyLoss step, or no_grad forward + softmax."""
    if kind == "infer":
        net.eval()
        x = tbatches[0][0]

        def infer():
            with torch.no_grad():
                return torch.softmax(net(x), dim=1)

        return Workload(step=infer, batch=x.shape[0])
    net.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    cycle = itertools.cycle(tbatches)
    work = Workload(step=lambda: None, batch=tbatches[0][0].shape[0])

    def step():
        x, y = next(cycle)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        value = loss.item()  # ours returns the loss as a float too
        work.losses.append(value)
        return value

    work.step = step
    return work


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def numpy_blas_info(threadpoolctl) -> list[dict]:
    """threadpoolctl's entries for the BLAS that NumPy itself loaded (not torch's)."""
    blas = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    np_dir = os.path.dirname(os.path.dirname(np.__file__))
    mine = [i for i in blas if os.path.basename(os.path.dirname(i["filepath"])).startswith("numpy")]
    mine = mine or [i for i in blas if i["filepath"].startswith(np_dir)]
    return mine or blas


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: on a shared machine, how busy others kept it."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe_machine(torch, threadpoolctl, threads: int) -> dict:
    blas = numpy_blas_info(threadpoolctl)
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "classic_cnn": classic_cnn.__version__,
        "load_average_before": load_average(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
        "numpy_blas": [
            {
                k: b.get(k)
                for k in (
                    "internal_api",
                    "version",
                    "architecture",
                    "threading_layer",
                    "num_threads",
                    "filepath",
                )
            }
            for b in blas
        ],
    }


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


def run_benchmarks(torch, repeats: int, min_time: float, seed: int, log=print) -> tuple:
    """Every measurement of :data:`BENCHMARKS`; returns ``(results, checks)``."""
    results, checks = [], {}
    for key, label, kind, batch in BENCHMARKS:
        ours = build_lenet(seed)
        net = torch_lenet_from(torch, ours)
        n_ours, n_torch = ours.count_params(), torch_count_params(net)
        assert n_ours == n_torch == LENET5_PARAMS, (n_ours, n_torch, LENET5_PARAMS)
        batches = make_batches(batch, TRAIN_BATCHES if kind == "train" else 1, seed + batch)
        tbatches = to_torch_batches(torch, batches)
        if "logits_max_abs_diff" not in checks:  # the same network, the same weights
            with torch.no_grad():
                theirs = net(tbatches[0][0]).numpy()
            diff = float(np.abs(ours.forward(batches[0][0]) - theirs).max())
            assert diff < 1e-3, f"ours and torch's logits differ by {diff}: not the same network"
            checks["logits_max_abs_diff"] = diff
        works = {
            "ours": ours_workload(ours, kind, batches),
            "torch": torch_workload(torch, net, kind, tbatches),
        }
        log(f"  {label}, batch {batch} ...")
        m = measure(works, repeats, min_time)
        if kind == "train":
            lo, lt = works["ours"].losses, works["torch"].losses
            first = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(lo[:3], lt[:3], strict=True))
            # same weights, data, loss and optimizer: the first steps' losses agree
            assert first < 1e-3, f"first training losses differ: {lo[:3]} vs {lt[:3]}"
            assert math.isfinite(lo[-1]) and math.isfinite(lt[-1]), (lo[-1], lt[-1])
            checks[f"{key}_first_losses_max_rel_diff"] = first
        o, t = m["ours"]["img_per_s"], m["torch"]["img_per_s"]
        paired = [a / b for a, b in zip(o["samples"], t["samples"], strict=True)]
        results.append(
            {
                "key": key,
                "label": label,
                "kind": kind,
                "batch": batch,
                "ours": m["ours"],
                "torch": m["torch"],
                "ratio_median": o["median"] / t["median"],
                "ratio_paired_min": min(paired),
                "ratio_paired_max": max(paired),
            }
        )
    return results, checks


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def format_header(info: dict, repeats: int, min_time: float, checks: dict) -> str:
    blas = "; ".join(
        f"{b['internal_api']} {b['version']}, kernel {b['architecture']}, "
        f"{b['threading_layer']}, {b['num_threads']} thread(s)"
        for b in info["numpy_blas"]
    )
    lines = [
        "classic-cnn vs PyTorch (CPU, eager) — LeNet-5-style network, "
        f"28×28×1 → 10 classes, {LENET5_PARAMS:,} parameters in both",
        f"machine : {info['cpu']}, {info['logical_cpus']} logical CPUs "
        f"({info['usable_cpus']} usable), {info['platform']}",
        f"versions: python {info['python']}, numpy {info['numpy']}, torch {info['torch']}, "
        f"classic-cnn {info['classic_cnn']}",
        f"threads : {info['threads']} (NumPy BLAS via threadpoolctl; "
        f"torch.set_num_threads → {info['torch_threads']}; oneDNN {info['torch_mkldnn']})",
        f"numpy BLAS: {blas or 'none found by threadpoolctl'}",
        f"method  : float32, random data (fixed seed), warm-up excluded, {repeats} repeats "
        f"interleaved ours/torch, each ≥ {min_time:g} s; SGD lr {LR} momentum {MOMENTUM}, "
        "cross-entropy",
    ]
    if info.get("load_average_before") and info.get("load_average_after"):
        before, after = info["load_average_before"], info["load_average_after"]
        lines.append(
            f"load    : 1-min load average {before[0]:.2f} before, {after[0]:.2f} after "
            f"(this run itself adds about {info['threads']}; more means other work shared the CPUs)"
        )
    if checks:
        losses = max(v for k, v in checks.items() if k.endswith("first_losses_max_rel_diff"))
        lines.append(
            "checks  : same weights in both "
            f"(logits differ ≤ {checks['logits_max_abs_diff']:.1e}); "
            f"first 3 training losses agree (rel. diff ≤ {losses:.1e})"
        )
    if repeats < 5:
        lines.append("note    : fewer than 5 repeats — a smoke run, not a measurement")
    return "\n".join(lines)


def format_table(results: list[dict]) -> str:
    head = (
        "benchmark",
        "batch",
        "ours img/s",
        "ours min–max",
        "torch img/s",
        "torch min–max",
        "ours/torch",
        "paired min–max",
        "ours ms/step",
        "torch ms/step",
    )
    rows = [head]
    for r in results:
        o, t = r["ours"]["img_per_s"], r["torch"]["img_per_s"]
        rows.append(
            (
                r["label"],
                str(r["batch"]),
                _rate(o["median"]),
                f"{_rate(o['min'])}–{_rate(o['max'])}",
                _rate(t["median"]),
                f"{_rate(t['min'])}–{_rate(t['max'])}",
                f"{r['ratio_median']:.2f}",
                f"{r['ratio_paired_min']:.2f}–{r['ratio_paired_max']:.2f}",
                _ms(r["ours"]["seconds_per_step_median"]),
                _ms(r["torch"]["seconds_per_step_median"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def fmt(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "-" * len(fmt(head))
    legend = (
        "img/s: median images per second; ours/torch > 1 means classic-cnn is faster; "
        "paired: per-repeat ratios; ms/step: median time of one call (one batch)"
    )
    return "\n".join([rule, fmt(head), rule, *map(fmt, rows[1:]), rule, legend])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time classic-cnn against PyTorch (CPU, eager) on a LeNet-5-style network."
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for NumPy's BLAS and for torch (default: all usable cores)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds each timed repeat lasts at least (default 0.5)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    p.add_argument(
        "--quick", action="store_true", help="fast smoke run: 3 short repeats (not a measurement)"
    )
    args = p.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    args.min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.5)
    args.threads = args.threads if args.threads is not None else usable_cpus()
    if args.repeats < 1 or args.threads < 1 or args.min_time <= 0:
        p.error(
            "--repeats and --threads must be ≥ 1 and --min-time > 0. Received: "
            f"--repeats {args.repeats}, --threads {args.threads}, --min-time {args.min_time}"
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch, threadpoolctl = import_bench_extra()
    torch.set_num_threads(args.threads)
    with threadpoolctl.threadpool_limits(limits=args.threads, user_api="blas"):
        info = describe_machine(torch, threadpoolctl, args.threads)
        print(f"timing {len(BENCHMARKS)} measurements, {args.repeats} repeats each:", flush=True)
        results, checks = run_benchmarks(torch, args.repeats, args.min_time, args.seed)
    info["load_average_after"] = load_average()
    print()
    print(format_header(info, args.repeats, args.min_time, checks))
    print(format_table(results))
    if args.json:
        report = {
            "machine": info,
            "config": {
                "repeats": args.repeats,
                "min_time_s": args.min_time,
                "seed": args.seed,
                "quick": args.quick,
                "lr": LR,
                "momentum": MOMENTUM,
                "params": LENET5_PARAMS,
            },
            "checks": checks,
            "results": results,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
