"""Scale-out on Ray: data-parallel training and batch prediction across machines.

Ray (the optional extra ``classic-cnn[ray]``) is imported only when one of these runs, so
``import classic_cnn`` and ``cnn --help`` never load it.

**Data-parallel training** (:class:`WorkerGroup`, used by ``fit(..., workers=N)``). The process
that calls :func:`~classic_cnn.train.fit` (the *driver*) keeps the one authoritative training
state: model, optimizer, Generators, checkpoints. Each of the N *workers* is a Ray actor holding
a full replica of the model. Every step:

1. the driver cuts the global batch of B images into N contiguous shards of sizes n_i (they differ
   by at most one image) and broadcasts the current weights once through Ray's object store;
2. worker i runs forward, loss and backward on its shard and returns its mean gradient g_i scaled
   by n_i / B (so that the sum is the mean over the global batch), its summed loss and its
   count of correct predictions;
3. the driver adds the N gradients in worker order 0, 1, …, N-1 (a fixed order: the same seed
   and worker count give bit-identical weights) and applies the optimizer's update once; the
   updated weights go out with the next step.

This is an all-reduce done as a reduce at the driver plus a broadcast: every replica starts each
step from the same weights, exactly as if each had applied the same update. Ray's collective
library needs pygloo for CPUs, of which pip found no distribution for Python 3.11; this needs
only actors and the object store. Its cost per step is two transfers of the parameters (4 bytes
each) per worker, measured in the README's "Scale out" section.

Batch norm computes its batch statistics on each worker's shard, as PyTorch's
DistributedDataParallel does by default; the running statistics kept in the model (and saved) are
worker 0's. Dropout masks come from a seed the driver draws for each worker and step from its
dropout Generator, so a run is reproducible and a repeated step draws the same masks.

**Faults.** A worker that dies (its process killed, its machine gone) or does not answer within
``step_timeout`` seconds makes the driver replace all workers with fresh ones loaded from its own
state and repeat the step: the run ends with the weights an uninterrupted run gives. After
``max_restarts`` replacements the run stops with :class:`WorkersLost` (one line); checkpoints are
written by the driver only, atomically, as without workers.

**Batch prediction** (:func:`predict_folder`): Ray Data reads the images of a folder in parallel
on N actors that each load the model once, predicts in batches and streams the rows (path, class,
probability of each class, error) into one CSV or Parquet file, written atomically.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

#: what the CLI and errors say to install when Ray is missing
INSTALL_HINT = "pip install 'classic-cnn[ray]'"


class WorkersLost(RuntimeError):
    """Workers kept failing: the run stopped after ``max_restarts`` replacements."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(
            f"scale-out (--workers) needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive int. Received: workers={workers!r}")
    return int(workers)


