"""The command line end to end, on small IDX files and image folders the tests write."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import classic_cnn as cc
from classic_cnn.cli import app
from classic_cnn.data import write_idx

runner = CliRunner()


def bars(n, seed):
    """28×28 light bars on dark in one of ten rows: learnable, like a tiny Fashion-MNIST."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    x = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, lab in enumerate(labels):
        x[i, 2 * lab + 4 : 2 * lab + 7, 4:24] = 230
    return x, labels


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """A cache folder holding a small 'fashion-mnist'; no system folder; no downloads."""
    cache = tmp_path / "cache"
    folder = cache / "fashion-mnist"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", 400, 0), ("t10k", 100, 1)):
        x, y = bars(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y)
    monkeypatch.setenv("CLASSIC_CNN_CACHE", str(cache))
    monkeypatch.setenv("CLASSIC_CNN_SYSTEM_DATA", str(tmp_path / "no-system"))
    monkeypatch.setenv("CLASSIC_CNN_MIRROR", "http://127.0.0.1:9/{name}/")  # refused at once
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


TRAIN = ("train", "--arch", "lenet5", "--epochs", "2", "--val", "50", "--batch-size", "32")


@pytest.fixture
def trained(data_env):
    result = run(*TRAIN, "--out", data_env / "run")
    assert result.exit_code == 0, result.output
    return data_env / "run" / "model.safetensors"


def test_train_writes_the_run_folder(trained):
    run_dir = trained.parent
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.safetensors",
        "history.csv",
        "history.json",
        "model.safetensors",
        "report.html",
    ]
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]


def test_test_command_reports_accuracy_and_confusion(trained):
    result = run("test", trained, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 100 and 0 <= report["accuracy"] <= 1
    cm = np.array(report["confusion"])
    assert cm.shape == (10, 10) and cm.sum() == 100
    assert report["accuracy"] == pytest.approx(np.trace(cm) / 100)
    assert report["classes"][0] == "T-shirt/top"
    text = run("test", trained)
    assert (
        text.exit_code == 0 and "test accuracy" in text.output and "confusion matrix" in text.output
    )


def test_predict_any_image_size(trained, data_env):
    from PIL import Image

    x, _y = bars(3, 5)
    paths = []
    for i in range(3):
        p = data_env / f"img{i}.png"
        Image.fromarray(x[i]).resize((140, 140)).save(p)
        paths.append(p)
    result = run("predict", trained, *paths, "--top", "2", "--save-input", data_env / "seen")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith(str(data_env))]
    assert len(lines) == 3 and all(ln.count(",") == 1 for ln in lines)
    assert len(list((data_env / "seen").glob("*.png"))) == 3
    seen = np.asarray(Image.open(data_env / "seen" / "img0.input.png"))
    assert seen.shape == (28, 28)
    js = run("predict", trained, paths[0], "--json")
    probs = json.loads(js.stdout)[0]["probabilities"]
    assert len(probs) == 10 and sum(probs.values()) == pytest.approx(1, abs=1e-5)
    # a photo-like image (dark object on light) is inverted to match the training polarity
    Image.fromarray(255 - x[0]).save(data_env / "light.png")
    flipped = json.loads(run("predict", trained, data_env / "light.png", "--json").stdout)[0]
    assert flipped["inverted"] is True
    kept = run("predict", trained, data_env / "light.png", "--invert", "no", "--json").stdout
    assert json.loads(kept)[0]["inverted"] is False


