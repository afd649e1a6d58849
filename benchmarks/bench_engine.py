"""Benchmark: classic-cnn against PyTorch (CPU, eager), side by side, on four networks.

What is timed, for both engines, in the same run, for each network (the presets ``lenet5``
28×28×1, ``tinyvgg`` 64×64×3, ``article`` 32×32×3 and ``fashion``, the strong Fashion-MNIST
network, 28×28×1)::

    training step     forward + cross-entropy + backward + SGD(lr 0.01, momentum 0.9), batch 64, 256
    inference         softmax probabilities (predict_proba / no_grad + softmax), batch 1000
    latency           the same on one image

and once per run: the achieved GFLOP/s of each figure against a measured large-matrix-product
peak (NumPy's float32 BLAS); the peak memory (VmHWM, see :func:`_peak_rss_bytes`) of default
training epochs (the ``small`` network, ``cnn train``'s default) on
Fashion-MNIST in a child process that never imports torch, with its resident memory after each
epoch (no growth: epoch 5 within 5% of epoch 2); the start-up time of ``cnn --help`` and of
``cnn predict MODEL IMAGE`` as subprocesses.

Method: both models start from the same weights (ours copied into PyTorch, equal parameter
counts asserted, logits compared, and the first training losses where the network has no
dropout); each measurement is warmed up first (not timed), then timed in ``--repeats``
repeats, interleaved ours, torch, ours, torch, ..., each repeat running enough steps to last
``--min-time`` seconds. Reported: the median images per second of each engine, its spread
(min–max; the JSON also has the quartiles and every sample) and the ratio ours/torch of the
medians, with the min–max of the per-repeat ratios. NumPy's BLAS, classic-cnn's compiled loops
(numba) and PyTorch use the same number of threads.

Run it with ``make bench`` (installs the ``bench`` extra: torch and threadpoolctl), or
``python benchmarks/bench_engine.py [--threads N] [--repeats R] [--json PATH] [--quick]
[--networks lenet5,small] [--no-memory] [--no-startup]``.

The NumPy side (:func:`build_network`, :func:`ours_workload`, :func:`measure`,
:func:`memory_child`) imports neither torch nor threadpoolctl, so the test suite can run it
without the ``bench`` extra.
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
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import classic_cnn
from classic_cnn import (
    SGD,
    BatchNorm,
    Conv2D,
    CrossEntropyLoss,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    presets,
)

INPUT_SHAPE = (28, 28, 1)
CLASSES = 10
#: conv 6·(5·5·1) + 6, conv 16·(5·5·6) + 16, dense 400·120 + 120, 120·84 + 84, 84·10 + 10
LENET5_PARAMS = 61_706
LR, MOMENTUM = 0.01, 0.9
#: distinct training batches cycled through (the same data for both engines)
TRAIN_BATCHES = 4
#: the networks, by preset name; "fashion" is the strong Fashion-MNIST preset
NETWORKS = ("lenet5", "tinyvgg", "article", "fashion")
DEFAULT_NETWORK = presets.DEFAULT_PRESET

#: (key, label, kind, batch): kind is "train" (train step) or "infer" (softmax probabilities)
BENCHMARKS = (
    ("train64", "training step", "train", 64),
    ("train256", "training step", "train", 256),
    ("infer1000", "inference (predict_proba)", "infer", 1000),
    ("latency1", "single-image latency", "infer", 1),
)

#: ``--avx2``: the settings that make every library run the code paths of a CPU with AVX2 but
#: no AVX-512 (AMD EPYC, older Intel), set before any of them loads (PyTorch's ATen kernels and
#: oneDNN included; ONNX Runtime has no such setting and keeps its own choice)
ISA_ENV = {
    "OPENBLAS_CORETYPE": "Haswell",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NUMBA_CPU_NAME": "haswell",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}

MISSING_EXTRA = (
    "bench_engine.py compares classic-cnn with PyTorch and needs the 'bench' extra "
    "(torch==2.13.0, threadpoolctl), which is not installed here ({err}).\n"
    "Run `make bench` (it installs the extra into .venv, then runs this script), "
    "or `.venv/bin/pip install -e '.[bench]'`."
)


# --------------------------------------------------------------------------------------------
# The NumPy side (no torch, no threadpoolctl)
# --------------------------------------------------------------------------------------------


def build_network(name: str, seed: int = 0) -> Sequential:
    """A preset of the project (float32, channels-last), 10 classes."""
    return presets.build(name, classes=CLASSES, seed=seed)


def build_lenet(seed: int = 0) -> Sequential:
    """The LeNet-5-style network: the project's ``lenet5`` preset."""
    return build_network("lenet5", seed)


