"""The README's import example (PyTorch → ONNX → cnn import/test/explain/serve) runs as written.

Its first line exports a PyTorch model; where torch (and onnxscript, which its exporter needs)
are not installed, as in the default test install, the committed PyTorch export of
``tests/fixtures/onnx/lenet5.onnx`` stands in for it and the other four lines still run.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
pytest.importorskip("onnxruntime", reason="the 'onnx' extra (onnxruntime) is not installed")
pytest.importorskip("fastapi", reason="the explorer needs the 'serve' extra (fastapi)")

import httpx

import classic_cnn as cc

from .conftest import serving

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI = [sys.executable, "-m", "classic_cnn.cli"]
CLASSES = "T-shirt/top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag Ankle-boot".split()

LENET_PY = """
import torch
from torch import nn


torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
)
"""


def import_example() -> list[str]:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- import-example -->\s*```sh\n(.*?)```", text, re.S)
    assert match, "README.md lost its marked import example"
    return [line for line in match.group(1).splitlines() if line.strip()]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fashion_here() -> bool:
    from classic_cnn.data import DatasetNotFound, load_dataset

    try:
        load_dataset("fashion-mnist", "test", download=False)
    except DatasetNotFound:
        return False
    return True


def run(line: str, cwd: Path) -> str:
    args = shlex.split(line)
    args = [*CLI, *args[1:]] if args[0] == "cnn" else [sys.executable, *args[1:]]
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (line, done.stdout, done.stderr)
    return done.stdout + done.stderr


def test_the_import_example_is_five_lines():
    lines = import_example()
    assert len(lines) == 5
    assert lines[0].startswith("python -c") and "torch.onnx.export" in lines[0]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["cnn", "import"], ["cnn", "test"], ["cnn", "explain"], ["cnn", "serve"]
    ]  # fmt: skip


def test_the_import_example_runs(tmp_path):
    export, import_, test, explain, serve = import_example()
    (tmp_path / "lenet.py").write_text(LENET_PY, encoding="utf-8")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    with_torch = has("torch") and has("onnxscript")
    if with_torch:
        run(export, tmp_path)
    else:
        shutil.copy(ROOT / "tests" / "fixtures" / "onnx" / "lenet5.onnx", tmp_path / "lenet.onnx")
    out = run(import_, tmp_path)
    assert "ONNX Runtime agrees" in out
    model = cc.load(tmp_path / "lenet.safetensors")
    assert model.classes == CLASSES
    assert model.preprocessing.mean == (0.286,) and model.preprocessing.std == (0.353,)
    if with_torch:  # the imported model computes what the PyTorch model computes
        import torch

        sys.path.insert(0, str(tmp_path))
        try:
            spec = importlib.util.spec_from_file_location("lenet", tmp_path / "lenet.py")
            lenet = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(lenet)
        finally:
            sys.path.remove(str(tmp_path))
        x = np.random.default_rng(0).standard_normal((8, 28, 28, 1)).astype(np.float32)
        with torch.no_grad():
            want = torch.softmax(lenet.net.eval()(torch.tensor(x.transpose(0, 3, 1, 2))), 1)
        assert float(np.abs(model.predict_proba(x) - want.numpy()).max()) <= 1e-5
    if fashion_here():
        assert "test accuracy" in run(test, tmp_path)
        assert "conv2d_1" in run(explain, tmp_path)
    # cnn serve, on a free port (the example's default 8000 may be taken on a shared machine)
    with serving(shlex.split(serve)[1:], cwd=tmp_path) as (url, _):
        summary = httpx.get(url + "api/summary", timeout=5).json()
        assert summary["classes"] == CLASSES
        pixels = np.zeros((28, 28), np.uint8)
        pixels[6:22, 9:19] = 200
        answer = httpx.post(url + "api/predict", json={"pixels": pixels.tolist()}).json()
        assert abs(sum(answer["probabilities"]) - 1) < 1e-5
