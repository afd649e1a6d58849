"""fit(): learning, the per-epoch record, determinism, early stopping, divergence."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

import classic_cnn as cc
from classic_cnn.data import Dataset
from classic_cnn.data.batches import Augment, Preprocessing
from classic_cnn.train import TrainingDiverged, fit, write_history


def bars(n=240, seed=0, size=12):
    """Light bars on a dark background in one of three places: a learnable task."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = (rng.random((n, size, size, 1)) * 60).astype(np.uint8)
    for i, lab in enumerate(labels):
        x[i, 4 * lab : 4 * lab + 4, :, 0] = 200
    return Dataset(x, labels, ["top", "middle", "bottom"], name="bars")


def small_model(seed=0, dropout=0.0):
    layers = [cc.Conv2D(4, 3, padding="same"), cc.ReLU(), cc.MaxPool2D(2), cc.Flatten()]
    if dropout:
        layers.append(cc.Dropout(dropout))
    return cc.Sequential([*layers, cc.Dense(3)], input_shape=(12, 12, 1), seed=seed)


def quiet():
    return Console(file=io.StringIO(), width=120)


def test_fit_learns_and_prints_one_plain_line_per_epoch():
    data = bars()
    train, val = data.stratified_split(40, seed=0)
    console = quiet()
    model = small_model()
    state = fit(
        model, train, val, epochs=4, batch_size=16, optimizer=cc.Adam(0.01), console=console
    )
    out = console.file.getvalue()
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["epoch", "train", "loss"]
    assert [ln.split()[0] for ln in lines[1:5]] == ["1/4", "2/4", "3/4", "4/4"]
    assert "\x1b" not in out  # not a terminal: no progress bar, no colour codes
    assert len(state.history) == 4 and state.epoch == 4
    assert state.step == 4 * int(np.ceil(len(train) / 16))
    h = state.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["val_accuracy"] > 0.9
    assert set(h[0]) >= {
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "lr",
        "seconds",
    }
    # preprocessing and class names come from the training data
    assert model.classes == ["top", "middle", "bottom"]
    assert model.preprocessing.input_shape == (12, 12, 1)
    # uint8 images are preprocessed by the model itself
    np.testing.assert_array_equal(model.predict(val.images), model.predict(val.images))
    assert (model.predict(val.images) == val.labels).mean() > 0.9


def test_same_seed_same_final_weights_even_with_dropout_and_augmentation():
    data = bars()
    weights = []
    for _ in range(2):
        model = small_model(seed=3, dropout=0.3)
        fit(
            model,
            data,
            epochs=2,
            batch_size=32,
            optimizer="sgd",
            seed=7,
            augment=Augment(shift=1, flip=True),
            console=quiet(),
        )
        weights.append(model.state_dict())
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k])
    other = small_model(seed=3, dropout=0.3)
    fit(
        other,
        data,
        epochs=2,
        batch_size=32,
        optimizer="sgd",
        seed=8,
        augment=Augment(shift=1, flip=True),
        console=quiet(),
    )
    assert not np.array_equal(other.state_dict()["dense_1.kernel"], weights[0]["dense_1.kernel"])


def test_early_stopping_keeps_the_best_epoch():
    data = bars()
    # a validation set whose labels are all wrong: its loss rises as the model learns
    wrong = Dataset(data.images[:60], (data.labels[:60] + 1) % 3, data.classes)
    model = small_model()
    seen = []

    def remember(state, row):
        seen.append(model.state_dict())

    state = fit(
        model,
        data,
        wrong,
        epochs=10,
        batch_size=16,
        optimizer=cc.Adam(0.01),
        early_stopping=2,
        callbacks=[remember],
        console=quiet(),
    )
    assert state.stopped_early and state.epoch < 10
    assert state.best_epoch == int(np.argmin([r["val_loss"] for r in state.history])) + 1
    assert state.epoch - state.best_epoch == 2
    for k, v in model.state_dict().items():  # the best epoch's weights were put back
        np.testing.assert_array_equal(v, seen[state.best_epoch - 1][k])


