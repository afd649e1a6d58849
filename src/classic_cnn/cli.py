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
show_app = typer.Typer(
    help="Pictures (PNG files): a layer's filters, an image's feature maps, training curves.",
    no_args_is_help=True,
)
app.add_typer(show_app, name="show")

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


def _positive(value: float | None) -> float | None:
    """A strictly positive number (a learning rate of 0 would silently mean the default)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be greater than 0. Received: {value:g}")
    return value


def _probability(value: float) -> float:
    """A number in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be a probability in [0, 1]. Received: {value:g}")
    return value


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
        typer.Option(
            callback=_positive,
            help="Learning rate, greater than 0 (default: 0.001 for adam, 0.05 for sgd).",
        ),
    ] = None,
    optimizer: Annotated[OptimizerName, typer.Option(help="Optimizer.")] = OptimizerName.adam,
    loss: Annotated[
        LossName, typer.Option(help="Loss: cross-entropy, or mse (the article's).")
    ] = LossName.cross_entropy,
    augment: Annotated[
        bool, typer.Option(help="Random shifts of up to 2 pixels (and flips for photos).")
    ] = False,
    erase: Annotated[
        float,
        typer.Option(
            callback=_probability,
            help="Random erasing: with this probability one box (2-40% of the image) of each "
            "training image is filled with random values.",
        ),
    ] = 0.0,
    seed: Annotated[
        int, typer.Option(help="Seeds initialisation, split, shuffling, augmentation, dropout.")
    ] = 0,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="Threads for the engine and BLAS (default: all cores)."),
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
    checkpoint_every: Annotated[
        int | None,
        typer.Option(min=1, help="Also checkpoint every N steps (always: after each epoch)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue an interrupted run from its checkpoint.safetensors, with the run's "
            "own settings (the other options are ignored, but --threads)."
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            metavar="MODEL",
            help="Fine-tune this model file (trained here or made by cnn import) instead of "
            "a fresh --arch; its preprocessing is kept.",
        ),
    ] = None,
    new_head: Annotated[
        bool,
        typer.Option(
            help="With --init-from: replace the last dense layer by a fresh one sized to the "
            "data's classes (needed when their number differs)."
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train data-parallel on N Ray workers (each a full replica and a share of "
            "every batch; needs the ray extra). Default: in this process.",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Join this Ray cluster (HOST:PORT of `ray start --head`, or auto) instead of "
            "starting a local one."
        ),
    ] = None,
    worker_threads: Annotated[
        int, typer.Option(min=1, help="Threads (and CPUs reserved) for each Ray worker.")
    ] = 1,
) -> None:
    """Train a network; writes model.safetensors, the history, report.html and a checkpoint
    (after every epoch) to the run folder. Ctrl-C or SIGTERM stop after the current step, save
    the checkpoint and say how to resume."""
    if resume is not None:
        from .train import load_state

        state = load_state(resume)
        settings = state.extra.get("settings")
        if not settings:
            raise ValueError(f"{resume} was not written by cnn train: it has no run settings")
        typer.echo(f"resuming {settings['out']} at epoch {state.epoch + 1}, step {state.step}")
        _run_training(settings, threads, state)
        return
    if new_head and init_from is None:
        raise typer.BadParameter("--new-head needs --init-from MODEL", param_hint="--new-head")
    if init_from is not None:
        arch = str(init_from)
    settings = {
        "data": data,
        "arch": arch,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer.value,
        "loss": loss.value,
        "augment": augment,
        "erase": erase,
        "seed": seed,
        "val": val,
        "limit": limit,
        "early_stopping": early_stopping,
        "checkpoint_every": checkpoint_every,
        "workers": workers,
        "ray_address": ray_address,
        "worker_threads": worker_threads,
        "out": str(out or Path("runs") / f"{Path(arch).stem}-{_now()}"),
        "init_from": str(init_from) if init_from is not None else None,
        "new_head": new_head,
    }
    _check_run_dir(Path(settings["out"]), overwrite)
    _run_training(settings, threads)


