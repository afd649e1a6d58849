"""ONNX export: every layer, every preset, both layouts, checked by onnx.checker and run by ONNX
Runtime against this engine's own ``predict_proba`` (softmax on) or ``forward`` (logits).

Biases, batch-norm parameters and running statistics are set to random values first: freshly
built they are zeros and ones, which would hide a bias dropped or a statistic swapped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
pytest.importorskip("onnxruntime", reason="the 'onnx' extra (onnxruntime) is not installed")

import classic_cnn as cc  # noqa: E402
from classic_cnn import io, presets  # noqa: E402
from classic_cnn.data import DatasetNotFound, load_dataset  # noqa: E402
from classic_cnn.data.batches import Preprocessing, convert_images  # noqa: E402
from classic_cnn.export import (  # noqa: E402
    OPSET,
    build_onnx,
    compare_with_onnxruntime,
    export_onnx,
)
from classic_cnn.layers import Layer  # noqa: E402

TOL = 1e-5  # the bound on |ONNX Runtime − predict_proba|


def randomise(model, seed=0):
    """Random biases, betas, gammas and running statistics (variance positive)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for key, value in (layer.params | layer.buffers).items():
            if key in ("bias", "beta", "running_mean"):
                value[...] = rng.normal(0.0, 0.5, value.shape)
            elif key in ("gamma", "running_var"):
                value[...] = rng.uniform(0.5, 1.5, value.shape)
    return model


def max_diff(model, x, layout="NHWC", softmax=True, **kw):
    proto = build_onnx(model, layout=layout, softmax=softmax, **kw)
    onnx.checker.check_model(proto, full_check=True)
    got, want = compare_with_onnxruntime(model, proto, x, layout=layout, softmax=softmax)
    assert got.shape == want.shape
    return float(np.abs(got - want).max()), float(np.abs(want).max())


def assert_matches(model, x, layout="NHWC", label=""):
    """Probabilities to TOL absolutely; logits to TOL relative to their size."""
    prob, _ = max_diff(model, x, layout, softmax=True)
    logit, scale = max_diff(model, x, layout, softmax=False)
    print(f"{label or model.name} {layout}: probabilities {prob:.2e}, logits {logit:.2e}")
    assert prob <= TOL, (label, layout, prob)
    assert logit <= TOL * max(1.0, scale), (label, layout, logit, scale)
    return prob


# -- every preset ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("preset", list(presets.PRESETS))
def test_every_preset_on_random_inputs(preset, layout):
    model = randomise(presets.build(preset, seed=1))
    x = np.random.default_rng(2).standard_normal((32, *model.input_shape), np.float32)
    assert_matches(model, x, layout, f"{preset} random")


def fashion(split):
    try:
        return load_dataset("fashion-mnist", split, download=False)
    except DatasetNotFound as exc:
        pytest.skip(f"Fashion-MNIST not available here ({str(exc).splitlines()[0]})")


@pytest.fixture(scope="module")
def fashion_sets():
    return fashion("train").take(256), fashion("test")


@pytest.mark.parametrize("preset", list(presets.PRESETS))
def test_every_preset_on_real_fashion_mnist_test_images(preset, fashion_sets, tmp_path):
    """Each preset trained one epoch on 256 real images (real weights, real batch-norm
    statistics, the data's preprocessing), saved and loaded as a user would, then exported: ONNX
    Runtime on the documented preprocessing of 500 test images equals ``predict_proba`` on the
    raw uint8 images."""
    from rich.console import Console

    train, test = fashion_sets
    model = presets.build(preset, seed=0)
    cc.fit(model, train, epochs=1, batch_size=64, progress=False, console=Console(quiet=True))
    model = io.load(io.save(model, tmp_path / "model.safetensors"))
    images = test.images[:500]
    prep = model.preprocessing
    # what the README tells an ONNX Runtime user to do: convert, then (x/255 − mean)/std
    x = prep.apply(convert_images(images, prep.input_shape, prep.background))
    for layout in ("NHWC", "NCHW"):
        proto = build_onnx(model, layout=layout)
        got, _ = compare_with_onnxruntime(model, proto, x, layout=layout)
        diff = float(np.abs(got - model.predict_proba(images)).max())
        print(f"{preset} real {layout}: probabilities {diff:.2e}")
        assert diff <= TOL, (preset, layout, diff)
        assert (got.argmax(1) == model.predict(images)).mean() > 0.99