def test_callback_can_stop_training():
    state = fit(small_model(), bars(), epochs=5, callbacks=[lambda s, r: "stop"], console=quiet())
    assert state.epoch == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_diverging_loss_stops_with_a_clear_message():
    with pytest.raises(TrainingDiverged, match="learning rate"):
        fit(small_model(), bars(), epochs=3, optimizer=cc.SGD(1e9), console=quiet())


def test_schedule_sets_the_learning_rate_each_epoch():
    state = fit(
        small_model(),
        bars(),
        epochs=3,
        optimizer=cc.SGD(0.1),
        schedule=cc.StepDecay(0.1, 1, 0.5),
        console=quiet(),
    )
    assert [r["lr"] for r in state.history] == pytest.approx([0.1, 0.05, 0.025])


def test_mse_loss_trains_too():
    data = bars()
    state = fit(
        small_model(),
        data,
        epochs=6,
        batch_size=16,
        optimizer=cc.Adam(0.01),
        loss="mse",
        console=quiet(),
    )
    assert state.history[-1]["train_accuracy"] > 0.9


def test_arrays_work_as_well_as_datasets():
    data = bars()
    x = data.images.astype(np.float32) / 255
    state = fit(small_model(), (x, data.labels), epochs=3, optimizer=cc.Adam(0.01), console=quiet())
    assert state.history[-1]["train_accuracy"] > 0.8


def test_bad_arguments():
    with pytest.raises(ValueError, match="epochs=0"):
        fit(small_model(), bars(), epochs=0, console=quiet())
    with pytest.raises(ValueError, match="Received: 3 images, 2 labels"):
        fit(small_model(), (np.zeros((3, 12, 12, 1)), np.zeros(2, int)), console=quiet())


