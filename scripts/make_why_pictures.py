"""The pictures of docs/seeing-inside.md's "Why this class?" section: Grad-CAM, saliency,
gradient × input and occlusion side by side on the same Fashion-MNIST test images, and a shirt
and a T-shirt each explained for both classes.

``python scripts/make_why_pictures.py [--model FILE] [--out docs] [--threads 1]``

Without ``--model`` it first trains LeNet-5 for three epochs on Fashion-MNIST
(``cnn train --arch lenet5 --epochs 3``, one thread by default: the machine may be shared) into
``runs/why-lenet5``, or reuses the model found there. Prints what the docs quote: each picture's
classes and probabilities.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("gradcam", "saliency", "gradient-x-input", "occlusion")
#: the test images shown: the first test image of each of these classes
SHOWN = ("T-shirt/top", "Shirt", "Pullover", "Trouser", "Sneaker", "Bag")


def trained_model(run_dir: Path, threads: int) -> Path:
    path = run_dir / "model.safetensors"
    if not path.exists():
        cmd = [
            sys.executable,
            "-m",
            "classic_cnn.cli",
            "train",
            "--arch",
            "lenet5",
            "--epochs",
            "3",
            "--threads",
            str(threads),
            "--out",
            str(run_dir),
        ]
        print("running:", " ".join(cmd[2:]))
        subprocess.run(cmd, check=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a trained Fashion-MNIST model file")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs")
    p.add_argument("--threads", type=int, default=1, help="threads for training (default 1)")
    args = p.parse_args(argv)

    from classic_cnn import io
    from classic_cnn.attribution import attribute
    from classic_cnn.data.named import load_dataset
    from classic_cnn.viz.plots import plot_why_table, save_png
    from classic_cnn.viz.report import model_images

    model_path = args.model or trained_model(ROOT / "runs" / "why-lenet5", args.threads)
    model = io.load(model_path)
    test = load_dataset("fashion-mnist", "test", download=False)
    images = model_images(model, test)
    probs = model.predict_proba(images)
    accuracy = float((probs.argmax(axis=1) == test.labels).mean())
    print(f"{model_path}: test accuracy {100 * accuracy:.2f}% on {len(test):,} images")
    classes = test.classes
    x = model.preprocessing.apply(images, model.dtype)

    # 1. the four methods on the same images, each for the class the network chose
    picks = [int(np.flatnonzero(test.labels == classes.index(c))[0]) for c in SHOWN]
    rows, labels = [], []
    for i in picks:
        rows.append([attribute(model, x[i], m) for m in METHODS])
        labels.append(f"test image {i}\ntrue: {classes[test.labels[i]]}")
        top = rows[-1][0]
        print(
            f"test {i}: true {classes[test.labels[i]]}, network {top.class_name} "
            f"({top.probability:.3f})"
        )
    fig = plot_why_table(
        images[picks], rows, labels, "Why this class? Four methods, each for the class chosen"
    )
    print("wrote", save_png(fig, args.out / "why-methods.png"))

    # 2. a shirt and a T-shirt, each explained for both classes
    pair = ("Shirt", "T-shirt/top")
    shirt = [int(i) for i in np.flatnonzero(test.labels == classes.index("Shirt"))[:40]]
    tee = [int(i) for i in np.flatnonzero(test.labels == classes.index("T-shirt/top"))[:40]]
    # a shirt and a T-shirt the network gets right, the surest of the first 40 of each
    best = []
    for ids in (shirt, tee):
        right = [i for i in ids if probs[i].argmax() == test.labels[i]]
        best.append(max(right, key=lambda i: probs[i].max()))
    rows, labels = [], []
    for i in best:
        rows.append([attribute(model, x[i], m, c) for m in ("gradcam", "occlusion") for c in pair])
        labels.append(f"test image {i}\ntrue: {classes[test.labels[i]]}")
        p = {c: probs[i, classes.index(c)] for c in pair}
        print(
            f"test {i}: true {classes[test.labels[i]]}, p(Shirt) {p['Shirt']:.3f}, "
            f"p(T-shirt/top) {p['T-shirt/top']:.3f}"
        )
    fig = plot_why_table(
        images[best], rows, labels, "A shirt and a T-shirt, each explained for both classes"
    )
    print("wrote", save_png(fig, args.out / "why-shirt-vs-tshirt.png"))

    # 3. the command line's own picture
    out = args.out / "why-cli.png"
    cmd = [
        sys.executable,
        "-m",
        "classic_cnn.cli",
        "explain",
        str(model_path),
        f"test:{best[0]}",
        "--why",
        "--out",
        str(out),
    ]
    print("running:", " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