@pytest.mark.determinism
def test_same_seed_same_weights_through_the_cli(data_env):
    from safetensors.numpy import load_file

    for name in ("a", "b"):
        assert run(*TRAIN, "--out", data_env / name).exit_code == 0
    a = load_file(str(data_env / "a" / "model.safetensors"))
    b = load_file(str(data_env / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_non_empty_run_folder_is_refused(trained):
    before = trained.read_bytes()
    result = run(*TRAIN, "--out", trained.parent)
    assert result.exit_code == 1
    assert "not empty" in result.output and "--overwrite" in result.output
    assert trained.read_bytes() == before


def test_run_folder_under_a_file(data_env):
    (data_env / "afile").write_text("x")
    result = run(*TRAIN, "--out", data_env / "afile" / "run")
    assert result.exit_code == 1 and "is a file" in result.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("train", "--data", "cifar"), "known datasets: fashion-mnist, mnist"),
        (("train", "--arch", "resnet"), "small, lenet5, tinyvgg, article"),
        (("summary", "--arch", "resnet"), "small, lenet5, tinyvgg, article"),
    ],
)
def test_unknown_names_list_the_known_ones(data_env, args, fragment):
    result = run(*args)
    assert result.exit_code == 1 and fragment in result.output
    assert not (data_env / "runs").exists()  # nothing written


