"""Model files (safetensors + metadata) and the named architectures."""

from __future__ import annotations

import json

import numpy as np
import pytest

import classic_cnn as cc
from classic_cnn import io, presets
from classic_cnn.data import Dataset
from classic_cnn.data.batches import Preprocessing


def trained_like(seed=0):
    model = presets.build("lenet5", seed=seed)
    model.classes = [f"class {i}" for i in range(10)]
    rng = np.random.default_rng(seed)
    data = Dataset(
        rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), np.arange(20) % 10, model.classes
    )
    model.preprocessing = Preprocessing.from_dataset(data)
    return model


def test_save_and_load_round_trip(tmp_path):
    model = trained_like()
    path = io.save(
        model,
        tmp_path / "m.safetensors",
        dataset={"name": "x", "split_seed": 0},
        hyperparameters={"lr": 0.1},
        metrics={"val_accuracy": 0.5},
    )
    again = cc.load(path)
    assert again.get_config() == model.get_config()
    assert again.classes == model.classes
    assert again.preprocessing == model.preprocessing
    assert (
        again.metadata["dataset"]["name"] == "x"
        and again.metadata["metrics"]["val_accuracy"] == 0.5
    )
    assert again.metadata["format_version"] == "1"
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(again.predict_proba(images), model.predict_proba(images))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_not_a_model_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, not a model")
    with pytest.raises(io.ModelFileError, match="not a safetensors model file"):
        cc.load(junk)
    with pytest.raises(io.ModelFileError, match="no such model file"):
        cc.load(tmp_path / "missing.safetensors")
    with pytest.raises(io.ModelFileError, match="a folder, not a model file"):
        cc.load(tmp_path)
    onnx = tmp_path / "model.onnx"  # a model from elsewhere: the message says how to bring it in
    onnx.write_bytes(b"\x08\x07protobuf")
    with pytest.raises(io.ModelFileError, match=r"cnn import .*model\.onnx --out"):
        cc.load(onnx)


def test_safetensors_from_another_tool_and_future_versions(tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(io.ModelFileError, match="not a classic-cnn model"):
        cc.load(other)
    path = io.save(trained_like(), tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={**meta, "format_version": "99"})
    with pytest.raises(io.ModelFileError, match="version '99'"):
        cc.load(future)
    broken = tmp_path / "broken.safetensors"
    arch = json.loads(meta["architecture"])
    arch["layers"][0]["class_name"] = "Mystery"
    save_file(tensors, str(broken), metadata={**meta, "architecture": json.dumps(arch)})
    with pytest.raises(io.ModelFileError, match="Mystery"):
        cc.load(broken)


def test_an_existing_model_survives_a_failed_write(tmp_path, monkeypatch):
    path = io.save(trained_like(seed=0), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match=r"No space left.*the existing file is unchanged"):
        io.save(trained_like(seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="is a file"):
        io.save(trained_like(), tmp_path / "afile" / "m.safetensors")


@pytest.mark.parametrize(
    "name,input_shape,params",
    [
        ("lenet5", (28, 28, 1), 61706),
        # TinyVGG: four 3×3 convs of 10 filters, 13×13×10 into 10 classes
        ("tinyvgg", (64, 64, 3), 280 + 3 * 910 + 1690 * 10 + 10),
        ("article", (32, 32, 3), 456 + 2416 + 400 * 10 + 10),
        ("small", (28, 28, 1), None),
    ],
)
def test_presets(name, input_shape, params):
    model = presets.build(name)
    assert model.input_shape == input_shape and model.output_shape == (10,)
    if params:
        assert model.count_params() == params
    if name == "article":  # 5×5×3 kernels giving 28×28 feature maps
        assert model.layers[0].params["kernel"].shape[:3] == (5, 5, 3)
        assert model.summary_rows()[0]["output_shape"] == (28, 28, 6)


def test_a_preset_with_another_kernel_initializer():
    plain = presets.build("fashion", seed=3)
    other = presets.build("fashion", seed=3, kernel_initializer="fan_in_uniform")
    weighted = [layer for layer in other.layers if "kernel" in layer.params]
    assert len(weighted) == 6  # four convolutions, two dense layers
    assert all(layer.kernel_initializer == "fan_in_uniform" for layer in weighted)
    assert all(
        layer.kernel_initializer == "he_normal"
        for layer in plain.layers
        if layer.params.get("kernel") is not None
    )
    for layer in weighted:
        w = layer.params["kernel"]
        fan_in = int(np.prod(w.shape[:-1]))
        assert np.abs(w).max() <= 1 / np.sqrt(fan_in) + 1e-7
        assert w.std() == pytest.approx(1 / np.sqrt(3 * fan_in), rel=0.1)
    with pytest.raises(ValueError, match="kernel_initializer must be one of") as e:
        presets.build("fashion", kernel_initializer="torch")
    assert "Received: kernel_initializer='torch'" in str(e.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="small, lenet5, tinyvgg, article"):
        presets.build("resnet")


def test_architecture_files(tmp_path):
    toml = tmp_path / "net.toml"
    toml.write_text(
        'input_shape = [28, 28, 1]\n\n[[layers]]\ntype = "Conv2D"\nfilters = 4\nkernel_size = 3\n\n'
        '[[layers]]\ntype = "ReLU"\n\n[[layers]]\ntype = "Flatten"\n\n[[layers]]\ntype = "Dense"\n'
        "units = 10\n"
    )
    model = presets.build(str(toml))
    assert model.summary_rows()[0]["output_shape"] == (26, 26, 4)
    js = tmp_path / "net.json"
    js.write_text(
        json.dumps(
            {
                "input_shape": [8, 8, 3],
                "layers": [
                    {"type": "Conv2D", "filters": 2, "kernel_size": [3, 2], "padding": "same"},
                    {"type": "MaxPool2D", "pool_size": 2},
                    {"type": "Flatten"},
                    {"type": "Dense", "units": 5},
                ],
            },
            indent=1,
        )
    )
    assert presets.build(str(js)).output_shape == (5,)


def test_architecture_file_errors_name_line_and_layer(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'input_shape = [28, 28, 1]\n\n[[layers]]\ntype = "Conv2D"\nfilters = 4\nkernel_size = 3\n\n'
        '[[layers]]\ntype = "Conv2D"\nfilters = 4\nkernel_size = 0\n'
    )
    with pytest.raises(
        presets.ArchitectureError, match=r"line 8, layer 2 \(Conv2D\).*kernel_size=0"
    ):
        presets.build(str(bad))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(
        '{"input_shape": [4, 4, 1],\n "layers": [\n  {"type": "Flatten"},\n  {"type": "Swish"}\n]}'
    )
    with pytest.raises(presets.ArchitectureError, match=r"line 4, layer 2.*Swish"):
        presets.build(str(unknown))
    syntax = tmp_path / "syntax.json"
    syntax.write_text('{"layers": [\n {"type": "Flatten",}\n]}')
    with pytest.raises(presets.ArchitectureError, match="line 2: invalid JSON"):
        presets.build(str(syntax))


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = io.save(trained_like(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_disk_that_fills_midway_keeps_the_existing_model(tmp_path, monkeypatch):
    path = io.save(trained_like(seed=0), tmp_path / "m.safetensors")
    before = path.read_bytes()
    real_fdopen = io.os.fdopen

    class FillsUp:
        """A file that takes the first 1,000 bytes, then reports a full disk."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:1000])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=r"could not write .*m\.safetensors.*No space left"):
        io.save(trained_like(seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