@contextmanager
def cluster(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict]:
    """Connect to a Ray cluster for the duration of the block.

    Without ``address`` a local cluster is started on this machine (``num_cpus`` CPUs, no
    dashboard) and shut down on leaving, also on Ctrl-C or an error. With ``address``
    (``HOST:PORT`` of a head started with ``ray start --head``, or ``auto``) this process joins
    that cluster and only disconnects on leaving. If Ray is already initialised in this process,
    that connection is used and left as it is. Yields ``{"address": ..., "cpus": ...}``.
    """
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs = dict(
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            configure_logging=True,
        )
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local": always a new cluster, never one `ray start` left running here
                cpus = num_cpus or os.cpu_count() or 1
                ray.init(address="local", num_cpus=cpus, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise RuntimeError(f"could not connect to {where}: {first}") from None
        started = True
    try:
        _quiet_ray_data()
        yield {
            "address": address or "local",
            "cpus": int(ray.cluster_resources().get("CPU", 0)),
        }
    finally:
        if started:
            ray.shutdown()


def _first_line(lines: list[str], exc: BaseException) -> str:
    text = "\n".join(lines).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _too_few_cpus(info: dict, workers: int, threads: int) -> str:
    return (
        f"expected a Ray cluster with at least {workers * threads} CPUs ({workers} workers × "
        f"{threads} thread{'s' if threads > 1 else ''} each). Received: {info['cpus']} CPUs "
        f"at {info['address']}"
    )


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds when nothing listens at ``HOST:PORT`` (``ray.init``
    itself keeps retrying for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected a Ray address HOST:PORT (or auto). Received: {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RuntimeError(
            f"could not connect to the Ray cluster at {address}: {reason} (is `ray start "
            "--head` running there, and the port open?)"
        ) from None


def _quiet_ray_data() -> None:
    """Ray Data draws its own progress bars and logs per operator; the command draws one."""
    try:
        from ray.data import DataContext
    except ImportError:  # pragma: no cover - ray without its data extra
        return
    import warnings

    with warnings.catch_warnings():  # Ray's own deprecated settings, copied on first use
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = DataContext.get_current()
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines per dataset run
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True


# --------------------------------------------------------------------------------------------
# Data-parallel training
# --------------------------------------------------------------------------------------------


class _Replica:
    """One worker: a full replica of the model that computes the gradient of its shard."""

    def __init__(self, rank: int, threads: int):
        from threadpoolctl import threadpool_limits

        # the same thread count on every run keeps the sums, hence the weights, bit-identical
        self._limits = threadpool_limits(limits=threads)
        self.rank = rank
        self.model = self.loss = None

    def load(self, config: dict, weights: dict, loss: tuple) -> int:
        """Become a replica of the model ``config`` with ``weights`` (and buffers), ``loss``."""
        from .losses import LOSSES
        from .model import Sequential

        self.model = Sequential.from_config(config)
        self.model.load_state_dict(weights)
        losses = {cls.__name__: cls for cls in LOSSES.values()}
        self.loss = losses[loss[0]](**loss[1])
        return self.rank

    def pid(self) -> int:
        return os.getpid()

    def gradients(self, weights: dict, x: np.ndarray, y: np.ndarray, seed: int, scale: float):
        """Forward, loss and backward on this worker's shard, from ``weights``.

        Returns ``(gradients × scale, loss × n, correct, buffers, seconds)``; ``buffers``
        (batch-norm running statistics) only from worker 0, whose statistics the model keeps;
        ``seconds`` is the time spent here (the rest of a step is communication).
        """
        t0 = time.perf_counter()
        model = self.model
        params = model.parameters()
        for k, v in weights.items():
            params[k][...] = v
        model.dropout_rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        logits = model.forward(x, training=True)
        value = self.loss.forward(logits, y)
        correct = int((logits.argmax(axis=1) == y).sum())
        grads = {}
        if math.isfinite(value):
            model.backward(self.loss.backward(), input_grad=False)
            s = model.dtype.type(scale)
            grads = {k: g * s for k, g in model.gradients().items()}
        buffers = None
        if self.rank == 0:
            buffers = {f"{lyr.name}.{k}": v for lyr in model.layers for k, v in lyr.buffers.items()}
        return grads, float(value) * len(y), correct, buffers, time.perf_counter() - t0


class WorkerGroup:
    """N Ray actors that compute a global batch's gradient together (see the module's notes).

    Parameters
    ----------
    workers : how many replicas (Ray actors, one CPU each by default)
    address : a Ray cluster to join (``HOST:PORT`` or ``auto``); None starts a local one, unless
        Ray is already initialised in this process
    threads : BLAS / engine threads inside each worker (and CPUs reserved for it)
    step_timeout : seconds a step may take before its workers count as lost
    max_restarts : how many times lost workers are replaced before :class:`WorkersLost`
    """

    def __init__(
        self,
        workers: int,
        address: str | None = None,
        *,
        threads: int = 1,
        step_timeout: float = 300.0,
        max_restarts: int = 3,
    ):
        self.workers = check_workers(workers)
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int. Received: threads={threads!r}")
        if not step_timeout > 0:
            raise ValueError(
                f"step_timeout must be > 0 seconds. Received: step_timeout={step_timeout!r}"
            )
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(
                f"max_restarts must be an int >= 0. Received: max_restarts={max_restarts!r}"
            )
        self.address, self.threads = address, threads
        self.step_timeout, self.max_restarts = float(step_timeout), int(max_restarts)
        self.restarts = 0
        self.actors: list = []
        #: summed over steps: the round trip to the workers, the slowest worker's own time in
        #: it, and the driver's sum of the gradients
        self.seconds = {"round_trip": 0.0, "worker": 0.0, "reduce": 0.0, "steps": 0}
        self._cluster = None
        self._model = self._loss = None

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _connect(self) -> None:
        if self._cluster is not None:
            return
        ray = _ray()
        cpus = max(os.cpu_count() or 1, self.workers * self.threads)
        self._cluster = cluster(self.address, num_cpus=cpus)
        info = self._cluster.__enter__()
        need = self.workers * self.threads
        if info["cpus"] < need:
            self.close()
            raise ValueError(_too_few_cpus(info, self.workers, self.threads))
        self._ray = ray

    def start(self, model, loss, fresh: bool = False) -> WorkerGroup:
        """Make the workers replicas of ``model`` (weights and buffers) with ``loss``: the
        running workers are reused, unless ``fresh`` (then they are replaced by new ones)."""
        self._connect()
        self._model, self._loss = model, loss
        ray = self._ray
        if fresh or len(self.actors) != self.workers:
            self._kill_actors()
            remote = ray.remote(num_cpus=self.threads, max_restarts=0, max_task_retries=0)
            self.actors = [
                remote(_Replica).remote(rank, self.threads) for rank in range(self.workers)
            ]
        config, weights = model.get_config(), ray.put(model.state_dict())
        loss_spec = (type(loss).__name__, loss.get_config())
        # not waited for: an actor runs its calls in order, the first step's answer tells
        for actor in self.actors:
            actor.load.remote(config, weights, loss_spec)
        return self

    def pids(self) -> list[int]:
        """The workers' process ids (in rank order)."""
        ray = self._ray
        return ray.get([a.pid.remote() for a in self.actors], timeout=self.step_timeout)

    def alive(self) -> int:
        """How many workers answered in the last step (all of them after a successful one)."""
        return len(self.actors)

    def _kill_actors(self) -> None:
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []

    def close(self) -> None:
        """Stop the workers; shut the local cluster down if this group started it."""
        if self._cluster is not None:
            self._kill_actors()
            cl, self._cluster = self._cluster, None
            cl.__exit__(None, None, None)

    # -- one step -----------------------------------------------------------------------------
    def step(self, x: np.ndarray, y: np.ndarray, seeds) -> tuple[dict, float, int]:
        """The global batch's mean gradient, mean loss and correct count, from N workers.

        ``seeds``: one dropout seed per worker. Lost workers are replaced and the step repeated
        (up to ``max_restarts`` times in the run); the model's batch-norm buffers become worker
        0's.
        """
        ray = self._ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

        n = len(y)
        used = min(n, self.workers)  # an epoch's last batch may have fewer images than workers
        bounds = np.linspace(0, n, used + 1).round().astype(int)
        while True:
            t0 = time.perf_counter()
            weights = ray.put(self._model.parameters())
            refs = [
                actor.gradients.remote(weights, x[lo:hi], y[lo:hi], int(seed), (hi - lo) / n)
                for actor, lo, hi, seed in zip(
                    self.actors[:used], bounds[:-1], bounds[1:], seeds[:used], strict=True
                )
            ]
            try:
                results = ray.get(refs, timeout=self.step_timeout)
                break
            except (RayActorError, GetTimeoutError) as exc:
                what = (
                    f"no answer within {self.step_timeout:g} s"
                    if isinstance(exc, GetTimeoutError)
                    else "a worker stopped"
                )
                self.restarts += 1
                if self.restarts > self.max_restarts:
                    self._kill_actors()
                    raise WorkersLost(
                        f"{what} and the workers were already replaced {self.max_restarts} "
                        "times; stopping"
                    ) from None
                # fresh replicas of the driver's state (its weights and worker 0's buffers)
                self.start(self._model, self._loss, fresh=True)
            except RayTaskError as exc:  # an error in our own code on a worker: not a fault
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                line = _first_line(str(cause).strip().splitlines()[-1:] or [""], cause)
                try:
                    error = type(cause)(line)
                except Exception:  # an exception type that takes other arguments
                    error = RuntimeError(f"{type(cause).__name__} on a worker: {line}")
                raise error from None
            except RayError as exc:  # the cluster itself failed (connection to the head lost …)
                self._kill_actors()
                raise WorkersLost(
                    f"the Ray cluster failed: {_first_line([str(exc)], exc)}"
                ) from None
        t1 = time.perf_counter()
        total: dict[str, np.ndarray] = {}
        loss_sum, correct = 0.0, 0
        worker = max(r[4] for r in results)
        for grads, value, right, buffers, _ in results:  # worker order: deterministic sums
            loss_sum += value
            correct += right
            for k, g in grads.items():
                if k in total:
                    total[k] += g
                else:
                    total[k] = g.copy()
            if buffers:
                for lyr in self._model.layers:
                    for k in lyr.buffers:
                        lyr.buffers[k][...] = buffers[f"{lyr.name}.{k}"]
        self.seconds["round_trip"] += t1 - t0
        self.seconds["worker"] += worker
        self.seconds["reduce"] += time.perf_counter() - t1
        self.seconds["steps"] += 1
        value = loss_sum / n
        if math.isfinite(value) and any(not r[0] for r in results):
            value = math.nan  # a worker's shard diverged although the mean did not
        return total, value, correct


# --------------------------------------------------------------------------------------------
# Batch prediction
# --------------------------------------------------------------------------------------------


def list_images(folder) -> list[str]:
    """Image files under ``folder`` (all depths), sorted: the order of the output rows."""
    from .data.images import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"expected a folder of images. Received: {folder} (not a folder)")
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        paths.extend(
            os.path.join(root, f) for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    paths.sort()
    return paths


def probability_columns(classes) -> list[str]:
    return [f"p_{c}" for c in classes]


class _Predictor:
    """A Ray Data actor: loads the model once, then reads and classifies batches of paths."""

    def __init__(self, model_path: str, invert: str, threads: int):
        from threadpoolctl import threadpool_limits

        from . import io

        self._limits = threadpool_limits(limits=threads)
        self.model = io.load(model_path)
        self.invert = invert
        prep = self.model.preprocessing
        self.classes = self.model.classes or [str(i) for i in range(self.model.output_shape[-1])]
        self.columns = probability_columns(self.classes)
        self.prep = prep

    def __call__(self, batch: dict) -> dict:
        from .data.images import border_background, read_image, to_input

        prep = self.prep
        paths = [str(p) for p in batch["path"]]
        seen, good, errors = [], [], [""] * len(paths)
        for i, path in enumerate(paths):
            try:
                image = read_image(path)
                flip = self.invert == "yes" or (
                    self.invert == "auto" and border_background(image) != prep.background
                )
                seen.append(to_input(image, prep.size, prep.channels, invert=flip))
                good.append(i)
            except (ValueError, OSError) as exc:  # unreadable: a row with the reason
                errors[i] = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        probs = np.full((len(paths), len(self.classes)), np.nan, np.float32)
        if good:
            x = prep.apply(np.stack(seen), self.model.dtype)
            probs[good] = self.model.predict_proba(x)
        label = np.array([""] * len(paths), dtype=object)
        if good:
            label[good] = np.array(self.classes, dtype=object)[probs[good].argmax(axis=1)]
        out = {"path": np.array(paths, dtype=object), "class": label}
        for j, name in enumerate(self.columns):
            out[name] = probs[:, j]
        out["error"] = np.array(errors, dtype=object)
        return out


def predict_folder(
    model_path,
    folder,
    output,
    *,
    workers: int = 1,
    address: str | None = None,
    batch_size: int = 256,
    invert: str = "auto",
    threads: int = 1,
    progress=None,
) -> dict:
    """Classify every image under ``folder`` with N Ray Data workers; write one row per image
    to ``output`` (``.csv`` or ``.parquet``): path, class, ``p_<class>`` for each class, error
    (empty, or why the image could not be read; its class is then empty and its probabilities
    NaN). Rows come in the sorted order of the paths; the file is written to a temporary name
    and renamed when complete, so a stopped run leaves no half-written file.

    ``progress(done, total, images_per_second, workers)`` is called as rows arrive.
    Returns ``{"images", "errors", "seconds", "output"}``.
    """
    from . import io

    workers = check_workers(workers)
    output = Path(output)
    kind = output.suffix.lower()
    if kind not in (".csv", ".parquet"):
        raise ValueError(f"expected an output file ending in .csv or .parquet. Received: {output}")
    if invert not in ("auto", "yes", "no"):
        raise ValueError(f"invert must be 'auto', 'yes' or 'no'. Received: {invert!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int. Received: {batch_size!r}")
    model = io.load(model_path)  # fails here, with the loader's message, before any cluster
    if model.preprocessing is None:
        raise ValueError(f"{model_path} records no preprocessing; it cannot take image files")
    classes = model.classes or [str(i) for i in range(model.output_shape[-1])]
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"expected image files ({', '.join(_exts())}) in {folder}: found none")
    if output.exists() and output.is_dir():
        raise ValueError(f"the output {output} is a folder; expected a .csv or .parquet file")
    output.parent.mkdir(parents=True, exist_ok=True)
    with cluster(address, num_cpus=max(os.cpu_count() or 1, workers * threads)) as info:
        if info["cpus"] < workers * threads:
            raise ValueError(_too_few_cpus(info, workers, threads))
        return _predict(
            paths, str(Path(model_path).resolve()), classes, output, kind, workers,
            batch_size, invert, threads, progress,
        )  # fmt: skip


def _exts() -> list[str]:
    from .data.images import IMAGE_EXTENSIONS

    return sorted(IMAGE_EXTENSIONS)


def _predict(paths, model_path, classes, output, kind, workers, batch_size, invert, threads,
             progress) -> dict:  # fmt: skip
    import pyarrow as pa
    import ray

    schema = pa.schema(
        [("path", pa.string()), ("class", pa.string())]
        + [(c, pa.float32()) for c in probability_columns(classes)]
        + [("error", pa.string())]
    )
    blocks = max(workers * 4, math.ceil(len(paths) / (batch_size * 8)))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    ds = ds.map_batches(
        _Predictor,
        fn_constructor_args=(model_path, invert, threads),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads,
    )
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    done = errors = 0
    writer = None
    try:
        if kind == ".parquet":
            import pyarrow.parquet as pq

            writer = pq.ParquetWriter(tmp, schema)
        else:
            import pyarrow.csv as pcsv

            writer = pcsv.CSVWriter(tmp, schema)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = batch.select(schema.names).cast(schema)
            writer.write_table(table)
            done += table.num_rows
            errors += int(pa.compute.sum(pa.compute.not_equal(table["error"], "")).as_py() or 0)
            if progress:
                elapsed = time.perf_counter() - t0
                progress(done, len(paths), done / max(elapsed, 1e-9), workers)
        writer.close()
        writer = None
        if done != len(paths):
            raise RuntimeError(f"expected {len(paths)} rows from the workers; received {done}")
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return {
        "images": done,
        "errors": errors,
        "seconds": time.perf_counter() - t0,
        "output": output,
    }