def _run_training(s: dict, threads: int | None = None, state=None) -> Path:
    """Train as ``s`` (the run's settings) says, from scratch or from ``state``; write the run
    folder. Returns the model file's path."""
    from . import io, presets
    from .data.batches import Augment
    from .optim import CosineDecay
    from .train import TrainingInterrupted, fit, make_optimizer, write_history

    out = Path(s["out"])
    with _threads(threads):
        full = load_data(s["data"], "train")
        n_val = min(s["val"], len(full) // 5) if len(full) < 5 * s["val"] else s["val"]
        train_set, val_set = full.stratified_split(n_val, seed=s["seed"])
        if s["limit"]:
            train_set = train_set.take(s["limit"])
        if state is None and s.get("init_from"):
            model = _initial_model(s, full.classes)
            opt = make_optimizer(s["optimizer"], s["lr"])
            s["base_lr"] = opt.lr
        elif state is None:
            model = presets.build(s["arch"], classes=len(full.classes), seed=s["seed"])
            opt = make_optimizer(s["optimizer"], s["lr"])
            s["base_lr"] = opt.lr
        else:
            model, opt = state.model, state.optimizer
        typer.echo(
            f"training {model.name} ({model.count_params():,} parameters) on {full.name}: "
            f"{len(train_set):,} images, {len(val_set):,} held out for validation; "
            f"{s['optimizer']} lr {s['base_lr']:g} (cosine decay), {s['loss']} loss; "
            f"run folder {out}"
        )
        aug = Augment(
            shift=2 if s["augment"] else 0,
            flip=s["augment"] and full.background == "light",
            erase=s.get("erase", 0.0),  # runs saved before random erasing have none
        )
        aug = aug or None
        workers = None  # runs saved before scale-out have no workers
        if s.get("workers") or s.get("ray_address"):
            from .distributed import WorkerGroup

            n, each = s.get("workers") or 1, s.get("worker_threads") or 1
            where = s.get("ray_address") or "a local Ray cluster"
            threads_each = f"{each} thread{'s' if each > 1 else ''} each"
            typer.echo(f"data-parallel on {n} Ray workers, {threads_each} ({where})")
            workers = WorkerGroup(n, s.get("ray_address"), threads=each)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / "checkpoint.safetensors"
        try:
            state = fit(
                model,
                train_set,
                val_set,
                epochs=s["epochs"],
                batch_size=s["batch_size"],
                optimizer=opt,
                loss=s["loss"],
                schedule=CosineDecay(s["base_lr"], total=s["epochs"]),
                seed=s["seed"],
                augment=aug,
                early_stopping=s["early_stopping"],
                state=state,
                checkpoint=checkpoint,
                checkpoint_every=s["checkpoint_every"],
                extra={"settings": s},
                workers=workers,
            )
        except TrainingInterrupted as stop:
            typer.echo(
                f"\ninterrupted: the state after step {stop.step} is saved in {checkpoint}; "
                f"continue with: cnn train --resume {checkpoint}",
                err=True,
            )
            raise typer.Exit(128 + stop.signum) from None
        except RuntimeError as exc:
            from .distributed import WorkersLost

            if not isinstance(exc, WorkersLost) or not checkpoint.is_file():
                raise
            raise WorkersLost(
                f"{exc}; the last checkpoint is {checkpoint}: continue with cnn train --resume "
                f"{checkpoint}"
            ) from None
        finally:
            if workers is not None:
                workers.close()  # the local cluster too, if the group started one
    best = state.history[(state.best_epoch or state.epoch) - 1]
    hyper = {k: s[k] for k in ("arch", "epochs", "batch_size", "optimizer", "loss", "seed")}
    hyper |= {"lr": s["base_lr"], "schedule": "cosine", "threads": threads}
    hyper["augment"] = aug.to_dict() if aug else None
    path = io.save(
        model,
        out / "model.safetensors",
        dataset={"name": full.name, "source": full.source, "split_seed": s["seed"], "n_val": n_val},
        hyperparameters=hyper,
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
    info = {
        "data": f"{full.name} ({full.source})" if getattr(full, "source", None) else full.name,
        "architecture": s["arch"],
        "parameters": f"{model.count_params():,}",
        "training images": f"{len(train_set):,}",
        "validation images": f"{len(val_set):,}",
        "epochs": f"{state.epoch} of {s['epochs']}",
        "best epoch": best["epoch"],
        "validation accuracy": f"{100 * best['val_accuracy']:.2f}%",
        "validation loss": f"{best['val_loss']:.4f}",
        "optimizer": f"{s['optimizer']}, lr {s['base_lr']:g}, cosine decay",
        "loss": s["loss"],
        "batch size": s["batch_size"],
        "augment": ", ".join(
            part
            for part, on in (
                ("shifts", aug and aug.shift),
                ("flips", aug and aug.flip),
                (f"erasing {aug.erase:g}" if aug else "", aug and aug.erase),
            )
            if on
        )
        or "no",
        "seed": s["seed"],
        "model file": str(path),
    }
    report = _write_report(out, model, state.history, val_set, info)
    typer.echo(f"report: {report}")
    return path


def _initial_model(s: dict, classes: list[str]):
    """The model of ``--init-from``, with a new head when asked, named for the data's classes."""
    from . import io
    from .train import new_head

    model = io.load(s["init_from"])
    have = model.output_shape[-1]
    if s["new_head"]:
        model = new_head(model, len(classes), seed=s["seed"])
        typer.echo(f"fine-tuning {s['init_from']} with a new head of {len(classes)} classes")
    elif have != len(classes):
        raise ValueError(
            f"{s['init_from']} gives {have} class scores but the data has {len(classes)} "
            "classes: add --new-head to replace its last dense layer"
        )
    else:
        typer.echo(f"fine-tuning {s['init_from']}")
    model.classes = list(classes)
    return model


def _write_report(out: Path, model, history, val_set, info) -> Path:
    from .io import atomic_write_bytes
    from .viz.report import train_report

    path = out / "report.html"
    atomic_write_bytes(path, train_report(model, history, val_set, info).encode("utf-8"))
    return path


def _now() -> str:
    import datetime as dt

    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _not_under_a_file(folder: Path, what: str) -> None:
    """Refuse, before any work, a folder that is a regular file or lies under one."""
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot use {folder} as {what}: {parent} is a file")


def _check_output(
    path: Path, option: str, suffixes: tuple[str, ...], inputs=(), overwrite: bool | None = None
) -> None:
    """Refuse an output path that would destroy something: one that is an input of the
    command (even with --overwrite), one of another kind than the command writes (so that no
    model file can be replaced by a picture or a table), and, where the command has
    --overwrite (``overwrite`` not None), an existing file without it."""
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{option} must end in {' or '.join(suffixes)}. Received: {path}")
    if path.exists():
        for source in inputs:
            if Path(source).exists() and path.resolve() == Path(source).resolve():
                raise ValueError(f"{option} {path} is this command's input: choose another file")
        if path.is_dir():
            raise ValueError(f"{option} {path} is a folder: give a file name")
        if overwrite is False:
            raise ValueError(f"{path} exists: add --overwrite to replace it, or choose another")


def _check_run_dir(out: Path, overwrite: bool) -> None:
    _not_under_a_file(out, "a run folder")
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
    plots: Annotated[
        Path | None,
        typer.Option(
            help="Write confusion.png and misclassified.png (the most confidently wrong "
            "images) into this folder."
        ),
    ] = None,
) -> None:
    """Accuracy on the test split, per-class precision / recall / F1, confusion matrix.

    When the model's folder holds the report.html of its training run, the test results are
    added to it."""
    from . import io
    from .metrics import evaluate

    if plots is not None:
        _not_under_a_file(plots, "the --plots folder")
    model = io.load(model_path)
    source = data or (model.metadata.get("dataset") or {}).get("name") or DEFAULT_DATA
    test_set = load_data(source, "test", limit, model.classes)
    if model.classes and len(test_set.classes) != len(model.classes):
        raise ValueError(
            f"the model knows {len(model.classes)} classes but {source} has {len(test_set.classes)}"
        )
    result = evaluate(model, test_set)
    classes = model.classes or test_set.classes
    _test_pictures(model, model_path, test_set, source, classes, plots)
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


def _test_pictures(model, model_path: Path, test_set, source, classes, plots) -> None:
    """--plots: the confusion heat map and the most confidently misclassified images; and the
    test section of the run's report.html, when there is one."""
    report = model_path.parent / "report.html"
    if plots is None and not report.is_file():
        return
    from .viz.report import model_images

    images = model_images(model, test_set)
    probs = model.predict_proba(images)
    if plots is not None:
        from .metrics import confusion_matrix
        from .viz.arrays import most_confident_mistakes
        from .viz.plots import plot_confusion, plot_misclassified, save_png

        predicted = probs.argmax(axis=1)
        cm = confusion_matrix(test_set.labels, predicted, len(classes))
        wrong = most_confident_mistakes(probs, test_set.labels, 24)
        title = f"{model_path.name} on {source} test ({len(test_set):,} images)"
        save_png(plot_confusion(cm, classes, title), plots / "confusion.png")
        save_png(
            plot_misclassified(
                images[wrong],
                test_set.labels[wrong],
                predicted[wrong],
                probs[wrong, predicted[wrong]],
                classes,
                f"{title}: the {len(wrong)} most confidently misclassified",
            ),
            plots / "misclassified.png",
        )
        typer.echo(f"wrote {plots / 'confusion.png'} and {plots / 'misclassified.png'}", err=True)
    if report.is_file():
        from .io import atomic_write_bytes
        from .viz.report import replace_section, test_section

        html = replace_section(
            report.read_text(encoding="utf-8"), test_section(model, test_set, probs, source)
        )
        atomic_write_bytes(report, html.encode("utf-8"))
        typer.echo(f"added the test results to {report}", err=True)


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
        list[Path],
        typer.Argument(
            metavar="IMAGE...|FOLDER",
            help="Image files (any size), or with --output one folder (all depths).",
        ),
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
    output: Annotated[
        Path | None,
        typer.Option(
            help="Batch prediction of a FOLDER on Ray (needs the ray extra): one row per "
            "image (path, class, p_CLASS..., error) in this .csv or .parquet file."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Ray workers for --output (default 1).")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster (HOST:PORT, or auto) for --output."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output file.")] = False,
) -> None:
    """What does each image show? Top classes with probabilities; with --output, every image
    of a folder into a CSV or Parquet file, in parallel on Ray."""
    if output is not None or workers is not None or ray_address is not None:
        _predict_folder(model_path, images, output, workers, ray_address, invert, overwrite)
        return
    from . import io
    from .data.images import border_background, read_image, to_input

    model = io.load(model_path)
    prep = model.preprocessing
    if prep is None:
        raise ValueError(f"{model_path} records no preprocessing; it cannot take image files")
    classes = model.classes or [str(i) for i in range(model.output_shape[-1])]
    for image_path in images:  # check all before doing any work
        if image_path.is_dir():
            raise ValueError(
                f"{image_path} is a folder: give --output preds.csv (or .parquet) to classify "
                "every image in it"
            )
        if not image_path.is_file():
            raise ValueError(f"no such image file: {image_path}")
    if save_input:
        _not_under_a_file(save_input, "the --save-input folder")
    results, failed = [], []
    for image_path in images:
        try:
            image = read_image(image_path)
        except (ValueError, OSError) as exc:  # one unreadable image: the others still count
            failed.append((image_path, str(exc).splitlines()[0]))
            continue
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
        payload += [{"image": str(p), "error": why} for p, why in failed]
        typer.echo(json.dumps(payload, indent=1))
    else:
        for p, probs, order, flip in results:
            best = ", ".join(f"{classes[i]} {probs[i]:.2f}" for i in order[:top])
            typer.echo(f"{p}: {best}" + (" (inverted)" if flip else ""))
    for p, why in failed:
        typer.echo(f"error: {p}: {why}", err=True)
    if failed:
        raise typer.Exit(1)


def _predict_folder(model_path, images, output, workers, ray_address, invert, overwrite) -> None:
    """``cnn predict MODEL FOLDER --output FILE [--workers N] [--ray-address A]``."""
    from rich.console import Console

    from .distributed import predict_folder

    if output is None:
        raise ValueError("--workers and --ray-address need --output FILE (.csv or .parquet)")
    _check_output(output, "--output", (".csv", ".parquet"), [model_path, *images], overwrite)
    if len(images) != 1 or not images[0].is_dir():
        got = ", ".join(str(p) for p in images[:3]) + (" …" if len(images) > 3 else "")
        raise ValueError(f"--output expects one folder of images. Received: {got}")
    console = Console(stderr=True)
    bar = task = None
    if console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("predict"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,}  {task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    def progress(done, total, rate, alive):
        nonlocal task
        if bar is None:
            return
        if task is None:
            task = bar.add_task("predict", total=total, stats="")
            bar.start()
        bar.update(task, completed=done, stats=f"{rate:,.0f} img/s  {alive} workers")

    try:
        result = predict_folder(
            model_path,
            images[0],
            output,
            workers=workers or 1,
            address=ray_address,
            invert=invert.value,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.stop()
    errors = f", {result['errors']:,} unreadable (see the error column)" if result["errors"] else ""
    typer.echo(
        f"wrote {result['output']}: {result['images']:,} images{errors} in "
        f"{result['seconds']:.1f} s ({result['images'] / max(result['seconds'], 1e-9):,.0f} img/s)"
    )


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
# seeing inside: show filters / maps / curves, explain, tour
# --------------------------------------------------------------------------------------------

IMAGE_HELP = "An image file (any size), or SPLIT:N for image N of the model's dataset (test:0)."


def _load_model(model_path: Path):
    from . import io

    return io.load(model_path)


def _image_input(model, spec: str, invert: Invert):
    """An image argument as the model sees it: ``(seen uint8 H×W×C, float input 1×H×W×C,
    label)``. A file path, or ``SPLIT:N`` for image N of the model's dataset."""
    from .explain import prepare_image

    path = Path(spec)
    split, _, index = spec.partition(":")
    if not path.exists() and split in ("train", "test") and index.isdigit():
        from .viz.report import model_images

        source = (model.metadata.get("dataset") or {}).get("name") or DEFAULT_DATA
        data = load_data(source, split, classes=model.classes)
        i = int(index)
        if i >= len(data):
            raise ValueError(
                f"{spec}: {source} {split} has {len(data):,} images (0..{len(data) - 1})"
            )
        seen = model_images(model, data.take(i + 1))[i]
        x = model.preprocessing.apply(seen[None], model.dtype)
        truth = data.classes[data.labels[i]]
        return seen, x, f"{source} {split} image {i} (true class: {truth})", f"{split}{i}"
    if not path.is_file():
        raise ValueError(f"no such image file: {spec} (or give SPLIT:N, e.g. test:0)")
    from .data.images import read_image

    seen, x, flipped = prepare_image(model, read_image(path), invert.value)
    return seen, x, f"{path.name}" + (" (inverted)" if flipped else ""), path.stem


def _default_out(model_path: Path, out: Path | None, name: str) -> Path:
    """Where a picture goes: ``out`` (a .png file, never the model itself) or ``name`` beside
    the model. A picture of the same name is replaced: pictures are made again at will."""
    if out is None:
        return model_path.parent / name
    _check_output(out, "--out", (".png",), [model_path])
    return out


@show_app.command("filters")
@friendly
def show_filters(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model.safetensors file.")],
    layer: Annotated[
        str | None, typer.Option(help="A convolution layer's name (default: the first).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="PNG file (default: filters-LAYER.png by the model).")
    ] = None,
) -> None:
    """A grid of a convolution layer's kernels under one shared, stated colour scale."""
    from .explain import conv_layer_names
    from .viz.arrays import filter_grid
    from .viz.plots import plot_filters, save_png

    model = _load_model(model_path)
    names = conv_layer_names(model)
    if not names:
        raise ValueError(
            f"model '{model.name}' has no convolution layers "
            f"(layers: {', '.join(lyr.name for lyr in model.layers)})"
        )
    layer = layer or names[0]
    if layer not in names:
        raise ValueError(
            f"no convolution layer named {layer!r} in model '{model.name}'; valid: "
            f"{', '.join(names)}"
        )
    conv = next(lyr for lyr in model.layers if lyr.name == layer)
    grid = filter_grid(conv.params["kernel"])
    kh, kw, cin, cout = conv.params["kernel"].shape
    title = f"{model_path.name}: {layer}, {cout} kernels of {kh}×{kw}×{cin}"
    path = save_png(
        plot_filters(grid, title), _default_out(model_path, out, f"filters-{layer}.png")
    )
    typer.echo(f"{title}; {grid.scale_text()}")
    typer.echo(f"wrote {path}")


@show_app.command("maps")
@friendly
def show_maps(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model.safetensors file.")],
    image: Annotated[str, typer.Argument(metavar="IMAGE", help=IMAGE_HELP)],
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layer names (default: all with maps).")
    ] = None,
    invert: Annotated[
        Invert, typer.Option(help="Invert an image file to the training polarity.")
    ] = Invert.auto,
    out: Annotated[
        Path | None, typer.Option(help="PNG file (default: maps-IMAGE.png by the model).")
    ] = None,
) -> None:
    """The input, every conv / activation / pooling layer's feature maps, the probabilities."""
    from .explain import feature_maps
    from .viz.arrays import map_grid
    from .viz.plots import plot_feature_maps, save_png

    model = _load_model(model_path)
    seen, x, label, stem = _image_input(model, image, invert)
    wanted = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
    records = feature_maps(model, x, wanted)
    grids = [map_grid(r["name"], r["type"], r["maps"]) for r in records]
    probs = model.predict_proba(x)[0]
    classes = model.classes or [str(i) for i in range(len(probs))]
    fig = plot_feature_maps(seen, grids, probs, classes, label)
    path = save_png(fig, _default_out(model_path, out, f"maps-{stem}.png"))
    for g in grids:
        typer.echo(f"{g.name:16} {g.type:10} {g.shape_text}")
    best = int(probs.argmax())
    typer.echo(f"{label}: {classes[best]} {probs[best]:.2f}")
    typer.echo(f"wrote {path}")


@show_app.command("curves")
@friendly
def show_curves(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A training run's folder.")],
    out: Annotated[
        Path | None, typer.Option(help="PNG file (default: RUN_DIR/curves.png).")
    ] = None,
) -> None:
    """Loss and accuracy per epoch, training and validation."""
    from .viz.plots import plot_curves, save_png

    history_file = run_dir / "history.json"
    if not history_file.is_file():
        raise ValueError(f"{run_dir} is not a run folder: no history.json in it")
    try:
        history = json.loads(history_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{history_file}: invalid JSON ({exc.msg})") from None
    path = save_png(plot_curves(history, str(run_dir)), out or run_dir / "curves.png")
    last = history[-1]
    typer.echo(
        f"{len(history)} epochs; last: train loss {last['train_loss']:.4f}, val loss "
        f"{last['val_loss']:.4f}, val accuracy {100 * last['val_accuracy']:.2f}%"
    )
    typer.echo(f"wrote {path}")


class WhyMethod(str, Enum):
    gradcam = "gradcam"
    saliency = "saliency"
    gradient_x_input = "gradient-x-input"
    occlusion = "occlusion"


@app.command()
@friendly
def explain(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model.safetensors file.")],
    image: Annotated[str, typer.Argument(metavar="IMAGE", help=IMAGE_HELP)],
    layer: Annotated[
        str | None,
        typer.Option(
            help="A convolution, pooling or activation layer (with --why --method gradcam: the "
            "layer whose maps Grad-CAM weighs; default: the last before flattening)."
        ),
    ] = None,
    at: Annotated[
        str | None, typer.Option(metavar="ROW,COL", help="Position in the layer's output.")
    ] = None,
    filter_: Annotated[
        int | None,
        typer.Option("--filter", help="Filter / channel (default: the strongest there)."),
    ] = None,
    why: Annotated[
        bool,
        typer.Option(
            "--why", help="Why this class: a map of the pixels that pushed the network to it."
        ),
    ] = False,
    method: Annotated[
        WhyMethod, typer.Option(help="With --why: the attribution method.")
    ] = WhyMethod.gradcam,
    class_: Annotated[
        str | None,
        typer.Option("--class", help="With --why: the class to explain (default: the top one)."),
    ] = None,
    patch: Annotated[int, typer.Option(min=1, help="With --method occlusion: patch side.")] = 4,
    stride: Annotated[int, typer.Option(min=1, help="With --method occlusion: its stride.")] = 2,
    invert: Annotated[
        Invert, typer.Option(help="Invert an image file to the training polarity.")
    ] = Invert.auto,
    out: Annotated[
        Path | None, typer.Option(help="PNG file (default: explain-… or why-… by the model).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The record as JSON.")] = False,
) -> None:
    """The arithmetic behind one number of a feature map: patch × kernel, sum, bias,
    activation (or a pooling window and its winner), and the receptive field in the image.
    With --why: which pixels made the network choose a class (Grad-CAM, saliency, gradient ×
    input or occlusion), as a PNG of the map over the input."""
    if why:
        if at is not None or filter_ is not None:
            raise typer.BadParameter("--at and --filter take one number apart: not with --why")
        if layer is not None and method != WhyMethod.gradcam:
            raise typer.BadParameter(f"--layer is for --method gradcam, not {method.value}")
        options = {"patch": patch, "stride": stride} if method == WhyMethod.occlusion else {}
        if method == WhyMethod.gradcam:
            options = {"layer": layer}
        _explain_why(model_path, image, invert, out, as_json, method.value, class_, options)
        return
    if layer is None or at is None:
        raise typer.BadParameter(
            "give --layer and --at (the number to take apart), or --why (why this class)"
        )
    from .explain import explain as explain_
    from .explain import parse_position
    from .viz.plots import plot_explain, save_png

    model = _load_model(model_path)
    position = parse_position(at)
    seen, x, label, stem = _image_input(model, image, invert)
    e = explain_(model, x, layer, position, filter_)
    name = f"explain-{stem}-{layer}-{position[0]}-{position[1]}-{e.channel}.png"
    path = save_png(plot_explain(e, seen), _default_out(model_path, out, name))
    if as_json:
        typer.echo(json.dumps(e.to_dict() | {"image": label, "png": str(path)}))
        return
    typer.echo(f"{label}")
    typer.echo(e.to_text())
    typer.echo(f"wrote {path}")


def _explain_why(model_path, image, invert, out, as_json, method, target, options):
    """cnn explain --why: the attribution map over the input, as a PNG."""
    import re

    from .attribution import attribute
    from .viz.plots import plot_why, save_png

    model = _load_model(model_path)
    seen, x, label, stem = _image_input(model, image, invert)
    a = attribute(model, x, method, target, **options)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", a.class_name).strip("_") or str(a.class_index)
    path = save_png(
        plot_why(seen, a, label), _default_out(model_path, out, f"why-{stem}-{method}-{safe}.png")
    )
    if as_json:
        typer.echo(json.dumps(a.record() | {"image": label, "png": str(path)}))
        return
    typer.echo(label)
    typer.echo(
        f"why {a.class_name!r} ({'the top class' if a.chosen == 'top' else 'as asked'}, "
        f"probability {a.probability:.4f}): {a.scale_text()}"
    )
    typer.echo(f"wrote {path}")


@app.command()
@friendly
def tour(
    out: Annotated[
        Path | None, typer.Option(help="Also save the pictures as PNGs in this folder.")
    ] = None,
) -> None:
    """The article's figures, computed: convolution sizes, the curve detector (6600 vs 0),
    max pooling, softmax, one back-propagation step."""
    from .tour import run_tour

    run_tour(print_fn=typer.echo, out=out)


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
    settings = {
        "data": DEFAULT_DATA,
        "arch": "small",
        "epochs": epochs,
        "batch_size": 64,
        "lr": None,
        "optimizer": "adam",
        "loss": "cross-entropy",
        "augment": False,
        "seed": 0,
        "val": 5000,
        "limit": None,
        "early_stopping": None,
        "checkpoint_every": None,
        "out": str(out),
    }
    _run_training(settings)
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
@friendly
def serve(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model.safetensors file.")],
    host: Annotated[
        str, typer.Option(help="Address to listen on (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
) -> None:
    """The explorer: a local web page to draw or drop an image and watch the network think
    (predictions, every layer's feature maps, the arithmetic behind any number)."""
    try:
        from .serve import serve as serve_
    except ImportError as exc:
        raise RuntimeError(
            f"the explorer needs the 'serve' extra ({exc.name} is missing): "
            "pip install 'classic-cnn[serve]'"
        ) from None
    serve_(model_path, host=host, port=port, echo=typer.echo)


class Layout(str, Enum):
    nhwc = "nhwc"
    nchw = "nchw"


@app.command()
@friendly
def export(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model.safetensors file.")],
    onnx: Annotated[
        Path, typer.Option("--onnx", metavar="OUT.onnx", help="Write an ONNX file here.")
    ],
    layout: Annotated[
        Layout,
        typer.Option(help="Input layout: nhwc (channels-last, as the model file) or nchw."),
    ] = Layout.nhwc,
    softmax: Annotated[
        bool,
        typer.Option(
            "--softmax/--logits", help="End in probabilities (as predict) or in the logits."
        ),
    ] = True,
    opset: Annotated[int, typer.Option(help="ONNX operator set version (13 or newer).")] = 17,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.onnx file.")] = False,
) -> None:
    """Export a model to ONNX, checked with ONNX Runtime against this engine before writing."""
    import numpy as np

    from . import export as ex  # imports onnx only when it builds the graph
    from . import io

    _check_output(onnx, "--onnx", (".onnx",), [model_path], overwrite)
    model = io.load(model_path)
    try:
        proto = ex.build_onnx(model, layout=layout.value.upper(), softmax=softmax, opset=opset)
        probe = np.random.default_rng(0).standard_normal((8, *model.input_shape), np.float32)
        got, want = ex.compare_with_onnxruntime(
            model, proto, probe, layout=layout.value.upper(), softmax=softmax
        )
    except ImportError as exc:
        raise RuntimeError(str(exc)) from None
    diff = float(np.abs(got - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    if not diff <= 1e-4 * scale:
        raise RuntimeError(
            f"ONNX Runtime's outputs differ from this engine's by {diff:.3g} on random inputs; "
            f"nothing written to {onnx}"
        )
    io.atomic_write_bytes(onnx, proto.SerializeToString())
    name = "probabilities" if softmax or model.ends_in_softmax else "logits"
    shape = proto.graph.input[0].type.tensor_type.shape
    dims = [d.dim_param or str(d.dim_value) for d in shape.dim]
    typer.echo(
        f"wrote {onnx}: ONNX opset {opset}, input 'input' {'×'.join(dims)} (normalised: see "
        f"metadata 'preprocessing') → '{name}'; ONNX Runtime agrees with this engine to "
        f"{diff:.1e} on 8 random inputs"
    )


def _floats(value: str | None, option: str) -> list[float] | None:
    """'0.5' or '0.485,0.456,0.406' → floats (one per channel, or one for all)."""
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"expected a number or numbers separated by commas. Received: {value!r}",
            param_hint=option,
        ) from None


class Background(str, Enum):
    dark = "dark"
    light = "light"


@app.command("import")
@friendly
def import_(
    onnx_path: Annotated[
        Path, typer.Argument(metavar="MODEL.onnx", help="An ONNX file of a classic CNN.")
    ],
    out: Annotated[
        Path, typer.Option(metavar="OUT.safetensors", help="Write the model file here.")
    ],
    classes: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Class names, one a line (else: the file's metadata)."),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(
            help="Training normalisation x = (image/255 - mean)/std: one number or one per "
            "channel, comma-separated (else: the file's metadata, or 0)."
        ),
    ] = None,
    std: Annotated[str | None, typer.Option(help="See --mean (else: metadata, or 1).")] = None,
    background: Annotated[
        Background | None,
        typer.Option(help="dark (light objects on black, as MNIST) or light backgrounds."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT file.")] = False,
) -> None:
    """Import a classic CNN from ONNX (exported by PyTorch, Keras/tf2onnx or cnn export),
    checked with ONNX Runtime before writing; then test, explain, serve or fine-tune it."""
    import warnings

    import numpy as np

    from . import io

    _check_output(out, "--out", (".safetensors",), [onnx_path], overwrite)
    names = None
    if classes is not None:
        try:
            text = classes.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the class names in {classes}: {exc}") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{classes} lists no class names (expected one name a line)")
    try:
        from .onnx_import import OnnxImportWarning, compare_with_onnxruntime, import_onnx

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OnnxImportWarning)
            model = import_onnx(
                onnx_path,
                classes=names,
                mean=_floats(mean, "--mean"),
                std=_floats(std, "--std"),
                background=background.value if background else None,
            )
        for w in caught:
            typer.echo(f"warning: {w.message}", err=True)
        probe = np.random.default_rng(0).standard_normal((8, *model.input_shape), np.float32)
        diff = compare_with_onnxruntime(model, onnx_path, probe)
    except ImportError as exc:
        raise RuntimeError(str(exc)) from None
    if not diff <= 1e-4:
        raise RuntimeError(
            f"ONNX Runtime's outputs differ from the imported model's by {diff:.3g} on random "
            f"inputs; nothing written to {out}"
        )
    io.save(model, out)
    origin = model.metadata["imported_from"]
    shape = "×".join(str(d) for d in model.input_shape)
    typer.echo(
        f"imported {len(model.layers)} layers ({model.count_params():,} parameters) from "
        f"{onnx_path} ({origin['producer']}, {origin['input_layout']} input {shape}, "
        f"{model.output_shape[-1]} classes); ONNX Runtime agrees to {diff:.1e} on 8 random "
        f"inputs; wrote {out}"
    )
    typer.echo(f"look inside it: cnn serve {out}")


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    typer.echo(f"classic-cnn {__version__}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
