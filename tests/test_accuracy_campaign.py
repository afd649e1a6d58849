"""scripts/accuracy_campaign.py end to end on a sliver of real Fashion-MNIST: the learning rate
is chosen on the validation split, test accuracy is measured once, and the curves are kept."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from .test_real_data import fashion

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "accuracy_campaign.py"


def test_campaign_chooses_on_validation_and_keeps_curves(tmp_path):
    fashion("test")  # skips where Fashion-MNIST is not installed
    out = tmp_path / "campaign"
    cmd = [sys.executable, str(SCRIPT), "--preset", "small", "--epochs", "2", "--seeds", "0"]
    cmd += ["--limit", "256", "--lr-grid", "0.01", "0.05", "--grid-epochs", "1"]
    cmd += ["--batch-size", "64", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((out / "results.json").read_text())
    (run,) = result["runs"]
    grid = {float(k): v for k, v in run["lr_grid_val_accuracy"].items()}
    assert set(grid) == {0.01, 0.05}
    assert run["lr"] == max(grid, key=grid.get)
    assert [row["epoch"] for row in run["history"]] == [1, 2]
    assert run["history"][-1]["val_accuracy"] == run["val_accuracy"]
    for key in ("test_accuracy", "test_accuracy_flip_averaged", "val_accuracy"):
        assert 0.1 < run[key] <= 1.0, (key, run[key])
    summary = result["summary"]
    assert summary["mean_test_accuracy"] == summary["best"] == summary["worst"]
    assert summary["mean_test_accuracy"] == run["test_accuracy"]


def test_all_train_uses_every_training_image_and_refuses_a_grid(tmp_path):
    fashion("test")
    out = tmp_path / "final"
    base = [sys.executable, str(SCRIPT), "--preset", "small", "--epochs", "1", "--seeds", "0"]
    base += ["--batch-size", "64", "--threads", "1", "--out", str(out)]
    bad = subprocess.run(
        [*base, "--all-train", "--lr-grid", "0.01", "0.05"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "--lr-grid chooses on the validation split" in bad.stderr
    assert "Received: --all-train --lr-grid 0.01 0.05" in bad.stderr
    assert not (out / "results.json").exists()
    held_out = json.loads(_run([*base, "--limit", "300"], out))["runs"][0]
    assert held_out["train_images"] == 300 and held_out["val_accuracy"] is not None
    (run,) = json.loads(_run([*base, "--limit", "300", "--all-train"], out))["runs"]
    assert run["train_images"] == 300 and run["val_accuracy"] is None
    assert math.isnan(run["history"][-1]["val_accuracy"])  # fit's mark for "no validation"
    assert 0.1 < run["test_accuracy"] <= 1.0


def _run(cmd, out):
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return (out / "results.json").read_text()


def test_decay_times_lr_gives_each_rate_its_own_weight_decay(tmp_path):
    """With --decay-times-lr X the rate chosen on the grid trains with weight decay X / rate;
    giving a weight decay as well is refused with both values named."""
    fashion("test")
    out = tmp_path / "coupled"
    base = [sys.executable, str(SCRIPT), "--preset", "small", "--epochs", "1", "--seeds", "0"]
    base += ["--limit", "256", "--batch-size", "64", "--threads", "1", "--out", str(out)]
    bad = subprocess.run(
        [*base, "--weight-decay", "1e-4", "--decay-times-lr", "5e-5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "Received: --weight-decay 0.0001 --decay-times-lr 5e-05" in bad.stderr
    cmd = [*base, "--lr-grid", "0.01", "0.05", "--grid-epochs", "1", "--decay-times-lr", "5e-5"]
    (run,) = json.loads(_run(cmd, out))["runs"]
    assert run["lr"] in (0.01, 0.05)
    assert math.isclose(run["weight_decay"], 5e-5 / run["lr"])
    plain = json.loads(_run([*base, "--lr", "0.02"], out))["runs"][0]
    assert plain["weight_decay"] == 5e-4  # the default, whatever the rate


def test_an_erasing_probability_outside_0_to_1_is_refused_before_any_training(tmp_path):
    out = tmp_path / "erase"
    cmd = [sys.executable, str(SCRIPT), "--erase", "1.5", "--out", str(out)]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "--erase must be a probability in [0, 1]. Received: 1.5" in bad.stderr
    assert not out.exists()