# -- every layer and its awkward settings ------------------------------------------------------


EVERY_SHAPE = (45, 39, 3)


def every_layer_model(dtype="float32"):
    layers = [
        # Keras's 'same' with odd totals: pads (1, 2) rows and (1, 2) columns, extra bottom/right
        cc.Conv2D(4, 4, stride=2, padding="same"),
        cc.BatchNorm(),
        cc.LeakyReLU(0.2),
        cc.Conv2D(5, (4, 2), padding="same"),  # pads top 1, bottom 2, left 0, right 1
        cc.ELU(0.7),
        cc.Conv2D(6, 3, stride=3, padding=1),  # int padding, stride 3
        cc.Sigmoid(),
        cc.MaxPool2D(3, stride=2),  # 8×7 → 3×3: the last row of windows is dropped
        cc.Conv2D(6, 1, use_bias=False),
        cc.Tanh(),
        cc.AvgPool2D((2, 1), stride=1),  # non-square window
        cc.Dropout(0.5),
        cc.Flatten(),
        cc.BatchNorm(),  # on vectors
        cc.Dense(7, use_bias=False),
        cc.ReLU(),
        cc.Dense(5),
    ]
    return randomise(cc.Sequential(layers, EVERY_SHAPE, seed=3, dtype=dtype, name="every"))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_every_layer_with_awkward_settings(layout):
    model = every_layer_model()
    x = np.random.default_rng(4).standard_normal((16, *EVERY_SHAPE), np.float32)
    assert_matches(model, x, layout, "every layer")


