"""The ``cnn`` command: thin wiring of the library, no logic of its own.

Only light modules are imported at start-up so that ``cnn --help`` answers at once; each command
imports what it needs when it runs. Exit codes: 0 success, 2 usage error, 1 failure (one line
saying what went wrong and what to do; the traceback only with ``--debug``).
"""

from __future__ import annotations

import functools
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="classic-cnn: train, test, predict with and look inside a classic CNN built on NumPy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Datasets: what is available and where; downloads.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

_DEBUG = {"on": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _DEBUG["on"] = debug


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def friendly(fn):
    """Turn expected failures into one line on stderr and exit code 1 (not with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (ValueError, OSError, RuntimeError) as exc:
            if _DEBUG["on"]:
                raise
            _fail(str(exc) or type(exc).__name__)

    return wrapper


class LossName(str, Enum):
    cross_entropy = "cross-entropy"
    mse = "mse"


class OptimizerName(str, Enum):
    sgd = "sgd"
    adam = "adam"


class Invert(str, Enum):
    auto = "auto"
    yes = "yes"
    no = "no"


DEFAULT_DATA = "fashion-mnist"


def _threads(n: int | None):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n) if n else threadpool_limits(limits=None)


def load_data(data: str, split: str, limit: int | None = None, classes=None):
    """A named dataset, a folder of IDX files, or a folder of class sub-folders of images."""
    from .data import sources

    ds = sources.load(data, split, classes)
    for note in ds.notes:
        typer.echo(f"note: {note}", err=True)
    return ds.take(limit) if limit else ds


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


@app.command()
@friendly
def train(
    data: Annotated[
        str, typer.Option(help="Dataset name (fashion-mnist, mnist) or a folder.")
    ] = DEFAULT_DATA,
    arch: Annotated[
        str, typer.Option(help="Preset (small, lenet5, tinyvgg, article) or a .json/.toml file.")
    ] = "small",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training images.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 64,
    lr: Annotated[
        float | None,
        typer.Option(min=0.0, help="Learning rate (default: 0.001 for adam, 0.05 for sgd)."),
    ] = None,
    optimizer: Annotated[OptimizerName, typer.Option(help="Optimizer.")] = OptimizerName.adam,
    loss: Annotated[
        LossName, typer.Option(help="Loss: cross-entropy, or mse (the article's).")
    ] = LossName.cross_entropy,
    augment: Annotated[
        bool, typer.Option(help="Random shifts of up to 2 pixels (and flips for photos).")
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seeds initialisation, split, shuffling, augmentation, dropout.")
    ] = 0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="BLAS threads (default: all cores).")
    ] = None,
    val: Annotated[
        int, typer.Option(min=1, help="Training images held out for validation.")
    ] = 5000,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Train on the first N images only.")
    ] = None,
    early_stopping: Annotated[
        int | None, typer.Option(min=1, help="Stop after N epochs without a lower validation loss.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default: runs/ARCH-DATE-TIME).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Allow a non-empty run folder.")] = False,
) -> None:
    """Train a network; writes model.safetensors and the history to the run folder."""
    from . import io, presets
    from .data.batches import Augment
    from .optim import CosineDecay
    from .train import fit, make_optimizer, write_history

    out = out or Path("runs") / f"{Path(arch).stem}-{_now()}"
    _check_run_dir(out, overwrite)
    with _threads(threads):
        full = load_data(data, "train")
        n_val = min(val, len(full) // 5) if len(full) < 5 * val else val
        train_set, val_set = full.stratified_split(n_val, seed=seed)
        if limit:
            train_set = train_set.take(limit)
        model = presets.build(arch, classes=len(full.classes), seed=seed)
        opt = make_optimizer(optimizer.value, lr)
        typer.echo(
            f"training {model.name} ({model.count_params():,} parameters) on {full.name}: "
            f"{len(train_set):,} images, {len(val_set):,} held out for validation; "
            f"{optimizer.value} lr {opt.lr:g} (cosine decay), {loss.value} loss; run folder {out}"
        )
        aug = Augment(shift=2, flip=full.background == "light") if augment else None
        state = fit(
            model,
            train_set,
            val_set,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=opt,
            loss=loss.value,
            schedule=CosineDecay(opt.lr, total=epochs),
            seed=seed,
            augment=aug,
            early_stopping=early_stopping,
        )
    out.mkdir(parents=True, exist_ok=True)
    best = state.history[(state.best_epoch or state.epoch) - 1]
    path = io.save(
        model,
        out / "model.safetensors",
        dataset={"name": full.name, "source": full.source, "split_seed": seed, "n_val": n_val},
        hyperparameters={
            "arch": arch,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": optimizer.value,
            "lr": opt.lr if lr is None else lr,
            "schedule": "cosine",
            "loss": loss.value,
            "augment": aug.to_dict() if aug else None,
            "seed": seed,
            "threads": threads,
        },
        metrics={
            "val_loss": best["val_loss"],
            "val_accuracy": best["val_accuracy"],
            "epoch": best["epoch"],
        },
    )
    write_history(out, state.history)
    typer.echo(
        f"saved {path} (validation accuracy {100 * best['val_accuracy']:.2f}% at epoch "
        f"{best['epoch']}); test it with: cnn test {path}"
    )


def _now() -> str:
    import datetime as dt

    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_run_dir(out: Path, overwrite: bool) -> None:
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot use {out} as a run folder: {parent} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"run folder {out} is not empty: choose another --out, or add --overwrite")


# --------------------------------------------------------------------------------------------
# test, predict, summary
# --------------------------------------------------------------------------------------------


@app.command()
@friendly
def test(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model.safetensors file.")],
    data: Annotated[
        str | None, typer.Option(help="Dataset name or folder (default: the model's dataset).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Test on the first N images only.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Accuracy on the test split, per-class precision / recall / F1, confusion matrix."""
    from . import io
    from .metrics import evaluate

    model = io.load(model_path)
    source = data or (model.metadata.get("dataset") or {}).get("name") or DEFAULT_DATA
    test_set = load_data(source, "test", limit, model.classes)
    if model.classes and len(test_set.classes) != len(model.classes):
        raise ValueError(
            f"the model knows {len(model.classes)} classes but {source} has {len(test_set.classes)}"
        )
    result = evaluate(model, test_set)
    classes = model.classes or test_set.classes
    if as_json:
        payload = {
            "model": str(model_path),
            "data": source,
            "n": result["n"],
            "accuracy": result["accuracy"],
            "loss": result["loss"],
            "classes": classes,
            "precision": result["precision"].tolist(),
            "recall": result["recall"].tolist(),
            "f1": result["f1"].tolist(),
            "support": result["support"].tolist(),
            "confusion": result["confusion"].tolist(),
        }
        typer.echo(json.dumps(payload, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"test accuracy {100 * result['accuracy']:.2f}% on {result['n']:,} images of {source} "
        f"(loss {result['loss']:.4f})",
        highlight=False,
    )
    table = Table("class", "precision", "recall", "F1", "images")
    for i, name in enumerate(classes):
        table.add_row(
            name,
            f"{result['precision'][i]:.3f}",
            f"{result['recall'][i]:.3f}",
            f"{result['f1'][i]:.3f}",
            str(result["support"][i]),
        )
    console.print(table)
    console.print(_confusion_text(result["confusion"], classes), highlight=False)


def _confusion_text(cm, classes) -> str:
    """The confusion matrix as plain text: rows are true classes, columns predicted ones
    (numbered as the rows)."""
    width = max(len(str(cm.max())), len(str(len(classes) - 1))) + 1
    label = max(len(c) for c in classes) + 4
    head = " " * label + "".join(f"{j:>{width}}" for j in range(len(classes)))
    lines = ["confusion matrix (rows: true class, columns: predicted class)", head]
    for i, name in enumerate(classes):
        lines.append(f"{i:>2} {name:<{label - 3}}" + "".join(f"{v:>{width}}" for v in cm[i]))
    return "\n".join(lines)


@app.command()
@friendly
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model.safetensors file.")],
    images: Annotated[
        list[Path], typer.Argument(metavar="IMAGE...", help="Image files (any size).")
    ],
    top: Annotated[int, typer.Option(min=1, help="How many classes to show.")] = 3,
    invert: Annotated[
        Invert,
        typer.Option(
            help="Invert the image to match the training polarity: auto judges from the border."
        ),
    ] = Invert.auto,
    save_input: Annotated[
        Path | None, typer.Option(help="Save what the network sees as PNGs in this folder.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="All class probabilities as JSON.")
    ] = False,
) -> None:
    """What does each image show? Top classes with probabilities."""
    from . import io
    from .data.images import border_background, read_image, to_input

    model = io.load(model_path)
    prep = model.preprocessing
    if prep is None:
        raise ValueError(f"{model_path} records no preprocessing; it cannot take image files")
    classes = model.classes or [str(i) for i in range(model.output_shape[-1])]
    for image_path in images:  # check all before doing any work
        if not image_path.is_file():
            raise ValueError(f"no such image file: {image_path}")
    results = []
    for image_path in images:
        image = read_image(image_path)
        flip = invert == Invert.yes or (
            invert == Invert.auto and border_background(image) != prep.background
        )
        seen = to_input(image, prep.size, prep.channels, invert=flip)
        if save_input:
            _save_png(save_input / f"{image_path.stem}.input.png", seen)
        probs = model.predict_proba(seen[None])[0]
        order = probs.argsort()[::-1]
        results.append((image_path, probs, order, flip))
    if as_json:
        payload = [
            {
                "image": str(p),
                "inverted": bool(flip),
                "prediction": classes[int(order[0])],
                "probabilities": {c: float(v) for c, v in zip(classes, probs, strict=True)},
            }
            for p, probs, order, flip in results
        ]
        typer.echo(json.dumps(payload, indent=1))
        return
    for p, probs, order, flip in results:
        best = ", ".join(f"{classes[i]} {probs[i]:.2f}" for i in order[:top])
        typer.echo(f"{p}: {best}" + (" (inverted)" if flip else ""))


def _save_png(path: Path, image) -> None:
    from PIL import Image

    from .io import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    import io as _io

    buf = _io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


@app.command()
@friendly
def summary(
    model_path: Annotated[
        Path | None, typer.Argument(metavar="[MODEL]", help="A model file.")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="Preset or architecture file.")] = None,
    classes: Annotated[int, typer.Option(min=1, help="Classes, for --arch.")] = 10,
) -> None:
    """Each layer's output shape, parameters and multiply-accumulates per image."""
    from . import io, presets

    if (model_path is None) == (arch is None):
        raise typer.BadParameter("give either a MODEL file or --arch PRESET|FILE")
    model = io.load(model_path) if model_path else presets.build(arch, classes=classes)
    model.summary(print_fn=typer.echo)


# --------------------------------------------------------------------------------------------
# data, demo, version
# --------------------------------------------------------------------------------------------


@data_app.command("list")
@friendly
def data_list() -> None:
    """Known datasets, where each was found, or how to get it."""
    from .data import named

    for row in named.dataset_status():
        typer.echo(_status_line(row))


def _status_line(row: dict) -> str:
    if row["status"] == "missing":
        how = "cnn data fetch " + row["name"] if row["downloadable"] else "see README"
        return f"{row['name']:15} missing   (download into {row['cache']} with: {how})"
    return f"{row['name']:15} {row['status']:9} {row['where']}: {row['path']}"


@data_app.command("fetch")
@friendly
def data_fetch(name: Annotated[str, typer.Argument(help="fashion-mnist or mnist")]) -> None:
    """Download a dataset into the user cache folder (checksums verified)."""
    from .data import named

    typer.echo(f"{name}: {named.fetch(name)}")


@app.command()
@friendly
def demo(
    epochs: Annotated[int, typer.Option(min=1, help="Epochs to train.")] = 10,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
) -> None:
    """Train the default network on Fashion-MNIST, test it, predict a few test images."""
    train(
        data=DEFAULT_DATA,
        arch="small",
        epochs=epochs,
        batch_size=64,
        lr=None,
        optimizer=OptimizerName.adam,
        loss=LossName.cross_entropy,
        augment=False,
        seed=0,
        threads=None,
        val=5000,
        limit=None,
        early_stopping=None,
        out=out,
        overwrite=True,
    )
    model_file = out / "model.safetensors"
    test(model_path=model_file, data=None, limit=None, as_json=False)
    from . import io

    model = io.load(model_file)
    test_set = load_data(DEFAULT_DATA, "test", 8)
    probs = model.predict_proba(test_set.images)
    typer.echo("a few test images, predicted:")
    for i, p in enumerate(probs):
        order = p.argsort()[::-1][:3]
        guess = ", ".join(f"{model.classes[k]} {p[k]:.2f}" for k in order)
        truth = test_set.classes[test_set.labels[i]]
        mark = "✓" if order[0] == test_set.labels[i] else "✗"
        typer.echo(f"  {mark} image {i}: {guess}   (truth: {truth})")


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    typer.echo(f"classic-cnn {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
