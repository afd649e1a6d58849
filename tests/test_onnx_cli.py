"""``cnn import`` end to end, and everything else working on an imported PyTorch model:
``cnn test``, ``cnn explain`` (its arithmetic equals the forward pass), ``cnn show filters/maps``,
the explorer's API, ``cnn export``, and fine-tuning with ``cnn train --init-from [--new-head]``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
pytest.importorskip("onnxruntime", reason="the 'onnx' extra (onnxruntime) is not installed")

import classic_cnn as cc
from classic_cnn.explain import explain, layer_outputs

from .test_cli import data_env, run  # noqa: F401  (data_env: a fixture)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "onnx"
LENET = FIXTURES / "lenet5.onnx"  # trained by PyTorch; classes, normalisation, dataset in it


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def imported(data_env):  # noqa: F811
    out = data_env / "lenet.safetensors"
    result = run("import", LENET, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_import_writes_a_model_that_predicts_as_pytorch(imported):
    model = cc.load(imported)
    torch = np.load(FIXTURES / "torch_outputs.npz")
    got = model.predict_proba(torch["lenet5.x"])
    assert float(np.abs(got - torch["lenet5.probs"]).max()) <= 1e-5
    assert model.classes[9] == "Ankle boot"
    assert model.metadata["dataset"] == {"name": "fashion-mnist"}
    assert model.metadata["hyperparameters"]["imported_from"]["producer"].startswith("pytorch")


def test_import_says_what_it_did_and_what_it_assumed(data_env):  # noqa: F811
    result = run("import", LENET, "--out", "a.safetensors")
    assert "ONNX Runtime agrees" in result.output and "cnn serve a.safetensors" in result.output
    assert "warning" not in result.output
    result = run("import", FIXTURES / "vgg_bn.onnx", "--out", "b.safetensors")
    assert result.exit_code == 0, result.output
    assert "warning: no class names" in result.output
    assert "warning: no preprocessing" in result.output
    assert cc.load("b.safetensors").classes == [str(i) for i in range(10)]


def test_classes_file_and_normalisation_options(data_env):  # noqa: F811
    names = data_env / "names.txt"
    names.write_text("\n".join(f"kind {i}" for i in range(10)) + "\n", encoding="utf-8")
    result = run(
        "import", FIXTURES / "article.onnx", "--out", "m.safetensors", "--classes", names,
        "--mean", "0.49,0.48,0.45", "--std", "0.25", "--background", "light",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    model = cc.load("m.safetensors")
    assert model.classes[3] == "kind 3"
    assert model.preprocessing.mean == (0.49, 0.48, 0.45)
    assert model.preprocessing.std == (0.25, 0.25, 0.25)
    assert model.preprocessing.background == "light"


def test_bad_input_gets_one_line_and_keeps_what_was_written(data_env, imported):  # noqa: F811
    before = imported.read_bytes()
    one_line_error(run("import", LENET, "--out", imported), "exists", "--overwrite")
    bad = data_env / "bad.onnx"
    bad.write_bytes(LENET.read_bytes()[:1000])
    one_line_error(run("import", bad, "--out", imported, "--overwrite"), "bad.onnx")
    assert imported.read_bytes() == before  # the refused import wrote nothing
    one_line_error(
        run("import", FIXTURES / "vgg_bn.onnx", "--out", "x.safetensors", "--classes",
            data_env / "none.txt"),
        "none.txt",
    )  # fmt: skip
    names = data_env / "three.txt"
    names.write_text("a\nb\nc\n", encoding="utf-8")
    one_line_error(
        run("import", LENET, "--out", "x.safetensors", "--classes", names),
        "10 scores but 3 class names",
    )
    result = run("import", LENET, "--out", "x.safetensors", "--mean", "half")
    assert result.exit_code == 2 and "half" in result.output
    assert not (data_env / "x.safetensors").exists()
    result = run("import", LENET, "--out", imported, "--overwrite")
    assert result.exit_code == 0, result.output


def test_cnn_test_explain_show_and_export_on_an_imported_model(imported, data_env):  # noqa: F811
    result = run("test", imported, "--limit", "50", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert 0.0 <= report["accuracy"] <= 1.0
    result = run("explain", imported, "test:3", "--layer", "conv2d_2", "--at", "4,5")
    assert result.exit_code == 0, result.output
    assert "conv2d_2" in result.output
    for args, png in (
        (("show", "filters", imported, "--layer", "conv2d_1"), "filters.png"),
        (("show", "maps", imported, "test:0"), "maps.png"),
    ):
        result = run(*args, "--out", data_env / png)
        assert result.exit_code == 0, result.output
        assert (data_env / png).read_bytes()[:4] == b"\x89PNG"
    result = run("export", imported, "--onnx", data_env / "again.onnx")
    assert result.exit_code == 0, result.output
    again = cc.import_onnx(data_env / "again.onnx")
    x = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(
        again.predict_proba(x), cc.load(imported).predict_proba(x), atol=1e-6
    )


@pytest.mark.parametrize(
    "layer, at",
    [("conv2d_1", (0, 0)), ("relu_1", (13, 14)), ("max_pool2d_1", (6, 7)), ("conv2d_2", (9, 2))],
)
def test_explain_arithmetic_equals_the_forward_pass_of_an_imported_model(layer, at):
    model = cc.import_onnx(LENET)
    x = np.load(FIXTURES / "torch_outputs.npz")["lenet5.x"][:1]
    e = explain(model, x, layer, at)
    names = [lyr.name for lyr in model.layers]
    y = layer_outputs(model, x)[names.index(layer)][0]
    assert e.value == pytest.approx(float(y[at[0], at[1], e.channel]), rel=1e-5, abs=1e-5)
    record = e.to_dict()
    if record["kind"] == "conv":
        products = np.array(record["products"])
        assert np.array_equal(products, np.array(record["patch"]) * np.array(record["kernel"]))
        assert record["conv_value"] == pytest.approx(products.sum() + record["bias"], rel=1e-9)


def test_the_explorer_serves_an_imported_model(imported):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from classic_cnn.serve import create_app

    model = cc.load(imported)
    client = TestClient(create_app(model, samples=None), base_url="http://127.0.0.1:8000")
    summary = client.get("/api/summary").json()
    assert summary["classes"][0] == "T-shirt/top"
    assert summary["map_layers"][:3] == ["conv2d_1", "relu_1", "max_pool2d_1"]
    pixels = np.load(FIXTURES / "torch_outputs.npz")["lenet5.x"][0, ..., 0]
    image = np.clip(np.rint((pixels * 0.353 + 0.286) * 255), 0, 255).astype(np.uint8)
    r = client.post("/api/predict", json={"pixels": image.tolist(), "invert": "no"})
    assert r.status_code == 200, r.text
    torch = np.load(FIXTURES / "torch_outputs.npz")["lenet5.probs"][0]
    np.testing.assert_allclose(r.json()["probabilities"], torch, atol=2e-3)
    body = {"pixels": image.tolist(), "invert": "no", "layer": "conv2d_2", "row": 3, "col": 4}
    r = client.post("/api/explain", json=body)
    assert r.status_code == 200, r.text
    e = r.json()
    products = np.array(e["products"])
    assert e["conv_value"] == pytest.approx(products.sum() + e["bias"], rel=1e-9)


def test_fine_tune_an_imported_model(imported, data_env):  # noqa: F811
    """Same classes: the imported weights are the start; other classes: --new-head."""
    train = ("train", "--epochs", "1", "--val", "50", "--limit", "120", "--batch-size", "32")
    result = run(*train, "--init-from", imported, "--out", "ft")
    assert result.exit_code == 0, result.output
    tuned = cc.load(data_env / "ft" / "model.safetensors")
    start = cc.load(imported)
    assert tuned.preprocessing == start.preprocessing  # the normalisation PyTorch trained with
    assert tuned.get_config()["layers"] == start.get_config()["layers"]
    assert not np.array_equal(tuned.layers[0].params["kernel"], start.layers[0].params["kernel"])
    # a 3-class image folder: the 10-class head does not fit without --new-head
    folder = data_env / "three"
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(["ant", "bee", "cat"]):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            image = (rng.random((28, 28)) * 60).astype(np.uint8)
            image[4 + 6 * k : 10 + 6 * k] = 220
            Image.fromarray(image).save(folder / name / f"{i}.png")
    result = run(*train, "--data", folder, "--init-from", imported, "--out", "ft3")
    one_line_error(result, "10 class scores", "3 classes", "--new-head")
    result = run(*train, "--data", folder, "--init-from", imported, "--new-head", "--out", "ft3")
    assert result.exit_code == 0, result.output
    three = cc.load(data_env / "ft3" / "model.safetensors")
    assert three.classes == ["ant", "bee", "cat"] and three.output_shape == (3,)
    assert three.count_params() == start.count_params() - 7 * 85  # 84×10+10 → 84×3+3
    result = run("train", "--new-head", "--out", "x")
    assert result.exit_code == 2 and "--init-from" in result.output


def test_new_head_keeps_every_other_weight():
    from classic_cnn.train import new_head

    start = cc.import_onnx(LENET)
    fresh = new_head(start, 4, seed=1)
    assert fresh.output_shape == (4,) and fresh.preprocessing == start.preprocessing
    for new, old in zip(fresh.layers[:-1], start.layers[:-1], strict=True):
        for key, value in old.params.items():
            np.testing.assert_array_equal(new.params[key], value)
    assert fresh.layers[-1].params["kernel"].shape == (84, 4)
    no_dense = cc.Sequential([cc.Conv2D(2, 3), cc.Flatten()], (5, 5, 1))
    with pytest.raises(ValueError, match="no dense layer"):
        new_head(no_dense, 3)


def test_a_graph_exported_for_a_fixed_batch_of_one_imports(data_env):  # noqa: F811
    import onnx

    proto = onnx.load(FIXTURES / "vgg_bn.onnx")
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # as torch.onnx.export without
    path = data_env / "one.onnx"  # dynamic shapes writes it
    onnx.save(proto, path)
    result = run("import", path, "--out", "one.safetensors")
    assert result.exit_code == 0, result.output
    x = np.load(FIXTURES / "torch_outputs.npz")["vgg_bn.x"]
    want = np.load(FIXTURES / "torch_outputs.npz")["vgg_bn.probs"]
    assert float(np.abs(cc.load("one.safetensors").predict_proba(x) - want).max()) <= 1e-5
