"""Measure what the README claims for the default network: `cnn train` with no options, then
`cnn test` on the full Fashion-MNIST test split; prints the accuracy and the wall time.

    .venv/bin/python scripts/measure_accuracy.py [--out runs/accuracy-default] [-- EXTRA ARGS]

Extra arguments after ``--`` go to ``cnn train`` (e.g. ``-- --arch lenet5``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accuracy-default")
    parser.add_argument("extra", nargs="*", help="arguments for cnn train")
    args = parser.parse_args()
    cnn = [sys.executable, "-m", "classic_cnn.cli"]
    start = time.perf_counter()
    subprocess.run([*cnn, "train", "--out", args.out, "--overwrite", *args.extra], check=True)
    train_s = time.perf_counter() - start
    out = subprocess.run(
        [*cnn, "test", str(Path(args.out) / "model.safetensors"), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads(out.stdout)
    result = {
        "command": "cnn train " + " ".join(args.extra),
        "test_accuracy": report["accuracy"],
        "test_images": report["n"],
        "train_seconds": round(train_s, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps(result, indent=1))
    (Path(args.out) / "accuracy.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
