"""The training loop: epochs of forward → loss → backward → update, with a live view.

:func:`fit` trains a model on a :class:`~classic_cnn.data.Dataset` (or ``(images, labels)``
arrays) and returns the :class:`TrainingState`, the one object that holds everything training
has: model, optimizer (with its state), loss, each purpose's random Generator, epoch, step,
history and the best epoch's weights.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.batches import Augment, Preprocessing, convert_images, iterate_batches
from .data.dataset import Dataset
from .losses import Loss, get_loss
from .metrics import evaluate
from .model import Sequential
from .optim import SGD, Adam, Optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived; training stopped after the current step. ``checkpoint`` is
    where the state was saved (None when no checkpoint path was given)."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int = 0):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        where = f"; the state is saved in {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by signal {signum} after a complete step{where}")


@dataclass
class TrainingState:
    """Everything a training run holds; enough to continue it exactly."""

    model: Sequential
    optimizer: Optimizer
    loss: Loss
    rngs: dict[str, np.random.Generator]
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float = math.inf
    best_weights: dict[str, np.ndarray] | None = None
    stopped_early: bool = False
    #: position inside an unfinished epoch, so a checkpoint taken mid-epoch resumes exactly:
    #: the shuffling Generator's state when the epoch began, the batches done, running sums
    epoch_rng_state: dict | None = None
    batch_in_epoch: int = 0
    epoch_sums: dict = field(default_factory=dict)
    #: anything the caller wants kept with the state (the command line keeps its settings)
    extra: dict = field(default_factory=dict)

    def rng_states(self) -> dict:
        return {k: g.bit_generator.state for k, g in self.rngs.items()}

    def set_rng_states(self, states: dict) -> None:
        for k, s in states.items():
            self.rngs[k].bit_generator.state = s


def _as_arrays(data) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, Dataset):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if len(x) != len(y):
            raise ValueError(
                f"expected as many labels as images. Received: {len(x)} images, {len(y)} labels"
            )
        return x, y
    raise ValueError(
        "training data must be a Dataset or an (images, labels) pair. "
        f"Received: {type(data).__name__}"
    )


def make_optimizer(name: str, lr: float | None = None) -> Optimizer:
    """'sgd' (momentum 0.9, Nesterov) or 'adam', with a sensible default learning rate."""
    if name == "sgd":
        return SGD(lr or 0.05, momentum=0.9, nesterov=True)
    if name == "adam":
        return Adam(lr or 1e-3)
    raise ValueError(f"optimizer must be 'sgd' or 'adam'. Received: {name!r}")


def fit(
    model: Sequential,
    train,
    val=None,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    optimizer: Optimizer | str = "adam",
    loss: Loss | str = "cross-entropy",
    schedule: Callable[[int], float] | None = None,
    seed: int = 0,
    augment: Augment | None = None,
    early_stopping: int | None = None,
    restore_best: bool = True,
    callbacks: Sequence[Callable[[TrainingState, dict], object]] = (),
    progress: bool | None = None,
    console=None,
    state: TrainingState | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    extra: dict | None = None,
    workers=None,
    ray_address: str | None = None,
) -> TrainingState:
    """Train ``model`` on ``train``; check it on ``val`` after each epoch.

    Parameters
    ----------
    train, val : Dataset or (images, labels). uint8 images are converted to the model's input
        (size, channels) and normalised with the mean/std of ``train`` (recorded in
        ``model.preprocessing``); float images are used as given.
    epochs, batch_size : how long, in how large steps
    optimizer : an Optimizer, or 'sgd' / 'adam'
    loss : a Loss, or 'cross-entropy' / 'mse'
    schedule : epoch → learning rate (e.g. ``CosineDecay``), or step → learning rate for a
        schedule with ``per_step = True`` (``OneCycle``); None keeps the optimizer's
    seed : seeds shuffling and augmentation (independent streams); dropout uses the model's
    augment : random shifts / flips of the training images, or None
    early_stopping : stop after this many epochs without a lower validation loss
    restore_best : end with the weights of the epoch with the lowest validation loss
    callbacks : called as ``cb(state, row)`` after each epoch; returning "stop" ends training
    progress : live progress bar (default: when the console is a terminal); else one line per
        epoch
    state : continue from this training state instead of starting afresh (even mid-epoch)
    checkpoint : write the whole training state to this file (atomically) after every epoch,
        every ``checkpoint_every`` steps if given, and when Ctrl-C or SIGTERM stops training
        (after the current step; then :class:`TrainingInterrupted` is raised). A NaN or
        infinite loss raises :class:`TrainingDiverged` and leaves the last good checkpoint.
    extra : JSON-able data kept in the state and its checkpoints (e.g. the run's settings)
    workers : train data-parallel on this many Ray workers (see :mod:`classic_cnn.distributed`),
        or on a started :class:`~classic_cnn.distributed.WorkerGroup`; None trains in this
        process. Each step's global batch of ``batch_size`` images is shared among the workers
        and their gradients are summed, so the weights equal those of one process to float32
        rounding (batch norm aside: its batch statistics are per worker).
    ray_address : the Ray cluster to join (``HOST:PORT``, or ``auto``); None starts a local
        cluster on this machine for the run and shuts it down after (also on Ctrl-C)
    """
    from rich.console import Console

    console = console or Console()
    if progress is None:
        progress = console.is_terminal
    loss = get_loss(loss)
    model.check_loss(loss)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int. Received: epochs={epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int. Received: batch_size={batch_size!r}")

    x, y = _as_arrays(train)
    if not isinstance(train, Dataset) and x.dtype == np.uint8:
        # uint8 arrays are images: treat them as a Dataset (classes '0', '1', … unless the
        # model has names) so they are normalised, and the statistics recorded, the same way
        classes = model.classes or [str(k) for k in range(int(np.prod(model.output_shape)))]
        train = Dataset(x, y, classes=list(classes))
        x, y = train.images, train.labels
    if isinstance(train, Dataset):
        if model.preprocessing is None:
            model.preprocessing = Preprocessing.from_dataset(train, model.input_shape)
        model.classes = model.classes or list(train.classes)
    prep = model.preprocessing
    if x.dtype == np.uint8 and prep is not None:
        x = convert_images(x, prep.input_shape, prep.background)
    if val is not None:
        xv, yv = _as_arrays(val)
        if xv.dtype == np.uint8 and prep is not None:
            xv = convert_images(xv, prep.input_shape, prep.background)

    if state is None:
        shuffle_seq, augment_seq = np.random.SeedSequence(seed).spawn(2)
        opt = make_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
        state = TrainingState(
            model,
            opt,
            loss,
            {
                "shuffle": np.random.default_rng(shuffle_seq),
                "augment": np.random.default_rng(augment_seq),
                "dropout": model.dropout_rng,
            },
        )
    if extra:
        state.extra.update(extra)
    opt = state.optimizer
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    checkpoint = Path(checkpoint) if checkpoint else None
    per_step = getattr(schedule, "per_step", False)
    momentum_attr = None
    if getattr(schedule, "momentum_range", None) is not None:
        if getattr(opt, "momentum", 0):
            momentum_attr = "momentum"
        elif hasattr(opt, "beta1"):
            momentum_attr = "beta1"
        else:
            config = ", ".join(f"{k}={v!r}" for k, v in opt.get_config().items())
            raise ValueError(
                "the schedule cycles the momentum (momentum_range), which needs SGD with "
                f"momentum > 0 or Adam. Received: {type(opt).__name__}({config})"
            )
    group = own_group = None
    if workers is not None or ray_address:
        from .distributed import WorkerGroup

        if isinstance(workers, WorkerGroup):
            group = workers
        else:
            group = own_group = WorkerGroup(1 if workers is None else workers, ray_address)
        if batch_size < group.workers:
            raise ValueError(
                f"batch_size must be at least the number of workers ({group.workers}). "
                f"Received: batch_size={batch_size}"
            )
        try:
            group.start(model, loss)
        except BaseException:
            if own_group is not None:
                own_group.close()
            raise
    signals = _SignalCatcher()
    _print_header(console, progress)
    with signals, _closing(own_group):
        for epoch in range(state.epoch, epochs):
            if schedule is not None and not per_step:
                opt.lr = float(schedule(epoch))
            if state.batch_in_epoch == 0:
                state.epoch_rng_state = state.rngs["shuffle"].bit_generator.state
                state.epoch_sums = {"seen": 0, "correct": 0, "loss": 0.0, "seconds": 0.0}
            else:  # resuming inside an epoch: replay its order, skip the batches already done
                state.rngs["shuffle"].bit_generator.state = state.epoch_rng_state
            sums = state.epoch_sums
            t0 = time.perf_counter() - sums["seconds"]
            bar = _Bar(console, epoch, epochs, steps_per_epoch) if progress else None
            try:
                batches = iterate_batches(
                    x,
                    y,
                    batch_size,
                    state.rngs["shuffle"],
                    prep,
                    augment,
                    state.rngs["augment"],
                    model.dtype,
                    start_batch=state.batch_in_epoch,
                )
                for xb, yb in batches:
                    if per_step:
                        opt.lr = float(schedule(state.step))
                        if momentum_attr:
                            setattr(opt, momentum_attr, float(schedule.momentum(state.step)))
                    if group is None:
                        logits = model.forward(xb, training=True)
                        value = loss.forward(logits, yb)
                    else:  # the workers' summed gradient; the update is applied here
                        seeds = state.rngs["dropout"].integers(2**63, size=group.workers)
                        grads, value, right = group.step(xb, yb, seeds)
                    if not math.isfinite(value):
                        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
                        raise TrainingDiverged(
                            f"the loss became {value} at epoch {epoch + 1}, step {state.step + 1}: "
                            f"the learning rate ({opt.lr:g}) is probably too high{kept}"
                        )
                    if group is None:
                        model.backward(loss.backward(), input_grad=False)
                        opt.step(model.parameters(), model.gradients())
                        right = int((logits.argmax(axis=1) == yb).sum())
                    else:
                        opt.step(model.parameters(), grads)
                    state.step += 1
                    state.batch_in_epoch += 1
                    sums["seen"] += len(yb)
                    sums["correct"] += right
                    sums["loss"] += value * len(yb)
                    sums["seconds"] = time.perf_counter() - t0
                    if bar:
                        bar.update(
                            sums["seen"],
                            sums["loss"] / sums["seen"],
                            sums["correct"] / sums["seen"],
                            sums["seconds"],
                            f"  {group.alive()}/{group.workers} workers" if group else "",
                        )
                    if checkpoint and (
                        signals.caught or (checkpoint_every and state.step % checkpoint_every == 0)
                    ):
                        save_state(state, checkpoint)
                    if signals.caught:
                        raise TrainingInterrupted(signals.caught[0], checkpoint, state.step)
            finally:
                if bar:
                    bar.close()
            state.batch_in_epoch = 0
            seen, correct, total_loss = sums["seen"], sums["correct"], sums["loss"]
            row = {
                "epoch": epoch + 1,
                "train_loss": total_loss / seen,
                "train_accuracy": correct / seen,
                "val_loss": math.nan,
                "val_accuracy": math.nan,
                "lr": opt.lr,
                "seconds": 0.0,
                "images_per_second": 0.0,
            }
            train_seconds = sums["seconds"]
            if val is not None:
                result = evaluate(model, (xv, yv), loss=loss)
                row["val_loss"], row["val_accuracy"] = result["loss"], result["accuracy"]
            row["seconds"] = time.perf_counter() - t0
            row["images_per_second"] = seen / train_seconds
            state.history.append(row)
            state.epoch = epoch + 1
            _print_row(console, row, epochs, progress)
            if val is not None and row["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.best_epoch = row["val_loss"], epoch + 1
                state.best_weights = model.state_dict()
            if checkpoint:
                save_state(state, checkpoint)
            stop = any(cb(state, row) == "stop" for cb in callbacks)
            if (
                early_stopping
                and state.best_epoch is not None
                and state.epoch - state.best_epoch >= early_stopping
            ):
                console.print(
                    f"early stopping: no lower validation loss for {early_stopping} epochs "
                    f"(best: epoch {state.best_epoch})"
                )
                state.stopped_early = True
                stop = True
            if stop:
                break
    if restore_best and state.best_weights is not None and state.best_epoch != state.epoch:
        model.load_state_dict(state.best_weights)
        console.print(f"kept the weights of epoch {state.best_epoch} (lowest validation loss)")
    return state


@contextlib.contextmanager
def _closing(group):
    """Close the worker group (and the local Ray cluster it started) however training ends."""
    try:
        yield
    finally:
        if group is not None:
            group.close()


class _SignalCatcher:
    """While active (in the main thread), Ctrl-C and SIGTERM are noted instead of raising, so
    that training can finish its step and save before stopping."""

    def __init__(self):
        self.caught: list[int] = []
        self._old: dict = {}

    def _note(self, signum, frame):
        self.caught.append(signum)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False


# --------------------------------------------------------------------------------------------
# What the person sees
# --------------------------------------------------------------------------------------------

_COLUMNS = "epoch   train loss  train acc   val loss    val acc         lr     time    img/s"


def _print_header(console, progress):
    console.print(_COLUMNS, style="bold" if progress else None, highlight=False)


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def _print_row(console, row, epochs, progress):
    width = len(str(epochs))
    text = (
        f"{row['epoch']:>{width}}/{epochs:<{width}}".ljust(7)
        + f"{_fmt(row['train_loss']):>11}{_fmt(row['train_accuracy'], True):>11}"
        + f"{_fmt(row['val_loss']):>11}{_fmt(row['val_accuracy'], True):>11}"
        + f"{row['lr']:>11.3g}{row['seconds']:>8.1f}s{row['images_per_second']:>9.0f}"
    )
    console.print(text, highlight=False)


class _Bar:
    """A rich progress bar for one epoch: loss, accuracy, img/s and time left."""

    def __init__(self, console, epoch, epochs, steps):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("train", total=steps, stats="")
        self.progress.start()
        self.last = 0.0

    def update(self, seen, loss, acc, elapsed, note=""):
        if elapsed - self.last < 0.1:  # redraw at most ten times a second
            self.progress.advance(self.task)
            return
        self.last = elapsed
        stats = f"loss {loss:.4f}  acc {100 * acc:5.2f}%  {seen / max(elapsed, 1e-9):,.0f} img/s"
        stats += note
        self.progress.update(self.task, advance=1, stats=stats)

    def close(self):
        self.progress.stop()


def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.csv and history.json in the run folder (written atomically)."""
    from .io import atomic_write_bytes

    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / "history.json", json.dumps(history, indent=1).encode())
    import io as _io

    buf = _io.StringIO()
    if history:
        w = csv.DictWriter(buf, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    atomic_write_bytes(run_dir / "history.csv", buf.getvalue().encode())


# --------------------------------------------------------------------------------------------
# Saving and restoring the whole training state
# --------------------------------------------------------------------------------------------

STATE_FORMAT = "classic-cnn-training-state"


def save_state(state: TrainingState, path) -> Path:
    """Write everything in ``state`` to one ``.safetensors`` file, atomically: the model's
    weights, the optimizer's buffers and the best epoch's weights as tensors; the model's
    architecture and preprocessing, optimizer settings, step count, each Generator's state,
    epoch, step and history as JSON metadata."""
    from safetensors.numpy import save as st_save

    from .io import atomic_write_bytes

    model, opt = state.model, state.optimizer
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    for name, buffers in opt_sd["state"].items():
        for key, value in buffers.items():
            tensors[f"optimizer/{name}/{key}"] = value
    for k, v in (state.best_weights or {}).items():
        tensors[f"best/{k}"] = v
    meta = {
        "format": STATE_FORMAT,
        "format_version": "1",
        "architecture": model.get_config(),
        "classes": model.classes,
        "preprocessing": model.preprocessing.to_dict() if model.preprocessing else None,
        "optimizer": {
            "class": type(opt).__name__,
            "config": opt_sd["config"],
            "iterations": opt_sd["iterations"],
        },
        "loss": {"class": type(state.loss).__name__, "config": state.loss.get_config()},
        "rngs": state.rng_states(),
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_val_loss": None if math.isinf(state.best_val_loss) else state.best_val_loss,
        "stopped_early": state.stopped_early,
        "epoch_rng_state": state.epoch_rng_state,
        "batch_in_epoch": state.batch_in_epoch,
        "epoch_sums": state.epoch_sums,
        "extra": state.extra,
    }
    strings = {k: json.dumps(v) for k, v in meta.items()}
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    path = Path(path)
    atomic_write_bytes(path, st_save(tensors, metadata=strings))
    return path


def load_state(path) -> TrainingState:
    """Rebuild a :class:`TrainingState` written by :func:`save_state`; ``fit(..., state=...)``
    then continues exactly where it stopped."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a training-state file ({exc})") from None
    if raw.get("format") != json.dumps(STATE_FORMAT):
        raise ValueError(f"{path}: not a classic-cnn training-state file (a model file?)")
    try:
        return _state_from(meta={k: json.loads(v) for k, v in raw.items()}, tensors=tensors)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: the training state cannot be rebuilt ({exc})"[:500]) from None


def _state_from(meta: dict, tensors: dict) -> TrainingState:
    from .io import _check_tensors
    from .losses import LOSSES
    from .optim import OPTIMIZERS

    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    _check_tensors(meta["architecture"], weights)  # before building anything it describes
    model = Sequential.from_config(meta["architecture"])
    model.load_state_dict(weights)
    model.classes = meta["classes"]
    if meta["preprocessing"]:
        model.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    optimizers = {cls.__name__: cls for cls in OPTIMIZERS.values()}
    opt = optimizers[meta["optimizer"]["class"]](**meta["optimizer"]["config"])
    buffers: dict[str, dict[str, np.ndarray]] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer/"):
            name, key = k[len("optimizer/") :].rsplit("/", 1)
            buffers.setdefault(name, {})[key] = v
    opt.load_state_dict(
        {
            "config": meta["optimizer"]["config"],
            "iterations": meta["optimizer"]["iterations"],
            "state": buffers,
        }
    )
    losses = {cls.__name__: cls for cls in LOSSES.values()}
    loss = losses[meta["loss"]["class"]](**meta["loss"]["config"])
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
    state = TrainingState(
        model,
        opt,
        loss,
        {
            "shuffle": np.random.default_rng(),
            "augment": np.random.default_rng(),
            "dropout": model.dropout_rng,
        },
        epoch=meta["epoch"],
        step=meta["step"],
        history=meta["history"],
        best_epoch=meta["best_epoch"],
        best_val_loss=math.inf if meta["best_val_loss"] is None else meta["best_val_loss"],
        best_weights=best or None,
        stopped_early=meta["stopped_early"],
        epoch_rng_state=meta.get("epoch_rng_state"),
        batch_in_epoch=meta.get("batch_in_epoch", 0),
        epoch_sums=meta.get("epoch_sums") or {},
        extra=meta.get("extra") or {},
    )
    state.set_rng_states(meta["rngs"])
    return state


def new_head(model: Sequential, classes: int, seed: int = 0) -> Sequential:
    """A copy of ``model`` whose last dense layer is replaced by a fresh one of ``classes``
    units (initialised from ``seed``): fine-tuning a trained or imported network on new classes.
    Every other layer keeps its weights; classes, preprocessing and metadata are kept (the
    caller sets the new class names)."""
    from .layers import Dense

    dense = [i for i, layer in enumerate(model.layers) if isinstance(layer, Dense)]
    if not dense:
        raise ValueError(f"model '{model.name}' has no dense layer to replace with a new head")
    head = dense[-1]
    if any(layer.params for layer in model.layers[head + 1 :]):
        raise ValueError(
            f"model '{model.name}' has trained layers after its last dense layer "
            f"'{model.layers[head].name}'; a new head replaces the model's last trained layer"
        )
    config = model.get_config()
    config["layers"][head]["config"]["units"] = int(classes)
    config["seed"] = seed
    fresh = Sequential.from_config(config)
    for i, (new, old) in enumerate(zip(fresh.layers, model.layers, strict=True)):
        if i != head:
            for key in new.params:
                new.params[key][...] = old.params[key]
            for key in new.buffers:
                new.buffers[key][...] = old.buffers[key]
    fresh.preprocessing, fresh.metadata = model.preprocessing, dict(model.metadata)
    return fresh
