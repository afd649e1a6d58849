"""Never lose work: checkpoints, interruption by signal, resume bit for bit, kill -9, NaN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn.data.batches import Augment
from classic_cnn.train import (
    TrainingDiverged,
    TrainingInterrupted,
    fit,
    load_state,
)

from .test_train import bars, quiet, small_model

SETTINGS = dict(epochs=3, batch_size=32, seed=4, augment=Augment(shift=1, flip=True))


def schedule():
    return cc.OneCycle(0.1, total=3 * 7)  # 200 training images / 32 = 7 steps an epoch


class SignalAt(cc.OneCycle):
    """The one-cycle schedule, which also sends this process a signal before step ``at``."""

    def __init__(self, at, signum):
        super().__init__(0.1, total=3 * 7)
        self.at, self.signum = at, signum

    def __call__(self, t):
        if t == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__call__(t)


def run(model, data, **kwargs):
    train, val = data
    opt = cc.SGD(0.1, momentum=0.9)
    return fit(model, train, val, optimizer=opt, console=quiet(), **{**SETTINGS, **kwargs})


@pytest.fixture
def data():
    return bars(240).stratified_split(40, seed=0)


@pytest.mark.determinism
@pytest.mark.parametrize("signum,at", [(signal.SIGINT, 9), (signal.SIGTERM, 14)])
def test_signal_mid_epoch_then_resume_gives_the_same_weights(tmp_path, data, signum, at):
    straight = small_model(seed=2, dropout=0.2)
    run(straight, data, schedule=schedule())
    ckpt = tmp_path / "checkpoint.safetensors"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        run(small_model(seed=2, dropout=0.2), data, schedule=SignalAt(at, signum), checkpoint=ckpt)
    assert stop.value.signum == signum and stop.value.checkpoint == ckpt
    state = load_state(ckpt)
    assert state.step == at + 1 and state.batch_in_epoch == (at + 1) % 7
    # whatever handled the signals before (CI may start us with SIGINT ignored) is back
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    resumed = run(state.model, data, schedule=schedule(), state=state, checkpoint=ckpt)
    assert resumed.epoch == 3
    for k, v in straight.state_dict().items():
        np.testing.assert_array_equal(state.model.state_dict()[k], v)
    assert [r["train_loss"] for r in resumed.history] == pytest.approx(
        [
            r["train_loss"]
            for r in run(small_model(seed=2, dropout=0.2), data, schedule=schedule()).history
        ]
    )


def test_checkpoint_every_n_steps_and_every_epoch(tmp_path, data):
    ckpt = tmp_path / "c.safetensors"
    seen = []

    def look(state, row):
        seen.append(load_state(ckpt).epoch)

    run(
        small_model(),
        data,
        schedule=schedule(),
        checkpoint=ckpt,
        checkpoint_every=5,
        callbacks=[look],
    )
    assert seen == [1, 2, 3]  # on disk after each epoch
    assert not list(tmp_path.glob(".*.tmp"))


class RecordCheckpoint(cc.OneCycle):
    """The one-cycle schedule, which also reads the checkpoint on disk before each step and
    keeps (step, epoch, batch_in_epoch) each time the stored state changes."""

    def __init__(self, path):
        super().__init__(0.1, total=3 * 7)
        self.path, self.seen = path, []

    def __call__(self, t):
        if self.path.exists():
            state = load_state(self.path)
            got = (state.step, state.epoch, state.batch_in_epoch)
            if not self.seen or self.seen[-1] != got:
                self.seen.append(got)
        return super().__call__(t)


@pytest.mark.parametrize(
    "every,expected",
    [
        # 7 steps an epoch: saves at each multiple of 5 inside an epoch, and at each epoch's end
        (5, [(5, 0, 5), (7, 1, 0), (10, 1, 3), (14, 2, 0), (15, 2, 1), (20, 2, 6)]),
        (None, [(7, 1, 0), (14, 2, 0)]),  # without checkpoint_every: only at epoch ends
    ],
)
def test_checkpoint_every_n_steps_is_written_mid_epoch(tmp_path, data, every, expected):
    ckpt = tmp_path / "c.safetensors"
    record = RecordCheckpoint(ckpt)
    run(small_model(), data, schedule=record, checkpoint=ckpt, checkpoint_every=every)
    assert record.seen == expected
    final = load_state(ckpt)
    assert (final.step, final.epoch, final.batch_in_epoch) == (21, 3, 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    ckpt = tmp_path / "c.safetensors"
    with pytest.raises(TrainingDiverged, match=r"learning rate.*last good checkpoint"):
        run(small_model(), data, schedule=cc.StepDecay(0.05, 1, gamma=1e9), checkpoint=ckpt)
    state = load_state(ckpt)
    assert state.epoch == 1
    assert all(np.isfinite(v).all() for v in state.model.state_dict().values())


WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import classic_cnn as cc
    from classic_cnn.train import fit
    from test_train import bars, quiet, small_model
    data = bars(2000)
    fit(small_model(), data, epochs=50, batch_size=16, optimizer=cc.SGD(0.05), console=quiet(),
        checkpoint={ckpt!r}, checkpoint_every=1)
    """
)


def test_kill_9_leaves_the_previous_checkpoint_readable(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    tests = os.path.dirname(__file__)
    proc = subprocess.Popen([sys.executable, "-c", WORKER.format(tests=tests, ckpt=str(ckpt))])
    try:
        deadline = time.monotonic() + 60
        while not ckpt.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.exists(), "the worker wrote no checkpoint"
        steps = []
        for _ in range(3):  # kill at an arbitrary moment of writing; read what is there
            time.sleep(0.13)
            steps.append(load_state(ckpt).step)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        final = load_state(ckpt)
        assert final.step >= steps[-1] >= steps[0] >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