def test_usage_errors_exit_2(data_env):
    assert run("train", "--epochs", "0").exit_code == 2
    assert run("predict").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_bad_files(trained, data_env):
    junk = data_env / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    result = run("test", junk)
    assert result.exit_code == 1 and "not a safetensors model file" in result.output
    result = run("predict", trained, data_env / "missing.png")
    assert result.exit_code == 1 and "no such image file" in result.output
    (data_env / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    result = run("predict", trained, data_env / "corrupt.jpg")
    assert result.exit_code == 1 and "corrupt.jpg" in result.output
    (data_env / "notes.txt").write_text("hello")
    result = run("predict", trained, data_env / "notes.txt")
    assert result.exit_code == 1 and "notes.txt" in result.output


def test_corrupt_idx_and_mismatched_counts(data_env):
    folder = data_env / "cache" / "fashion-mnist"
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    result = run(*TRAIN, "--out", data_env / "r")
    assert result.exit_code == 1 and "train-images-idx3-ubyte" in result.output
    x, _ = bars(30, 0)
    write_idx(folder / "train-images-idx3-ubyte.gz", x)  # 30 images, 400 labels
    result = run(*TRAIN, "--out", data_env / "r")
    assert result.exit_code == 1 and "30" in result.output and "400" in result.output
    assert not (data_env / "r").exists()


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSIC_CNN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CLASSIC_CNN_SYSTEM_DATA", str(tmp_path / "no-system"))
    monkeypatch.setenv("CLASSIC_CNN_MIRROR", "http://127.0.0.1:9/{name}/")
    monkeypatch.chdir(tmp_path)
    result = run("train", "--epochs", "1")
    assert result.exit_code == 1
    assert "dataset-fashion-mnist" in result.output and "--data" in result.output


def test_image_folder_training_and_testing(data_env):
    from PIL import Image

    root = data_env / "shapes"
    rng = np.random.default_rng(0)
    for _k, name in enumerate(["circle", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(30):
            img = np.full((40, 40, 3), 250, np.uint8)  # photos: dark shapes on white
            yy, xx = np.mgrid[:40, :40]
            if name == "circle":
                mask = (yy - 20) ** 2 + (xx - 20) ** 2 < (8 + rng.integers(0, 6)) ** 2
            else:
                s = 8 + rng.integers(0, 6)
                mask = (
                    (abs(yy - 20) < s)
                    & (abs(xx - 20) < s)
                    & ((abs(yy - 20) > s - 4) | (abs(xx - 20) > s - 4))
                )
            img[mask] = rng.integers(0, 60)
            Image.fromarray(img).save(root / name / f"{i}.png")
    (root / "circle" / ".hidden.png").write_bytes(b"junk")
    (root / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run(
        "train",
        "--data",
        root,
        "--arch",
        "lenet5",
        "--epochs",
        "3",
        "--val",
        "10",
        "--out",
        data_env / "shapes-run",
    )
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.output  # reported, not a crash
    model = data_env / "shapes-run" / "model.safetensors"
    report = json.loads(run("test", model, "--data", root, "--json").stdout)
    assert report["classes"] == ["circle", "square"] and report["n"] == 60
    empty = data_env / "flat"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"")
    result = run("train", "--data", empty, "--out", data_env / "x")
    assert result.exit_code == 1 and "class" in result.output


def test_summary_and_data_list(data_env, trained):
    result = run("summary", "--arch", "lenet5")
    assert result.exit_code == 0 and "61,706" in result.output
    assert "28×28×6" in run("summary", trained).output
    listing = run("data", "list")
    assert listing.exit_code == 0
    assert "fashion-mnist" in listing.output and str(data_env / "cache") in listing.output


def test_debug_shows_the_traceback(data_env):
    result = run("--debug", "train", "--data", "cifar")
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


RESUME_WORKER = """
import os, signal, sys
import classic_cnn.optim as optim
from classic_cnn.cli import main

# a learning-rate schedule that also sends this process {sig} before step {at}: a real
# interruption at a known point of training
_call = optim.CosineDecay.__call__
calls = []
def call(self, t):
    calls.append(t)
    if len(calls) == {epoch_at}:
        os.kill(os.getpid(), signal.{sig})
    return _call(self, t)
optim.CosineDecay.__call__ = call
sys.argv = ["cnn", *{args!r}]
main()
"""


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_a_real_run_then_resume_to_the_same_weights(data_env, sig, code):
    """A subprocess is interrupted by a real signal at the start of epoch 2 (it finishes the
    step, saves, exits 130/143); `cnn train --resume` then ends with weights equal, bit for bit,
    to an uninterrupted run's."""
    import os
    import subprocess
    import sys

    from safetensors.numpy import load_file

    args = [*TRAIN, "--epochs", "3", "--augment"]
    assert run(*args, "--out", data_env / "straight").exit_code == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = RESUME_WORKER.format(
        sig=sig, at="epoch 2", epoch_at=2, args=[*args, "--out", str(data_env / "cut")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", worker],
        capture_output=True,
        text=True,
        env=env,
        cwd=data_env,
        timeout=300,
    )
    assert proc.returncode == code, proc.stderr
    ckpt = data_env / "cut" / "checkpoint.safetensors"
    assert f"cnn train --resume {ckpt}" in proc.stderr
    assert not (data_env / "cut" / "model.safetensors").exists()
    result = run("train", "--resume", ckpt)
    assert result.exit_code == 0, result.output
    a = load_file(str(data_env / "straight" / "model.safetensors"))
    b = load_file(str(data_env / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["0", "-0.01"])
def test_learning_rate_must_be_positive(data_env, value):
    """--lr 0 is a usage error naming the option and the value, not a run at the default rate."""
    result = run(*TRAIN, "--lr", value, "--out", data_env / "lr-run")
    assert result.exit_code == 2, result.output
    assert "--lr" in result.output and f"Received: {value}" in result.output
    assert not (data_env / "lr-run").exists()
    ok = run(*TRAIN, "--epochs", "1", "--lr", "0.01", "--out", data_env / "lr-ok")
    assert ok.exit_code == 0 and "adam lr 0.01 " in ok.output, ok.output


def test_demo_without_the_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    """No cache, no Debian folder, downloads refused at once: exit 1 with the way to get the
    data, and no run folder."""
    monkeypatch.setenv("CLASSIC_CNN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CLASSIC_CNN_SYSTEM_DATA", str(tmp_path / "no-system"))
    monkeypatch.setenv("CLASSIC_CNN_MIRROR", "http://127.0.0.1:9/{name}/")  # refused at once
    monkeypatch.chdir(tmp_path)
    result = run("demo", "--epochs", "1")
    assert result.exit_code == 1, result.output
    assert "dataset-fashion-mnist" in result.output and "--data" in result.output
    assert not (tmp_path / "runs").exists()
    assert not any((tmp_path / "empty-cache").rglob("*.gz"))


@pytest.mark.parametrize("under", ["afile", "afile/seen"])
def test_predict_save_input_under_a_file(trained, data_env, under):
    from PIL import Image

    Image.fromarray(bars(1, 5)[0][0]).save(data_env / "img.png")
    (data_env / "afile").write_text("x")
    target = data_env / under
    result = run("predict", trained, data_env / "img.png", "--save-input", target)
    assert result.exit_code == 1, result.output
    assert str(target) in result.output and "afile is a file" in result.output
    assert (data_env / "afile").read_text() == "x"


@pytest.mark.parametrize("under", ["afile", "afile/plots"])
def test_test_plots_under_a_file(trained, data_env, under):
    report = trained.parent / "report.html"
    before = report.read_bytes()
    (data_env / "afile").write_text("x")
    target = data_env / under
    result = run("test", trained, "--plots", target)
    assert result.exit_code == 1, result.output
    assert str(target) in result.output and "afile is a file" in result.output
    assert (data_env / "afile").read_text() == "x"
    assert report.read_bytes() == before  # the run's report is not half-updated


def test_random_erasing_is_an_option_recorded_in_the_model_file(data_env):
    result = run(*TRAIN, "--epochs", "1", "--erase", "0.5", "--out", data_env / "erase")
    assert result.exit_code == 0, result.output
    model = cc.load(data_env / "erase" / "model.safetensors")
    assert model.metadata["hyperparameters"]["augment"] == {
        "shift": 0,
        "flip": False,
        "erase": 0.5,
    }
    assert "erasing 0.5" in (data_env / "erase" / "report.html").read_text()
    bad = run(*TRAIN, "--erase", "1.5", "--out", data_env / "bad")
    assert bad.exit_code == 2
    assert "must be a probability in [0, 1]. Received: 1.5" in bad.output
    assert not (data_env / "bad").exists()


def test_no_output_replaces_the_model_or_an_existing_file_unasked(trained, data_env):
    """export, explain, show and predict --output never write over the model they read, never
    write a kind of file they do not make (a picture over a model file), and export and
    predict --output replace an existing file only with --overwrite; what was there stays."""
    model_bytes = trained.read_bytes()
    cases = [
        ("export", trained, "--onnx", trained),  # the input itself, wrong kind too
        ("export", trained, "--onnx", data_env / "copy.safetensors"),
        ("explain", trained, "test:0", "--why", "--out", trained),
        ("show", "filters", trained, "--out", trained),
    ]
    (data_env / "copy.safetensors").write_bytes(model_bytes)
    for *args, target in cases:
        result = run(*args, target)
        assert result.exit_code != 0, (args, result.output)
        assert "Traceback" not in result.output
        assert target.read_bytes() == model_bytes, args
    assert "must end in .onnx" in run("export", trained, "--onnx", trained).output
    # an existing ONNX file is replaced only with --overwrite
    onnx = data_env / "model.onnx"
    onnx.write_bytes(b"kept")
    refused = run("export", trained, "--onnx", onnx)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert onnx.read_bytes() == b"kept"
    assert run("export", trained, "--onnx", onnx, "--overwrite").exit_code == 0
    assert onnx.read_bytes() != b"kept"
    # predict --output: refused before any worker starts
    folder = data_env / "images"
    folder.mkdir()
    table = data_env / "preds.csv"
    table.write_text("kept\n")
    refused = run("predict", trained, folder, "--output", table)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert table.read_text() == "kept\n"


def test_predict_goes_on_past_an_unreadable_image(trained, data_env):
    """Each readable image gets its prediction; the unreadable one gets an error line naming
    it, and the exit code says something failed."""
    from PIL import Image

    x, _y = bars(2, 5)
    good = [data_env / "a.png", data_env / "c.png"]
    for p, img in zip(good, x, strict=True):
        Image.fromarray(img).save(p)
    bad = data_env / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run("predict", trained, good[0], bad, good[1])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert [ln.split(":")[0] for ln in lines if not ln.startswith("error")] == list(map(str, good))
    assert any(ln.startswith(f"error: {bad}:") for ln in lines), result.output
    as_json = run("predict", trained, good[0], bad, "--json")
    assert as_json.exit_code == 1
    payload = json.loads(as_json.output[: as_json.output.rindex("]") + 1])
    assert payload[0]["image"] == str(good[0]) and "prediction" in payload[0]
    assert payload[1]["image"] == str(bad) and payload[1]["error"]
