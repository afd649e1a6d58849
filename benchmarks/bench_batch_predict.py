"""Benchmark: batch prediction of a folder on Ray (``cnn predict MODEL FOLDER --output``).

Writes N small images (28×28 grayscale PNGs, a thousand to a sub-folder, 1 in 1000 of them
damaged on purpose) into a temporary folder, saves an untrained model of ``--arch`` with
Fashion-MNIST's preprocessing, and classifies the folder into a CSV file with 1 and 2 workers.
Prints images per second and the peak memory:

- the driver's peak resident memory (VmHWM of this process, which lists the files, builds the
  dataset and writes the rows), and
- the peak, sampled every 0.2 s, of the summed resident memory of every process of the local
  cluster (driver, Ray's services and workers). Pages of Ray's shared object store are counted
  in each process that maps them, so this is an upper bound.

Run: ``python benchmarks/bench_batch_predict.py [--sizes 10000,30000,100000] [--workers 1,2]
[--arch fashion] [--json PATH]``; each (size, workers) pair runs in a fresh child process so
the driver's peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distributed import cpu_name


def write_images(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    have = len(list(root.rglob("*.png"))) if root.exists() else 0
    for i in range(have, n):
        sub = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:07d}.png"
        if i % 1000 == 999:
            path.write_bytes(b"\x89PNG\r\n\x1a\n damaged")
            continue
        image = (rng.random((28, 28)) * 60).astype(np.uint8)
        row = int(rng.integers(2, 24))
        image[row : row + 3, 4:24] = 220
        Image.fromarray(image).save(path, compress_level=1)


def write_model(arch: str, path: Path) -> None:
    import classic_cnn as cc
    from classic_cnn import presets
    from classic_cnn.data.batches import Preprocessing
    from classic_cnn.data.dataset import Dataset

    model = presets.build(arch, classes=10, seed=0)
    rng = np.random.default_rng(0)
    sample = Dataset(
        (rng.random((100, 28, 28, 1)) * 255).astype(np.uint8),
        rng.integers(0, 10, 100),
        classes=[f"class{k}" for k in range(10)],
    )
    model.preprocessing = Preprocessing.from_dataset(sample, model.input_shape)
    model.classes = list(sample.classes)
    cc.save(model, path)


def tree_rss(root_pid: int) -> int:
    """Summed resident bytes of ``root_pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def child(folder: str, model: str, workers: int, out: str) -> dict:
    from classic_cnn.distributed import predict_folder

    peak = {"tree": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], tree_rss(os.getpid()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = predict_folder(model, folder, out, workers=workers)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return {
        "images": result["images"],
        "errors": result["errors"],
        "predict_seconds": result["seconds"],
        "wall_seconds_with_cluster_start": wall,
        "images_per_second": result["images"] / result["seconds"],
        "driver_peak_rss_mb": hwm / 2**20,
        "cluster_peak_rss_mb": peak["tree"] / 2**20,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--arch", default="fashion")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, model, workers, out = args.child
        print(json.dumps(child(folder, model, int(workers), out)))
        return
    print(cpu_name())
    work = Path(tempfile.mkdtemp(prefix="bench-batch-predict-"))
    rows = []
    try:
        model = work / "model.safetensors"
        write_model(args.arch, model)
        for n in sorted(int(s) for s in args.sizes.split(",")):
            t0 = time.perf_counter()
            write_images(work / "images", n)
            print(f"{n:,} images written ({time.perf_counter() - t0:.0f} s)", flush=True)
            for w in (int(s) for s in args.workers.split(",")):
                out = work / f"preds-{n}-{w}.csv"
                cmd = [sys.executable, __file__, "--child", str(work / "images"), str(model)]
                done = subprocess.run(
                    [*cmd, str(w), str(out)], capture_output=True, text=True, check=True
                )
                row = {"n": n, "workers": w} | json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{n:>7,} images, {w} workers: {row['images_per_second']:6.0f} img/s, "
                    f"driver peak RSS {row['driver_peak_rss_mb']:.0f} MB, all processes "
                    f"{row['cluster_peak_rss_mb']:.0f} MB ({row['errors']} unreadable)",
                    flush=True,
                )
                out.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "arch": args.arch, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
