"""The Fashion-MNIST accuracy campaign: train a preset with a stated recipe for several seeds,
choose on the validation split only, and measure the test split once per finished run.

    .venv/bin/python scripts/accuracy_campaign.py --preset fashion --epochs 15 --seeds 0 1 2
    .venv/bin/python scripts/accuracy_campaign.py --loss mse --lr-grid 0.05 0.1 0.2 --seeds 0

Each run: 5,000 training images held out for validation (stratified, seed-chosen), augmentation
(random shifts of up to 2 pixels with padding, horizontal flips; with ``--erase``, random erasing),
SGD with Nesterov momentum 0.9 (or cycled against the rate with ``--cycle-momentum``) and weight
decay, a one-cycle learning rate stepped every batch, kernels initialised as the preset says (or
with ``--init``). With ``--lr-grid`` the learning rate is chosen per seed by validation accuracy
after a short run of ``--grid-epochs``, before the full run; ``--decay-times-lr`` then gives each
rate tried the weight decay that keeps their product fixed. With ``--all-train`` (once the recipe
has been chosen on the validation split) the runs train on all 60,000 training images and no
validation accuracy is reported. Test accuracy is reported plain and with test-time flip averaging,
separately. Results go to ``--out/results.json`` (with each run's per-epoch curves) and a table on
stdout with the mean, best and worst seed and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console

from classic_cnn import SGD, OneCycle, evaluate, fit, presets
from classic_cnn.data import load_dataset
from classic_cnn.data.batches import Augment
from classic_cnn.init import INITIALIZERS
from classic_cnn.losses import CrossEntropyLoss, MSELoss


def run_one(args, seed, lr, epochs, train, val, console):
    model = presets.build(args.preset, seed=seed, kernel_initializer=args.init)
    steps = epochs * -(-len(train) // args.batch_size)
    loss = MSELoss() if args.loss == "mse" else CrossEntropyLoss(label_smoothing=args.smoothing)
    start = time.perf_counter()
    state = fit(
        model,
        train,
        val,
        epochs=epochs,
        batch_size=args.batch_size,
        optimizer=SGD(lr, momentum=0.9, nesterov=True, weight_decay=weight_decay(args, lr)),
        loss=loss,
        schedule=OneCycle(lr, total=steps, momentum_range=args.cycle_momentum),
        seed=seed,
        augment=Augment(shift=args.shift, flip=not args.no_flip, erase=args.erase),
        restore_best=False,
        console=console,
    )
    return model, time.perf_counter() - start, state.history


def weight_decay(args, lr: float) -> float:
    """The weight decay of a run at learning rate ``lr``: ``--weight-decay``, or with
    ``--decay-times-lr X``, X / lr (the decay each step takes, lr · wd · w, then stays the same
    whatever the rate: a loss whose gradients are ten times smaller, trained at a ten times
    larger rate, is not also decayed ten times harder)."""
    if args.decay_times_lr is not None:
        return args.decay_times_lr / lr
    return DEFAULT_WEIGHT_DECAY if args.weight_decay is None else args.weight_decay


DEFAULT_WEIGHT_DECAY = 5e-4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fashion")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lr-grid", type=float, nargs="*", default=None)
    p.add_argument("--grid-epochs", type=int, default=3)
    p.add_argument("--loss", choices=["cross-entropy", "mse"], default="cross-entropy")
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument(
        "--weight-decay", type=float, default=None, help=f"default {DEFAULT_WEIGHT_DECAY:g}"
    )
    p.add_argument(
        "--decay-times-lr",
        type=float,
        default=None,
        metavar="X",
        help="hold learning rate × weight decay at X: each rate tried (grid and full run) gets "
        "weight decay X / rate (cross-entropy's recipe: 0.1 × 5e-4 = 5e-5)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shift", type=int, default=2)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument(
        "--erase",
        type=float,
        default=0.0,
        metavar="P",
        help="random erasing: with probability P one box of each training image (2–40%% of its "
        "area) is filled with random values (default 0: none)",
    )
    p.add_argument(
        "--init",
        default=None,
        choices=INITIALIZERS,
        help="initialise the preset's convolution and dense kernels so (default: the preset's)",
    )
    p.add_argument(
        "--cycle-momentum",
        type=float,
        nargs=2,
        metavar=("BASE", "MAX"),
        default=None,
        help="cycle the momentum from MAX to BASE and back against the one-cycle rate "
        "(e.g. 0.85 0.95; default: a constant 0.9)",
    )
    p.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke)")
    p.add_argument(
        "--all-train",
        action="store_true",
        help="train on all 60,000 training images, no validation split (final runs of a recipe "
        "already chosen on the validation split; no --lr-grid)",
    )
    p.add_argument("--out", default="runs/campaign")
    p.add_argument(
        "--threads", type=int, default=None, help="threads for the engine and BLAS (default: all)"
    )
    args = p.parse_args()
    if args.all_train and args.lr_grid:
        p.error(
            "--lr-grid chooses on the validation split, which --all-train does not hold out: "
            "choose the learning rate without --all-train first. "
            f"Received: --all-train --lr-grid {' '.join(map(str, args.lr_grid))}"
        )
    if args.weight_decay is not None and args.decay_times_lr is not None:
        p.error(
            "give the weight decay either directly or as a product with the learning rate, "
            f"not both. Received: --weight-decay {args.weight_decay:g} "
            f"--decay-times-lr {args.decay_times_lr:g}"
        )
    if not 0.0 <= args.erase <= 1.0:
        p.error(f"--erase must be a probability in [0, 1]. Received: {args.erase:g}")
    if args.decay_times_lr is not None and args.decay_times_lr <= 0:
        p.error(f"--decay-times-lr must be positive. Received: {args.decay_times_lr:g}")
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    runs = []
    for seed in args.seeds:
        train, val = (full, None) if args.all_train else full.stratified_split(5000, seed=seed)
        if args.limit:
            train = train.take(args.limit)
        lr, grid = args.lr, {}
        for candidate in args.lr_grid or []:
            model, _, _ = run_one(args, seed, candidate, args.grid_epochs, train, val, console)
            grid[candidate] = evaluate(model, val)["accuracy"]
            console.print(
                f"seed {seed}: lr {candidate:g} → validation {100 * grid[candidate]:.2f}%"
            )
        if grid:
            lr = max(grid, key=grid.get)
        model, seconds, history = run_one(args, seed, lr, args.epochs, train, val, console)
        row = {
            "seed": seed,
            "lr": lr,
            "lr_grid_val_accuracy": grid,
            "weight_decay": weight_decay(args, lr),
            "val_accuracy": None if val is None else evaluate(model, val)["accuracy"],
            "train_images": len(train),
            "test_accuracy": evaluate(model, test)["accuracy"],
            "test_accuracy_flip_averaged": evaluate(model, test, flip=True)["accuracy"],
            "train_seconds": round(seconds, 1),
            "threads": args.threads,
            "history": history,
        }
        runs.append(row)
        console.print({k: v for k, v in row.items() if k != "history"})
        (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    accs = [r["test_accuracy"] for r in runs]
    summary = {
        "preset": args.preset,
        "loss": args.loss,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "mean_test_accuracy": statistics.mean(accs),
        "best": max(accs),
        "worst": min(accs),
        "mean_flip_averaged": statistics.mean(r["test_accuracy_flip_averaged"] for r in runs),
        "wall_seconds_per_run": [r["train_seconds"] for r in runs],
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=1)
    )
    console.print(summary)


if __name__ == "__main__":
    main()