def test_float64_model_exports_as_float32():
    model = every_layer_model("float64")
    x = np.random.default_rng(5).standard_normal((8, *EVERY_SHAPE))
    assert_matches(model, x, "NHWC", "every layer float64")


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_feature_map_outputs_and_softmax_over_channels(layout):
    """No Flatten: the output stays feature maps (in the input's layout) and the softmax, like
    predict_proba's, is over the channels; a Softmax layer in the middle too."""
    layers = [cc.Conv2D(4, 3, padding="same"), cc.Softmax(), cc.Conv2D(3, 2, stride=2)]
    model = randomise(cc.Sequential(layers, (9, 8, 2), seed=0, name="maps"))
    x = np.random.default_rng(6).standard_normal((4, 9, 8, 2), np.float32)
    assert_matches(model, x, layout, "feature maps")
    proto = build_onnx(model, layout=layout)
    dims = [d.dim_value or d.dim_param for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == (["N", 4, 4, 3] if layout == "NHWC" else ["N", 3, 4, 4])


def test_vector_inputs():
    layers = [cc.BatchNorm(), cc.Dense(6), cc.Tanh(), cc.Dropout(0.2), cc.Dense(3)]
    model = randomise(cc.Sequential(layers, (5,), seed=0, name="vectors"))
    x = np.random.default_rng(7).standard_normal((10, 5), np.float32)
    assert_matches(model, x, "NHWC", "vectors")
    meta = {p.key: p.value for p in build_onnx(model).metadata_props}
    assert meta["input_layout"] == "ND"


def test_model_ending_in_softmax_gets_no_second_one():
    layers = [cc.Flatten(), cc.Dense(4), cc.Softmax()]
    model = randomise(cc.Sequential(layers, (3, 3, 1), seed=0))
    x = np.random.default_rng(8).standard_normal((6, 3, 3, 1), np.float32)
    for softmax in (True, False):
        proto = build_onnx(model, softmax=softmax)
        assert [n.op_type for n in proto.graph.node].count("Softmax") == 1
        assert proto.graph.output[0].name == "probabilities"
        got, want = compare_with_onnxruntime(model, proto, x, softmax=softmax)
        assert np.abs(got - want).max() <= TOL


def test_padding_order_is_onnx_top_left_bottom_right():
    """Keras's 'same' for a 4×4 kernel at stride 1 pads 1 top/left and 2 bottom/right."""
    model = cc.Sequential([cc.Conv2D(1, 4, padding="same")], (6, 5, 1))
    (conv,) = [n for n in build_onnx(model).graph.node if n.op_type == "Conv"]
    pads = next(a for a in conv.attribute if a.name == "pads")
    assert list(pads.ints) == [1, 1, 2, 2]


def test_any_batch_size():
    model = randomise(presets.build("lenet5"))
    proto = build_onnx(model)
    for n in (1, 7):
        x = np.random.default_rng(n).standard_normal((n, 28, 28, 1), np.float32)
        got, want = compare_with_onnxruntime(model, proto, x)
        assert got.shape == (n, 10) and np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("opset", [13, OPSET, 21])
def test_opsets(opset):
    model = every_layer_model()
    proto = build_onnx(model, opset=opset)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", opset)]
    x = np.random.default_rng(9).standard_normal((4, *EVERY_SHAPE), np.float32)
    got, want = compare_with_onnxruntime(model, proto, x)
    assert np.abs(got - want).max() <= TOL


# -- the file: metadata, checker, errors ---------------------------------------------------------


def test_file_carries_classes_preprocessing_and_layout(tmp_path):
    model = randomise(presets.build("small"))
    model.classes = [f"class {i}" for i in range(10)]
    model.preprocessing = Preprocessing((28, 28), 1, (0.286,), (0.353,), "dark")
    path = cc.export_onnx(model, tmp_path / "sub" / "small.onnx", layout="NCHW")
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    meta = {p.key: p.value for p in loaded.metadata_props}
    assert json.loads(meta["classes"]) == model.classes
    assert json.loads(meta["preprocessing"]) == {
        "size": [28, 28],
        "channels": 1,
        "mean": [0.286],
        "std": [0.353],
        "background": "dark",
    }
    assert meta["input_layout"] == "NCHW" and meta["output"] == "probabilities"
    assert json.loads(meta["architecture"]) == model.get_config()
    assert loaded.producer_name == "classic-cnn"
    assert [o.version for o in loaded.opset_import] == [OPSET] and loaded.ir_version == 8
    dims = [d.dim_value or d.dim_param for d in loaded.graph.input[0].type.tensor_type.shape.dim]
    assert loaded.graph.input[0].name == "input" and dims == ["N", 1, 28, 28]
    x = np.random.default_rng(0).standard_normal((3, 28, 28, 1), np.float32)
    got, want = compare_with_onnxruntime(model, path, x, layout="NCHW")
    assert np.abs(got - want).max() <= TOL


def test_a_layer_that_cannot_be_exported_is_named():
    class Square(Layer):
        default_name = "square"

        def forward(self, x, training=False):
            return x * x

    class MyReLU(cc.ReLU):  # a subclass may compute something else: refused too
        pass

    for odd, name in ((Square(name="sq"), "Square layer 'sq'"), (MyReLU(), "MyReLU layer")):
        model = cc.Sequential([cc.Flatten(), odd, cc.Dense(2)], (2, 2, 1), name="odd")
        with pytest.raises(ValueError, match=name) as err:
            build_onnx(model)
        assert "model 'odd'" in str(err.value) and "exportable layers: Conv2D" in str(err.value)


def test_bad_layout_and_opset():
    model = presets.build("article")
    with pytest.raises(ValueError, match="layout must be 'NHWC' or 'NCHW'"):
        build_onnx(model, layout="CHW")
    with pytest.raises(ValueError, match=r"opset must be an int from 13.*Received: opset=9"):
        build_onnx(model, opset=9)


def test_missing_onnx_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # None in sys.modules: ImportError on import
    with pytest.raises(ImportError, match=r"pip install 'classic-cnn\[onnx\]'"):
        export_onnx(presets.build("article"), tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_import_and_cli_help_do_not_import_onnx():
    code = (
        "import sys, classic_cnn\n"
        "from classic_cnn import cli\n"
        "try:\n"
        "    cli.app(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')))\n"
        "print(callable(classic_cnn.export_onnx))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "True"]


# -- the command ----------------------------------------------------------------------------------


def test_cnn_export(tmp_path):
    from typer.testing import CliRunner

    from classic_cnn.cli import app

    model = randomise(presets.build("lenet5"))
    model.classes = list("abcdefghij")
    model.preprocessing = Preprocessing((28, 28), 1, (0.5,), (0.25,), "dark")
    path = io.save(model, tmp_path / "model.safetensors")
    runner = CliRunner()
    out = tmp_path / "lenet.onnx"
    result = runner.invoke(app, ["export", str(path), "--onnx", str(out)])
    assert result.exit_code == 0, result.output
    assert "ONNX opset 17" in result.output and "N×28×28×1" in result.output
    assert "'probabilities'" in result.output and "agrees with this engine" in result.output
    x = np.random.default_rng(1).standard_normal((5, 28, 28, 1), np.float32)
    got, want = compare_with_onnxruntime(model, out, x)
    assert np.abs(got - want).max() <= TOL

    out2 = tmp_path / "lenet-nchw.onnx"
    args = ["export", str(path), "--onnx", str(out2), "--layout", "nchw", "--logits"]
    result = runner.invoke(app, [*args, "--opset", "13"])
    assert result.exit_code == 0, result.output
    assert "N×1×28×28" in result.output and "'logits'" in result.output
    got, want = compare_with_onnxruntime(model, out2, x, layout="NCHW", softmax=False)
    assert np.abs(got - want).max() <= TOL * max(1.0, float(np.abs(want).max()))

    result = runner.invoke(app, ["export", str(tmp_path / "none.safetensors"), "--onnx", "x.onnx"])
    assert result.exit_code == 1 and "no such model file" in result.output
    # out exists now: --overwrite, so that the opset is what gets refused
    result = runner.invoke(
        app, ["export", str(path), "--onnx", str(out), "--opset", "5", "--overwrite"]
    )
    assert result.exit_code == 1 and "opset must be an int from 13" in result.output


# -- the README's example ----------------------------------------------------------------------


def readme_onnx_example() -> str:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text(encoding="utf-8").split("## Take a model anywhere (ONNX)")[1]
    match = re.search(r"```python\n(.*?)```", section.split("\n## ")[0], re.S)
    assert match, "README.md lost the ONNX Runtime example"
    return match.group(1)


def test_readme_example_runs_with_onnx_runtime_alone(tmp_path):
    """The README's five lines, in a fresh interpreter importing neither classic-cnn nor onnx,
    give predict_proba's probabilities from raw uint8 images."""
    code = readme_onnx_example()
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    model = randomise(presets.build("lenet5"))
    model.classes = [f"class {i}" for i in range(10)]
    model.preprocessing = Preprocessing((28, 28), 1, (0.286,), (0.353,), "dark")
    cc.export_onnx(model, tmp_path / "lenet.onnx")
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import numpy as np\nimages = np.load('images.npy')\n"
        + code
        + "np.save('probs.npy', probs)\nprint(classes[probs[0].argmax()])\n"
        + "import sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
        + "('classic_cnn', 'onnx')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"
    want = model.predict_proba(images)
    assert out.stdout.splitlines()[0] == model.classes[want[0].argmax()]
    assert np.abs(np.load(tmp_path / "probs.npy") - want).max() <= TOL


def test_cnn_export_refuses_to_write_what_does_not_match_or_cannot_be_built(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from classic_cnn import export
    from classic_cnn.cli import app

    path = io.save(randomise(presets.build("article")), tmp_path / "model.safetensors")
    out = tmp_path / "a.onnx"
    runner = CliRunner()

    def off_by_one(model, proto, x, **kw):
        want = model.predict_proba(x)
        return want + 1e-3, want

    monkeypatch.setattr(export, "compare_with_onnxruntime", off_by_one)
    result = runner.invoke(app, ["export", str(path), "--onnx", str(out)])
    assert result.exit_code == 1 and "differ from this engine's by 0.001" in result.output
    assert not out.exists()
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "onnx", None)
    result = runner.invoke(app, ["export", str(path), "--onnx", str(out)])
    assert result.exit_code == 1 and "pip install 'classic-cnn[onnx]'" in result.output
    assert "Traceback" not in result.output and not out.exists()