def test_history_files(tmp_path):
    state = fit(small_model(), bars(), epochs=2, console=quiet())
    write_history(tmp_path, state.history)
    rows = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    csv_lines = (tmp_path / "history.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 3


def test_training_state_saved_and_restored_continues_bit_for_bit(tmp_path):
    from classic_cnn.train import load_state, save_state

    data = bars()
    train, val = data.stratified_split(40, seed=0)
    kwargs = dict(
        epochs=4,
        batch_size=32,
        optimizer="sgd",
        seed=3,
        augment=Augment(shift=1, flip=True),
        console=quiet(),
    )
    straight = small_model(seed=1, dropout=0.2)
    fit(straight, train, val, **kwargs)

    first = small_model(seed=1, dropout=0.2)
    state = fit(first, train, val, **{**kwargs, "epochs": 2})
    path = save_state(state, tmp_path / "state.safetensors")
    restored = load_state(path)
    assert restored.epoch == 2 and restored.step == state.step
    assert restored.history == state.history
    resumed = fit(restored.model, train, val, **kwargs, state=restored)
    assert resumed.epoch == 4
    for k, v in straight.state_dict().items():
        np.testing.assert_array_equal(restored.model.state_dict()[k], v)


def test_a_per_step_schedule_sets_the_rate_every_batch():
    seen = []

    class Recording(cc.OneCycle):
        def __call__(self, t):
            seen.append(t)
            return super().__call__(t)

    data = bars(64)
    state = fit(
        small_model(),
        data,
        epochs=2,
        batch_size=16,
        optimizer=cc.SGD(0.1),
        schedule=Recording(0.1, total=8),
        console=quiet(),
    )
    assert seen == list(range(8))
    assert state.history[-1]["lr"] == pytest.approx(cc.OneCycle(0.1, total=8)(7))


def test_one_cycle_momentum_is_set_every_batch():
    schedule = cc.OneCycle(0.1, total=8, momentum_range=(0.8, 0.95))
    seen = []

    class Recording(cc.SGD):
        def step(self, *args, **kwargs):
            seen.append((self.lr, self.momentum))
            return super().step(*args, **kwargs)

    fit(
        small_model(),
        bars(64),
        epochs=2,
        batch_size=16,
        optimizer=Recording(0.1, momentum=0.9, nesterov=True),
        schedule=schedule,
        console=quiet(),
    )
    assert seen == [(schedule(t), schedule.momentum(t)) for t in range(8)]


def test_one_cycle_momentum_sets_adams_beta1():
    schedule = cc.OneCycle(0.01, total=4, momentum_range=(0.85, 0.95))
    seen = []

    class Recording(cc.Adam):
        def step(self, *args, **kwargs):
            seen.append(self.beta1)
            return super().step(*args, **kwargs)

    fit(
        small_model(),
        bars(64),
        epochs=1,
        batch_size=16,
        optimizer=Recording(0.01),
        schedule=schedule,
        console=quiet(),
    )
    assert seen == [schedule.momentum(t) for t in range(4)]


def test_momentum_cycling_needs_an_optimizer_with_momentum():
    with pytest.raises(ValueError, match="momentum") as e:
        fit(
            small_model(),
            bars(64),
            epochs=1,
            batch_size=16,
            optimizer=cc.SGD(0.1),
            schedule=cc.OneCycle(0.1, total=4, momentum_range=(0.85, 0.95)),
            console=quiet(),
        )
    assert "Received" in str(e.value)


def test_flip_averaging_in_evaluate():
    from classic_cnn.metrics import evaluate

    data = bars(60)
    model = small_model()
    fit(model, data, epochs=2, optimizer=cc.Adam(0.01), console=quiet())
    plain, flipped = evaluate(model, data), evaluate(model, data, flip=True)
    probs = (model.predict_proba(data.images) + model.predict_proba(data.images[:, :, ::-1])) / 2
    np.testing.assert_array_equal(flipped["predicted"], probs.argmax(axis=1))
    expected_loss = -np.log(probs[np.arange(len(data)), data.labels]).mean()
    assert flipped["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert plain["accuracy"] == pytest.approx((plain["predicted"] == data.labels).mean())


def test_uint8_arrays_are_normalised_like_a_dataset():
    """uint8 (images, labels) arrays get the same treatment as a Dataset: per-channel mean/std
    recorded in model.preprocessing, so predict_proba takes uint8 images afterwards."""
    data = bars()
    model = small_model()
    state = fit(
        model, (data.images, data.labels), epochs=3, optimizer=cc.Adam(0.01), console=quiet()
    )
    assert state.history[-1]["train_accuracy"] > 0.8
    assert model.preprocessing is not None
    expected = Preprocessing.from_dataset(data, model.input_shape)
    assert model.preprocessing.mean == expected.mean and model.preprocessing.std == expected.std
    assert model.predict_proba(data.images[:4]).shape[0] == 4


@pytest.mark.parametrize("shape,input_shape", [((7, 5, 6, 3), None), ((9, 4, 4, 1), (4, 4, 3))])
def test_preprocessing_statistics_are_the_mean_and_std_of_the_scaled_pixels(shape, input_shape):
    """Per channel, over the first 10,000 images once converted to the model's input: the
    mean and the (population) standard deviation of image / 255, to the 6 decimals kept."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    images[0] = 255  # a skewed histogram, not a uniform one
    data = Dataset(images, np.zeros(len(images), np.int64), classes=["a"])
    prep = Preprocessing.from_dataset(data, input_shape)
    x = images.astype(np.float64) / 255.0
    if input_shape is not None:  # grayscale repeated into RGB: the same numbers per channel
        x = np.repeat(x, 3, axis=3)
    np.testing.assert_allclose(prep.mean, x.mean(axis=(0, 1, 2)), atol=6e-7)
    np.testing.assert_allclose(prep.std, x.std(axis=(0, 1, 2)), atol=6e-7)
    assert len(prep.mean) == len(prep.std) == (input_shape or shape[1:])[2]
