"""Scale-out on Ray: data-parallel training equals one process, survives lost workers, and
batch prediction streams a folder into one file. One local cluster (2 CPUs, no dashboard) for
the module, shut down at its end; every wait is bounded."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pytest
from rich.console import Console

ray = pytest.importorskip(
    "ray", reason="Ray is not installed (pip install 'classic-cnn[ray]'); make test installs it"
)

import classic_cnn as cc  # noqa: E402
from classic_cnn.data.batches import iterate_batches  # noqa: E402
from classic_cnn.distributed import WorkerGroup, WorkersLost, predict_folder  # noqa: E402
from classic_cnn.train import TrainingInterrupted, fit, load_state  # noqa: E402

from .test_cli import data_env as data_env  # noqa: E402 - a fixture
from .test_train import bars, small_model  # noqa: E402

STEPS = 22  # 201 training images in batches of 20: 11 steps an epoch (the last of 1 image)


def quiet():
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def data():
    return bars(241).stratified_split(40, seed=0)


def run(data, workers=None, model=None, **kwargs):
    train, val = data
    model = model or small_model(seed=1)
    settings = dict(epochs=2, batch_size=20, optimizer=cc.SGD(0.1, momentum=0.9), seed=3)
    fit(model, train, val, console=quiet(), workers=workers, **(settings | kwargs))
    return model


def max_relative_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)


class At(cc.OneCycle):
    """A per-step schedule that also does something before given steps (to hurt a worker)."""

    def __init__(self, actions: dict):
        super().__init__(0.1, total=STEPS)
        self.actions = actions

    def __call__(self, t):
        if t in self.actions:
            self.actions.pop(t)()
        return super().__call__(t)


def test_ctrl_c_saves_the_step_and_shuts_the_local_cluster_down(data, tmp_path):
    # before the module's cluster exists: fit starts a local one itself and must stop it
    assert not ray.is_initialized()
    checkpoint = tmp_path / "checkpoint.safetensors"
    schedule = At({6: lambda: os.kill(os.getpid(), signal.SIGINT)})
    with pytest.raises(TrainingInterrupted) as stop:
        run(data, workers=2, schedule=schedule, checkpoint=checkpoint)
    assert stop.value.step == 7 and load_state(checkpoint).step == 7
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def group(**kwargs):
    """Two workers, one CPU each: the whole of the test cluster, so one group at a time."""
    return WorkerGroup(2, **({"step_timeout": 60, "max_restarts": 1} | kwargs))


@pytest.fixture(scope="module")
def two_workers(data, cluster):
    """The reference: 2 workers, no dropout, no batch norm, as every test below trains."""
    with group() as g:
        weights = run(data, g, schedule=At({})).state_dict()
        assert g.seconds["steps"] == STEPS and g.restarts == 0
    return weights


def test_two_workers_equal_one_process_and_repeat_bit_for_bit(data, two_workers):
    one = run(data, schedule=At({})).state_dict()
    assert max_relative_difference(two_workers, one) <= 1e-5
    with group() as g:  # fresh workers, same seed: the same bits
        again = run(data, g, schedule=At({})).state_dict()
    assert all(np.array_equal(two_workers[k], again[k]) for k in two_workers)


def test_a_killed_and_a_frozen_worker_are_replaced_and_the_weights_are_unchanged(
    data, tmp_path, cluster, two_workers
):
    stopped = []

    def freeze():  # the process lives on but answers nothing: only a timeout tells
        stopped.append(g.pids()[0])
        os.kill(stopped[0], signal.SIGSTOP)

    with group(step_timeout=8, max_restarts=2) as g:
        schedule = At({5: lambda: os.kill(g.pids()[1], signal.SIGKILL), 13: freeze})
        checkpoint = tmp_path / "checkpoint.safetensors"
        weights = run(
            data, g, schedule=schedule, checkpoint=checkpoint, checkpoint_every=3
        ).state_dict()
        assert g.restarts == 2
    if stopped and os.path.exists(f"/proc/{stopped[0]}"):
        os.kill(stopped[0], signal.SIGKILL)  # in case the cluster did not end it
    assert all(np.array_equal(weights[k], two_workers[k]) for k in weights)
    assert load_state(checkpoint).step == STEPS


def test_workers_lost_too_often_stop_with_one_line_and_keep_the_checkpoint(data, tmp_path, cluster):
    with group(max_restarts=0) as g:
        schedule = At({7: lambda: os.kill(g.pids()[0], signal.SIGKILL)})
        checkpoint = tmp_path / "checkpoint.safetensors"
        with pytest.raises(WorkersLost) as lost:
            run(data, g, schedule=schedule, checkpoint=checkpoint, checkpoint_every=5)
    assert "\n" not in str(lost.value) and "replaced 0 times" in str(lost.value)
    assert load_state(checkpoint).step == 5  # the last checkpoint, whole
    assert not list(tmp_path.glob("*.tmp*"))


def test_more_workers_than_the_cluster_has_cpus_is_refused_before_any_starts(cluster):
    with pytest.raises(ValueError, match=r"at least 3 CPUs \(3 workers × 1 thread each\)"):
        WorkerGroup(3).start(small_model(), cc.CrossEntropyLoss())
    assert ray.is_initialized()  # the test's cluster, not the group's: left running


def test_an_error_on_a_worker_is_the_same_one_line_error_as_in_one_process(cluster):
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 12, 12, 1), dtype=np.float32), np.full(20, 7)
    with pytest.raises(ValueError) as here:
        fit(small_model(), (x, y), epochs=1, batch_size=10, console=quiet())
    with group() as g, pytest.raises(ValueError) as there:
        fit(small_model(), (x, y), epochs=1, batch_size=10, console=quiet(), workers=g)
    assert str(there.value) == str(here.value) and "\n" not in str(there.value)
    assert g.restarts == 0  # our own error, not a lost worker


def bn_model(seed=1):
    layers = [cc.Conv2D(4, 3, padding="same"), cc.BatchNorm(), cc.ReLU(), cc.MaxPool2D(2)]
    return cc.Sequential([*layers, cc.Flatten(), cc.Dense(3)], input_shape=(12, 12, 1), seed=seed)


def test_batch_norm_statistics_are_per_worker(data, cluster):
    """Each worker normalises its own shard; the model keeps worker 0's running statistics:
    the same as summing per-shard gradients of two replicas by hand."""
    train, _ = data
    x = train.images.astype(np.float32) / 255
    y = train.labels
    model = bn_model()
    with group() as g:
        fit(model, (x, y), epochs=1, batch_size=20, optimizer=cc.SGD(0.1), seed=3,
            console=quiet(), workers=g)  # fmt: skip
    # by hand: the same batches, two replicas per step
    ref, loss, opt = bn_model(), cc.CrossEntropyLoss(), cc.SGD(0.1)
    shuffle = np.random.default_rng(np.random.SeedSequence(3).spawn(2)[0])
    for xb, yb in iterate_batches(x, y, 20, shuffle):
        total = {}
        shards = [(0, 10), (10, 20)] if len(yb) == 20 else [(0, len(yb))]
        for i, (lo, hi) in enumerate(shards):
            replica, share = ref.copy(), np.float32((hi - lo) / len(yb))
            loss.forward(replica.forward(xb[lo:hi], training=True), yb[lo:hi])
            replica.backward(loss.backward(), input_grad=False)
            for k, g in replica.gradients().items():
                total[k] = total[k] + g * share if k in total else g * share
            if i == 0:
                running = {k: v for k, v in replica.state_dict().items() if "running" in k}
        opt.step(ref.parameters(), total)
        ref.load_state_dict(ref.parameters() | running)
    got, want = model.state_dict(), ref.state_dict()
    assert any("running" in k for k in want)
    assert max_relative_difference(got, want) <= 1e-5
    whole = bn_model()  # one process on the whole batch differs: BN is not synchronised
    fit(whole, (x, y), epochs=1, batch_size=20, optimizer=cc.SGD(0.1), seed=3, console=quiet())
    assert max_relative_difference(got, whole.state_dict()) > 1e-4


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory):
    model = run(data, epochs=1)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    cc.save(model, path)
    return path


def write_folder(root, n=300):
    from PIL import Image

    images = bars(n, seed=5).images
    for i, image in enumerate(images):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(sub / f"{i:04d}.png")
    (root / "part0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "part1" / "notes.txt").write_text("not an image")
    return images


def my_processes(marker: str) -> list[int]:
    """This test process's descendants whose command line holds ``marker``."""
    parent, command = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command[int(entry)] = f.read().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue

    def mine(pid):
        for _ in range(20):
            if pid == os.getpid():
                return True
            pid = parent.get(pid, 0)
            if pid <= 1:
                return False
        return False

    return sorted(pid for pid, cmd in command.items() if marker in cmd and mine(pid))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_batch_prediction_of_a_folder(tmp_path, cluster, model_file, suffix):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    images = write_folder(tmp_path / "photos")
    out = tmp_path / "out" / f"preds{suffix}"
    seen, killed = [], []

    def progress(done, total, rate, workers):
        seen.append((done, total, workers))
        if suffix == ".csv" and not killed:  # a worker lost mid-run: Ray Data redoes its part
            killed.extend(my_processes("MapBatches(_Predictor)")[:1])
            os.kill(killed[0], signal.SIGKILL)

    result = predict_folder(
        model_file, tmp_path / "photos", out, workers=2, batch_size=64, progress=progress
    )
    assert result["images"] == 301 and result["errors"] == 1
    assert killed or suffix != ".csv"
    assert seen[-1] == (301, 301, 2)
    table = (pq.read_table(out) if suffix == ".parquet" else pcsv.read_csv(out)).to_pandas()
    model = cc.load(model_file)
    columns = [f"p_{c}" for c in model.classes]
    assert list(table.columns) == ["path", "class", *columns, "error"]
    assert list(table["path"]) == sorted(set(table["path"]))  # each image once, in order
    broken = table[table["path"].str.endswith("broken.png")]
    assert len(broken) == 1 and "truncated" in broken["error"].iloc[0]
    good = table[table["error"].fillna("") == ""]
    index = good["path"].str.extract(r"(\d{4})\.png$")[0].astype(int).to_numpy()
    want = model.predict_proba(model.preprocessing.apply(images[index]))
    np.testing.assert_allclose(good[columns].to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert list(good["class"]) == [model.classes[k] for k in want.argmax(axis=1)]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_cnn_predict_folder(tmp_path, cluster, model_file, monkeypatch):
    from typer.testing import CliRunner

    from classic_cnn.cli import app

    write_folder(tmp_path / "photos", n=60)
    runner = CliRunner()
    out = tmp_path / "preds.csv"
    args = ["predict", model_file, tmp_path / "photos", "--workers", "2", "--output", out]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "61 images, 1 unreadable" in result.output and out.is_file()
    result = runner.invoke(app, ["predict", str(model_file), str(tmp_path / "photos")])
    assert result.exit_code == 1 and "is a folder: give --output" in result.output
    bad = runner.invoke(app, ["predict", str(model_file), str(tmp_path), "--output", "x.json"])
    assert bad.exit_code == 1 and "--output must end in .csv or .parquet" in bad.output
    assert not (tmp_path / "x.json").exists()


def test_cnn_train_with_workers(data_env, cluster):
    from .test_cli import run as cnn

    args = ("--arch", "lenet5", "--epochs", "1", "--val", "50", "--batch-size", "32")
    result = cnn("train", *args, "--workers", "2", "--out", "run")
    assert result.exit_code == 0, result.output
    assert "data-parallel on 2 Ray workers, 1 thread each" in result.output
    state = load_state(data_env / "run" / "checkpoint.safetensors")
    assert state.extra["settings"]["workers"] == 2
    assert (data_env / "run" / "model.safetensors").is_file()