def make_batches(
    batch: int, count: int, seed: int, input_shape=INPUT_SHAPE
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` batches of random images (N, H, W, C) float32 in [0, 1) and labels (N,)."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((batch, *input_shape), dtype=np.float32),
            rng.integers(0, CLASSES, size=batch, dtype=np.int64),
        )
        for _ in range(count)
    ]


def flops_per_image(model: Sequential, kind: str) -> float:
    """Floating-point operations per image of the convolutions and dense layers (2 per
    multiply-accumulate): the forward pass, and for training also dL/dW of every layer and
    dL/dx of every layer but the first (which nobody needs)."""
    macs = [row["macs"] for row in model.summary_rows() if row["macs"]]
    if kind == "infer":
        return 2.0 * sum(macs)
    return 2.0 * (3 * sum(macs) - macs[0])


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


#: fit(): the share of the training images the default validation split holds (cnn train keeps
#: 5,000 of Fashion-MNIST's 60,000 for validation)
VAL_SHARE = 1 / 12


def make_images(count: int, seed: int, input_shape=INPUT_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random uint8 images (N, H, W, C) and labels: what fit() takes from a user."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *input_shape), dtype=np.uint8)
    return images, rng.integers(0, CLASSES, size=count, dtype=np.int64)


def ours_fit_workload(
    model: Sequential, images, labels, batch: int, val=None, checkpoint=None
) -> Workload:
    """One epoch of ``fit()`` on uint8 images as a user calls it (shuffled batches converted
    and normalised as they are drawn, running loss and accuracy, one line per epoch), with
    SGD(lr, momentum); with ``val`` and ``checkpoint``: validation after the epoch and the
    training state written (atomically) to ``checkpoint``. The preprocessing statistics are
    taken on the first call (run setup, not an epoch's work)."""
    import io

    from rich.console import Console

    from classic_cnn.train import fit

    optimizer = SGD(lr=LR, momentum=MOMENTUM)
    console = Console(file=io.StringIO())
    calls = itertools.count()

    def epoch():
        console.file = io.StringIO()
        state = fit(
            model,
            (images, labels),
            val,
            epochs=1,
            batch_size=batch,
            optimizer=optimizer,
            seed=next(calls),
            progress=False,
            console=console,
            checkpoint=checkpoint,
            restore_best=False,
        )
        return state.history[-1]["train_loss"]

    return Workload(step=epoch, batch=len(images))


def ours_steps_workload(model: Sequential, images, labels, batch: int) -> Workload:
    """The same epoch as :func:`ours_fit_workload` as ``train_step`` calls alone, on batches
    converted beforehand: what fit() would cost if it added nothing around the step."""
    from classic_cnn.data.batches import Preprocessing, iterate_batches
    from classic_cnn.data.dataset import Dataset

    prep = model.preprocessing or Preprocessing.from_dataset(
        Dataset(images, labels, classes=[str(k) for k in range(CLASSES)]), model.input_shape
    )
    order = np.random.default_rng(0)
    batches = list(iterate_batches(images, labels, batch, order, prep, dtype=model.dtype))
    loss, optimizer = CrossEntropyLoss(), SGD(lr=LR, momentum=MOMENTUM)

    def epoch():
        value = 0.0
        for x, y in batches:
            value = model.train_step(x, y, loss, optimizer)
        return value

    return Workload(step=epoch, batch=len(images))


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


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _maxrss_bytes()


def _peak_rss_bytes() -> int:
    """This process's own peak resident memory: ``VmHWM``, the high-water mark of the address
    space made at exec. ``ru_maxrss`` is not that on Linux: it carries the parent's size over
    fork/vfork + exec, so a child of a parent holding torch and its buffers would report the
    parent's peak. Falls back to ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _maxrss_bytes()


def _maxrss_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_child(epochs: int, limit: int | None, network: str = DEFAULT_NETWORK) -> dict:
    """Train ``network`` as ``cnn train`` does by default (Adam, batch 64, the Fashion-MNIST
    training images) for ``epochs`` epochs and report memory: the peak (VmHWM) at the end, the
    resident memory after loading the data and after each epoch. Run in a child process that
    never imports torch (:func:`run_memory_child`), so that the numbers are classic-cnn's."""
    from rich.console import Console

    from classic_cnn.data import load_dataset
    from classic_cnn.train import fit

    start_rss = _rss_bytes()
    data = load_dataset("fashion-mnist", "train")
    train = data.take(limit) if limit else data
    n = len(train)
    loaded_rss = _rss_bytes()
    after_epoch: list[int] = []
    seconds: list[float] = []
    t0 = [time.perf_counter()]

    def note(state, row):
        after_epoch.append(_rss_bytes())
        now = time.perf_counter()
        seconds.append(now - t0[0])
        t0[0] = now

    model = build_network(network, seed=0)
    fit(
        model,
        train,
        None,
        epochs=epochs,
        batch_size=64,
        optimizer="adam",
        callbacks=[note],
        progress=False,
        console=Console(quiet=True),
    )
    return {
        "network": network,
        "images": int(n),
        "epochs": epochs,
        "peak_rss_bytes": _peak_rss_bytes(),
        "ru_maxrss_bytes": _maxrss_bytes(),
        "rss_start_bytes": start_rss,
        "rss_after_load_bytes": loaded_rss,
        "rss_after_epoch_bytes": after_epoch,
        "epoch_seconds": seconds,
        "torch_imported": "torch" in sys.modules,
    }


def run_memory_child(epochs: int, limit: int | None, timeout: float = 3600) -> dict:
    """:func:`memory_child` in a fresh Python process (``--memory-child``); its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(epochs)]
    if limit:
        cmd += ["--memory-limit", str(limit)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cnn_command() -> list[str]:
    script = Path(sys.executable).with_name("cnn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "classic_cnn.cli"]


def startup_times(runs: int = 3) -> dict:
    """Median wall-clock seconds of ``cnn --help`` and of ``cnn predict MODEL IMAGE`` (an
    untrained default model and one 28×28 PNG), each a fresh subprocess."""
    from PIL import Image

    from classic_cnn import io
    from classic_cnn.data.batches import Preprocessing

    with tempfile.TemporaryDirectory() as tmp:
        model = build_network(DEFAULT_NETWORK)
        model.classes = [f"class {i}" for i in range(CLASSES)]
        model.preprocessing = Preprocessing((28, 28), 1, (0.3,), (0.35,), "dark")
        model_path = io.save(model, Path(tmp) / "model.safetensors")
        image = Path(tmp) / "image.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(image)
        commands = {
            "cnn --help": [*_cnn_command(), "--help"],
            "cnn predict MODEL IMAGE": [*_cnn_command(), "predict", str(model_path), str(image)],
        }
        out = {}
        for name, cmd in commands.items():
            subprocess.run(cmd, capture_output=True, check=False)  # warm the file cache
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                times.append(time.perf_counter() - t)
            out[name] = {
                "seconds_median": float(np.median(times)),
                "seconds": times,
                "returncode": done.returncode,
            }
        return out


def matmul_peak(size: int, seconds: float = 0.5) -> float:
    """Best GFLOP/s of NumPy's float32 matrix product ``size × size`` (the BLAS peak that the
    convolutions are measured against)."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    a @ b
    best, end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < end or best == math.inf:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best / 1e9


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


def torch_net_from(torch, ours: Sequential):
    """The same network in PyTorch (NCHW), holding a copy of ``ours``'s weights.

    Kernels KH×KW×C_in×C_out become C_out×C_in×KH×KW, dense weights in×out become out×in, and
    the dense layer after a Flatten has its rows reordered from our H·W·C flatten order to
    torch's C·H·W. Keras's 'same' padding becomes a ZeroPad2d (it may be uneven); batch norm
    keeps momentum and eps.
    """
    nn = torch.nn
    modules, copies = [], []
    shape = ours.input_shape
    flat_hwc = None
    for layer in ours.layers:
        out = layer.output_shape(shape)
        if isinstance(layer, Conv2D):
            kh, kw = layer.kernel_size
            (pt, pb), (pl, pr) = layer.pads(shape[:2])
            if (pt, pb, pl, pr) != (0, 0, 0, 0):
                modules.append(nn.ZeroPad2d((pl, pr, pt, pb)))
            conv = nn.Conv2d(shape[2], layer.filters, (kh, kw), layer.stride, bias=layer.use_bias)
            modules.append(conv)
            copies.append((conv.weight, layer.params["kernel"].transpose(3, 2, 0, 1)))
            if layer.use_bias:
                copies.append((conv.bias, layer.params["bias"]))
        elif isinstance(layer, MaxPool2D):
            modules.append(nn.MaxPool2d(layer.pool_size, layer.stride))
        elif isinstance(layer, ReLU):
            modules.append(nn.ReLU())
        elif isinstance(layer, Flatten):
            modules.append(nn.Flatten())
            flat_hwc = shape
        elif isinstance(layer, Dropout):
            modules.append(nn.Dropout(layer.rate))
        elif isinstance(layer, BatchNorm):
            cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            bn = cls(shape[-1], eps=layer.eps, momentum=layer.momentum)
            modules.append(bn)
            copies += [(bn.weight, layer.params["gamma"]), (bn.bias, layer.params["beta"])]
            copies += [
                (bn.running_mean, layer.buffers["running_mean"]),
                (bn.running_var, layer.buffers["running_var"]),
            ]
        elif isinstance(layer, Dense):
            lin = nn.Linear(shape[0], layer.units, bias=layer.use_bias)
            modules.append(lin)
            w = layer.params["kernel"]
            if flat_hwc is not None and len(flat_hwc) == 3:  # rows in H·W·C order → C·H·W
                w = w.reshape(*flat_hwc, -1).transpose(2, 0, 1, 3).reshape(w.shape)
                flat_hwc = None
            copies.append((lin.weight, w.T))
            if layer.use_bias:
                copies.append((lin.bias, layer.params["bias"]))
        else:
            raise ValueError(f"no PyTorch translation for {type(layer).__name__}")
        shape = out
    net = nn.Sequential(*modules)
    with torch.no_grad():
        for t, value in copies:
            t.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return net


def torch_lenet_from(torch, ours: Sequential):
    """The LeNet-5 of :func:`build_lenet` in PyTorch (see :func:`torch_net_from`)."""
    return torch_net_from(torch, ours)


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


def torch_fit_workload(torch, net, images, labels, prep, batch: int, val=None, checkpoint=None):
    """The loop a PyTorch user writes for one epoch, on tensors already in memory (normalised
    and NCHW beforehand, outside the timing): a random permutation, each batch gathered by
    index, SGD step, running loss and accuracy; with ``val``: evaluation in batches of 1,000
    under no_grad, then model and optimizer state saved with torch.save (to a temporary file
    renamed over ``checkpoint``, as classic-cnn writes it)."""

    def tensor(x):
        z = prep.apply(x, np.float32).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(z))

    x, y = tensor(images), torch.from_numpy(labels)
    xv = yv = None
    if val is not None:
        xv, yv = tensor(val[0]), torch.from_numpy(val[1])
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(0)

    def epoch():
        net.train()
        order = torch.randperm(len(x), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            out = net(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += int((out.argmax(dim=1) == yb).sum())
        if xv is not None:
            net.eval()
            with torch.no_grad():
                val_loss = sum(
                    float(loss_fn(net(xv[i : i + 1000]), yv[i : i + 1000])) * len(yv[i : i + 1000])
                    for i in range(0, len(xv), 1000)
                )
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "v": val_loss}
            tmp = f"{checkpoint}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, checkpoint)
        return total / len(x)

    return Workload(step=epoch, batch=len(x))


def ort_workload(ours: Sequential, x: np.ndarray, threads: int, folder: str) -> Workload:
    """ONNX Runtime (CPU execution provider, ``threads`` threads) on the model as ``cnn
    export`` writes it (channels-last input, softmax output): what a user would deploy."""
    import onnxruntime as ort

    from classic_cnn.export import export_onnx

    path = export_onnx(ours, Path(folder) / "model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # its threads sleep between runs instead of spinning: interleaved with the other engines,
    # spinning threads would take the cores from them (torch's single-image latency fell
    # from thousands of images per second to 12 with them)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return Workload(step=lambda: session.run(None, {name: x})[0], batch=len(x))


def torch_matmul_peak(torch, size: int, seconds: float = 0.5) -> float:
    """Best GFLOP/s of PyTorch's float32 ``size × size`` matrix product."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    a @ b
    best, end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < end or best == math.inf:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best / 1e9


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


def engine_products() -> str:
    """The library of classic-cnn's float32 matrix products and how it was chosen (measured on
    this machine, remembered, or asked for): oneMKL (with its version and code path) or
    NumPy's BLAS."""
    from classic_cnn import _blas

    chosen = _blas.choice()
    how = chosen.get("how", "")
    if "gflops" in chosen:
        g = chosen["gflops"]
        how += f": oneMKL {g['mkl']:.0f}, NumPy's BLAS {g['numpy']:.0f} GFLOP/s on one thread"
    if chosen["backend"] != "mkl":
        return f"NumPy's BLAS ({how})"
    try:
        from importlib import metadata

        version = f" {metadata.version('mkl')}"
    except metadata.PackageNotFoundError:  # the version is only informative
        version = ""
    path = chosen.get("mkl_code_path", "?")
    return f"oneMKL{version}, {path} code path, sequential, one call per engine thread ({how})"


def vector_extensions() -> str:
    """The CPU's vector instruction sets that decide the kernels (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    have = [name.upper() for name in wanted if name in flags]
    return ", ".join(have) or "no AVX2"


def compiled_target() -> str:
    """The CPU numba builds the compiled loops for (``NUMBA_CPU_NAME`` or this host's)."""
    try:
        import numba
        from llvmlite import binding
    except ImportError:
        return "numba not installed"
    name = numba.config.CPU_NAME
    return f"{name} (NUMBA_CPU_NAME)" if name else f"{binding.get_host_cpu_name()} (this host)"


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
        "torch_cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", str)(),
        # where classic-cnn's float32 matrix products run (classic_cnn/_blas.py)
        "engine_products": engine_products(),
        "vector_extensions": vector_extensions(),
        "compiled_target": compiled_target(),
        "kernel_settings": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
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


def run_benchmarks(
    torch,
    repeats: int,
    min_time: float,
    seed: int,
    networks=NETWORKS,
    log=print,
    threads: int = 1,
    folder: str | None = None,
    fit_batch: bool = True,
) -> tuple:
    """Every measurement of :data:`BENCHMARKS` on every network, inference also against ONNX
    Runtime where ``folder`` (for the exported models) is given, and with ``fit_batch`` one
    epoch through ``fit()`` (:func:`measure_fit`); returns ``(results, checks)``."""
    results, checks = [], {}
    for network in networks:
        for key, label, kind, batch in BENCHMARKS:
            ours = build_network(network, seed)
            net = torch_net_from(torch, ours)
            n_ours, n_torch = ours.count_params(), torch_count_params(net)
            assert n_ours == n_torch, f"{network}: {n_ours} parameters here, {n_torch} in torch"
            if network == "lenet5":
                assert n_ours == LENET5_PARAMS, (n_ours, LENET5_PARAMS)
            count = TRAIN_BATCHES if kind == "train" else 1
            batches = make_batches(batch, count, seed + batch, ours.input_shape)
            tbatches = to_torch_batches(torch, batches)
            if f"{network}_logits_max_abs_diff" not in checks:  # same network, same weights
                net.eval()
                with torch.no_grad():
                    theirs = net(tbatches[0][0]).numpy()
                diff = float(np.abs(ours.forward(batches[0][0]) - theirs).max())
                assert diff < 1e-3, f"{network}: logits differ by {diff}: not the same network"
                checks[f"{network}_logits_max_abs_diff"] = diff
            works = {
                "ours": ours_workload(ours, kind, batches),
                "torch": torch_workload(torch, net, kind, tbatches),
            }
            if kind == "infer" and folder is not None:  # the second peer: ONNX Runtime
                works["ort"] = ort_workload(ours, batches[0][0], threads, folder)
            log(f"  {network}: {label}, batch {batch} ...", flush=True)
            m = measure(works, repeats, min_time)
            has_dropout = any(isinstance(layer, Dropout) for layer in ours.layers)
            if kind == "train" and not has_dropout:  # dropout masks differ between engines
                lo, lt = works["ours"].losses, works["torch"].losses
                first = max(
                    abs(a - b) / max(abs(b), 1e-6) for a, b in zip(lo[:3], lt[:3], strict=True)
                )
                # same weights, data, loss and optimizer: the first steps' losses agree
                assert first < 1e-3, f"first training losses differ: {lo[:3]} vs {lt[:3]}"
                assert math.isfinite(lo[-1]) and math.isfinite(lt[-1]), (lo[-1], lt[-1])
                checks[f"{network}_{key}_first_losses_max_rel_diff"] = first
            o, t = m["ours"]["img_per_s"], m["torch"]["img_per_s"]
            paired = [a / b for a, b in zip(o["samples"], t["samples"], strict=True)]
            flops = flops_per_image(ours, kind)
            results.append(
                {
                    "network": network,
                    "key": key,
                    "label": label,
                    "kind": kind,
                    "batch": batch,
                    "params": n_ours,
                    "flops_per_image": flops,
                    "ours": m["ours"],
                    "torch": m["torch"],
                    "ours_gflops": o["median"] * flops / 1e9,
                    "torch_gflops": t["median"] * flops / 1e9,
                    "ratio_median": o["median"] / t["median"],
                    "ratio_paired_min": min(paired),
                    "ratio_paired_max": max(paired),
                }
            )
            if "ort" in m:
                r = m["ort"]["img_per_s"]
                paired = [a / b for a, b in zip(o["samples"], r["samples"], strict=True)]
                results[-1].update(
                    ort=m["ort"],
                    ratio_ort_median=o["median"] / r["median"],
                    ratio_ort_paired_min=min(paired),
                    ratio_ort_paired_max=max(paired),
                )
        if fit_batch:
            per_step = next(
                r["ours"]["seconds_per_step_median"]
                for r in results
                if r["network"] == network and r["key"] == "train64"
            )
            for with_val in (False, True):
                results.append(
                    measure_fit(torch, network, seed, repeats, min_time, per_step, with_val, log)
                )
    return results, checks


def measure_fit(torch, network, seed, repeats, min_time, per_step, with_val, log=print) -> dict:
    """One epoch through ``fit()`` against the same loop in PyTorch, and against the sum of
    its ``train_step`` calls (what the loop around the step costs). The epoch has at least 16
    steps of batch 64 and lasts about twice ``min_time``; with ``with_val`` a validation set of
    :data:`VAL_SHARE` of the training images is checked after it and a checkpoint written."""
    batch = 64
    steps = max(16, math.ceil(2 * min_time / max(per_step, 1e-9)))
    ours = build_network(network, seed)
    net = torch_net_from(torch, ours)
    images, labels = make_images(steps * batch, seed, ours.input_shape)
    val = make_images(math.ceil(len(images) * VAL_SHARE), seed + 1, ours.input_shape)
    with tempfile.TemporaryDirectory() as folder:
        kw = {"val": val, "checkpoint": Path(folder) / "state"} if with_val else {}
        fit_work = ours_fit_workload(ours, images, labels, batch, **kw)
        fit_work.step()  # takes the preprocessing statistics (run setup), then warms up
        works = {
            "ours": fit_work,
            "torch": torch_fit_workload(
                torch, net, images, labels, ours.preprocessing, batch, **kw
            ),
            "steps": ours_steps_workload(ours.copy(), images, labels, batch),
        }
        what = "fit() epoch" + (" + validation + checkpoint" if with_val else "")
        log(f"  {network}: {what}, {len(images):,} images, batch {batch} ...", flush=True)
        m = measure(works, repeats, min_time)
    o, t = m["ours"]["img_per_s"], m["torch"]["img_per_s"]
    paired = [a / b for a, b in zip(o["samples"], t["samples"], strict=True)]
    return {
        "network": network,
        "key": "fit64val" if with_val else "fit64",
        "label": what,
        "kind": "fit",
        "batch": batch,
        "images": len(images),
        "val_images": len(val[0]) if with_val else 0,
        "params": ours.count_params(),
        "ours": m["ours"],
        "torch": m["torch"],
        "steps": m["steps"],
        "ratio_median": o["median"] / t["median"],
        "ratio_paired_min": min(paired),
        "ratio_paired_max": max(paired),
        # fit()'s epoch time over the same epoch's train_step calls alone
        "fit_over_steps": m["steps"]["img_per_s"]["median"] / o["median"],
    }


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
        "classic-cnn vs PyTorch (CPU, eager) — the same networks, weights and data in both",
        f"machine : {info['cpu']}, {info['logical_cpus']} logical CPUs "
        f"({info['usable_cpus']} usable), {info['platform']}",
        f"versions: python {info['python']}, numpy {info['numpy']}, numba {info.get('numba')}, "
        f"torch {info['torch']}, classic-cnn {info['classic_cnn']}",
        f"threads : {info['threads']} (NumPy BLAS via threadpoolctl; numba.set_num_threads; "
        f"torch.set_num_threads → {info['torch_threads']}; oneDNN {info['torch_mkldnn']})",
        f"numpy BLAS: {blas or 'none found by threadpoolctl'}",
        f"products: classic-cnn's float32 matrix products on {info.get('engine_products')}",
        f"vectors : {info.get('vector_extensions')}; torch's kernels "
        f"{info.get('torch_cpu_capability')}; numba builds for "
        f"{info.get('compiled_target')}; settings: "
        + (" ".join(f"{k}={v}" for k, v in (info.get("kernel_settings") or {}).items()) or "none"),
        f"method  : float32, random data (fixed seed), warm-up excluded, {repeats} repeats "
        f"interleaved ours/torch, each ≥ {min_time:g} s; SGD lr {LR} momentum {MOMENTUM}, "
        "cross-entropy",
    ]
    if info.get("matmul_peak_gflops"):
        lines.append(
            f"peak    : float32 {info['matmul_size']}² matrix product, NumPy "
            f"{info['matmul_peak_gflops']:.1f} GFLOP/s, torch "
            f"{info['torch_matmul_peak_gflops']:.1f} GFLOP/s"
        )
    if info.get("load_average_before") and info.get("load_average_after"):
        before, after = info["load_average_before"], info["load_average_after"]
        lines.append(
            f"load    : 1-min load average {before[0]:.2f} before, {after[0]:.2f} after "
            f"(this run itself adds about {info['threads']}; more means other work shared the CPUs)"
        )
    logits = [v for k, v in checks.items() if k.endswith("logits_max_abs_diff")]
    losses = [v for k, v in checks.items() if k.endswith("first_losses_max_rel_diff")]
    if logits:
        text = f"checks  : equal parameter counts; logits differ ≤ {max(logits):.1e}"
        if losses:
            text += f"; first 3 training losses agree (rel. diff ≤ {max(losses):.1e})"
        lines.append(text)
    if repeats < 5:
        lines.append("note    : fewer than 5 repeats — a smoke run, not a measurement")
    return "\n".join(lines)


def format_table(results: list[dict], peak_gflops: float | None = None) -> str:
    head = (
        "network",
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
        "ours GFLOP/s",
        "torch GFLOP/s",
    )
    rows = [head]
    for r in results:
        o, t = r["ours"]["img_per_s"], r["torch"]["img_per_s"]
        og, tg = r.get("ours_gflops"), r.get("torch_gflops")
        pct = f" ({og / peak_gflops:.0%})" if og is not None and peak_gflops else ""
        rows.append(
            (
                r.get("network", "lenet5"),
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
                "" if og is None else f"{og:.2f}{pct}",
                "" if tg is None else f"{tg:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]

    def fmt(row):
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "-" * len(fmt(head))
    legend = (
        "img/s: median images per second; ours/torch > 1 means classic-cnn is faster; "
        "paired: per-repeat ratios; ms/step: median time of one call (one batch); "
        "GFLOP/s: conv + dense arithmetic achieved (share of the NumPy matrix-product peak)"
    )
    return "\n".join([rule, fmt(head), rule, *map(fmt, rows[1:]), rule, legend])


def onnxruntime_version() -> str | None:
    """ONNX Runtime's version where it and onnx are installed (the ``onnx`` extra), else None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def format_peers(results: list[dict], ort_version: str | None = None) -> str:
    """ONNX Runtime as the inference peer, and what fit() adds around its training steps."""
    lines = []
    ort = [r for r in results if "ort" in r]
    if ort:
        lines.append(
            f"vs ONNX Runtime {ort_version or ''} (CPU execution provider, same threads, the "
            "model as `cnn export` writes it; ours/ORT > 1 means classic-cnn is faster):"
        )
        for r in ort:
            o, t = r["ours"]["img_per_s"], r["ort"]["img_per_s"]
            lines.append(
                f"  {r.get('network', 'lenet5'):<8} {r['label']:<27} batch {r['batch']:>4}: "
                f"ours {_rate(o['median'])} img/s, ORT {_rate(t['median'])} img/s, ours/ORT "
                f"{r['ratio_ort_median']:.2f} (paired {r['ratio_ort_paired_min']:.2f}–"
                f"{r['ratio_ort_paired_max']:.2f})"
            )
    fits = [r for r in results if "fit_over_steps" in r]
    if fits:
        lines.append(
            "fit(): an epoch's time over the sum of its train_step calls alone (1.00: nothing "
            "added around the step):"
        )
        for r in fits:
            lines.append(
                f"  {r.get('network', 'lenet5'):<8} {r['label']:<40} {r['images']:>6,} images: "
                f"{r['fit_over_steps']:.3f} (steps alone {_rate(r['steps']['img_per_s']['median'])}"
                " img/s)"
            )
    return "\n".join(lines)


def format_extras(memory: dict | None, startup: dict | None) -> str:
    """The memory and start-up figures as lines of text."""
    lines = []
    if memory:
        if "error" in memory:
            lines.append(f"memory  : the training child failed: {memory['error']}")
        else:
            mib = 1024**2
            after = memory["rss_after_epoch_bytes"]
            lines.append(
                f"memory  : {memory['network']} network, {memory['images']:,} Fashion-MNIST "
                f"images, {memory['epochs']} epoch(s), Adam, batch 64, in a child process "
                f"without torch (torch imported: {memory['torch_imported']}): peak RSS "
                f"{memory['peak_rss_bytes'] / mib:,.0f} MiB (VmHWM; limit 1,024 MiB; "
                f"ru_maxrss {memory['ru_maxrss_bytes'] / mib:,.0f} MiB, which Linux carries "
                "over from the parent)"
            )
            lines.append(
                "          RSS after each epoch: "
                + ", ".join(f"{v / mib:,.0f}" for v in after)
                + " MiB; epoch seconds: "
                + ", ".join(f"{v:.1f}" for v in memory["epoch_seconds"])
            )
            if len(after) >= 5:
                growth = after[4] / after[1] - 1
                lines.append(f"          growth epoch 2 → 5: {growth:+.1%} (limit ±5%)")
    if startup:
        lines.append(
            "start-up: "
            + "; ".join(
                f"`{name}` {v['seconds_median']:.2f} s (exit {v['returncode']})"
                for name, v in startup.items()
            )
            + " (median of subprocess runs, numba's compiled loops cached on disk)"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time classic-cnn against PyTorch (CPU, eager) on four networks."
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for NumPy's BLAS, numba and torch (default: all usable cores)",
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
        "--networks",
        default=",".join(NETWORKS),
        help=f"comma-separated presets (default {','.join(NETWORKS)})",
    )
    p.add_argument(
        "--memory-epochs",
        type=int,
        default=None,
        help="epochs of the memory measurement (default 5; 1 with --quick)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--no-fit", action="store_true", help="skip the fit() epochs")
    p.add_argument(
        "--avx2",
        action="store_true",
        help="run every library on its AVX2 code path (as on AMD EPYC), whatever this CPU",
    )
    p.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime as inference peer")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up times")
    p.add_argument(
        "--quick",
        action="store_true",
        help="fast smoke run: 3 short repeats, memory on 2,000 images (not a measurement)",
    )
    p.add_argument("--memory-child", type=int, metavar="EPOCHS", help=argparse.SUPPRESS)
    p.add_argument("--memory-limit", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    args.min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.5)
    args.threads = args.threads if args.threads is not None else usable_cpus()
    if args.memory_epochs is None:
        args.memory_epochs = 1 if args.quick else 5
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in args.networks if n not in presets.PRESETS]
    if unknown:
        p.error(f"unknown network(s) {unknown}; presets: {', '.join(presets.PRESETS)}")
    if args.repeats < 1 or args.threads < 1 or args.min_time <= 0:
        p.error(
            "--repeats and --threads must be ≥ 1 and --min-time > 0. Received: "
            f"--repeats {args.repeats}, --threads {args.threads}, --min-time {args.min_time}"
        )
    return args


def set_compiled_threads(threads: int) -> str | None:
    """numba's thread count for the compiled loops (as many as BLAS and torch get)."""
    try:
        import numba
    except ImportError:
        return None
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return numba.__version__


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.avx2 and any(os.environ.get(k) != v for k, v in ISA_ENV.items()):
        # the libraries read these when they load: start again with them set
        argv = sys.argv[1:] if argv is None else list(argv)
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        return subprocess.run(cmd, env={**os.environ, **ISA_ENV}, check=False).returncode
    if args.memory_child is not None:  # the child: no torch, one JSON line
        set_compiled_threads(args.threads)
        print(json.dumps(memory_child(args.memory_child, args.memory_limit)))
        return 0
    torch, threadpoolctl = import_bench_extra()
    torch.set_num_threads(args.threads)
    numba_version = set_compiled_threads(args.threads)
    with threadpoolctl.threadpool_limits(limits=args.threads, user_api="blas"):
        info = describe_machine(torch, threadpoolctl, args.threads)
        info["numba"] = numba_version
        size = 1024 if args.quick else 2048
        info["matmul_size"] = size
        info["matmul_peak_gflops"] = matmul_peak(size)
        info["torch_matmul_peak_gflops"] = torch_matmul_peak(torch, size)
        count = (len(BENCHMARKS) + 2 * (not args.no_fit)) * len(args.networks)
        print(f"timing {count} measurements, {args.repeats} repeats each:", flush=True)
        ort_version = None if args.no_ort else onnxruntime_version()
        info["onnxruntime"] = ort_version
        with tempfile.TemporaryDirectory() as folder:
            results, checks = run_benchmarks(
                torch,
                args.repeats,
                args.min_time,
                args.seed,
                args.networks,
                threads=args.threads,
                folder=folder if ort_version else None,
                fit_batch=not args.no_fit,
            )
    info["load_average_after"] = load_average()
    memory = startup = None
    if not args.no_memory:
        print("  memory: training in a child process without torch ...", flush=True)
        memory = run_memory_child(args.memory_epochs, 2000 if args.quick else None)
    if not args.no_startup:
        print("  start-up times ...", flush=True)
        startup = startup_times(1 if args.quick else 5)
    print()
    print(format_header(info, args.repeats, args.min_time, checks))
    print(format_table(results, info["matmul_peak_gflops"]))
    peers = format_peers(results, info.get("onnxruntime"))
    if peers:
        print(peers)
    extras = format_extras(memory, startup)
    if extras:
        print(extras)
    command = "python benchmarks/bench_engine.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"command : {command.strip()}")
    if args.json:
        report = {
            "machine": info,
            "command": command.strip(),
            "config": {
                "repeats": args.repeats,
                "min_time_s": args.min_time,
                "seed": args.seed,
                "quick": args.quick,
                "lr": LR,
                "momentum": MOMENTUM,
                "networks": args.networks,
            },
            "checks": checks,
            "results": results,
            "memory": memory,
            "startup": startup,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
