"""ONNX import: this engine's own exports come back as the same model; PyTorch's exports and a
Keras-style NHWC graph predict as PyTorch / ONNX Runtime do; anything that is not a chain of
classic CNN operators, and every broken or hostile file, is refused in one line.

The PyTorch models live in ``tests/fixtures/onnx/`` with PyTorch's own softmax outputs, made by
``scripts/make_onnx_fixtures.py`` (``make onnx-fixtures``): this suite never imports torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the 'onnx' extra (onnxruntime) is not installed")

import classic_cnn as cc  # noqa: E402
from classic_cnn import presets  # noqa: E402
from classic_cnn.export import build_onnx, export_onnx  # noqa: E402
from classic_cnn.onnx_import import (  # noqa: E402
    MAX_ELEMENTS,
    OnnxImportError,
    OnnxImportWarning,
    model_from_proto,
)

from .conftest import FUZZ_EXAMPLES  # noqa: E402
from .test_export import every_layer_model, randomise  # noqa: E402
from .test_io_presets import trained_like  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "onnx"
H = onnx.helper
TP = onnx.TensorProto
FLOAT = TP.FLOAT


def quiet_import(source, **kw):
    """import_onnx (a path) or model_from_proto (a ModelProto), its warnings kept apart."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(source, (str, Path)):
            model = cc.import_onnx(source, **kw)
        else:
            model = model_from_proto(source, **kw)
    return model, [str(w.message) for w in caught if issubclass(w.category, OnnxImportWarning)]


def run_ort(proto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    (out,) = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})
    return out


def refused(source, *fragments):
    """The import fails with one line holding every fragment; returns the message."""
    with pytest.raises(OnnxImportError) as info:
        quiet_import(source)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# -- round trip: export_onnx then import_onnx --------------------------------------------------


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("preset", list(presets.PRESETS))
def test_round_trip_gives_back_the_same_model(preset, layout, softmax):
    model = randomise(presets.build(preset, seed=1))
    x = np.random.default_rng(2).standard_normal((16, *model.input_shape), np.float32)
    again, _ = quiet_import(build_onnx(model, layout=layout, softmax=softmax))
    diff = float(np.abs(again.predict_proba(x) - model.predict_proba(x)).max())
    assert diff <= 1e-6, (preset, layout, diff)
    # the same layers, settings, names and seed: Dropout comes back from the file's metadata
    assert again.get_config() == model.get_config()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_round_trip_of_every_layer_with_awkward_settings(layout):
    model = every_layer_model()  # odd 'same' pads, stride 3, non-square pooling, BN on vectors
    x = np.random.default_rng(4).standard_normal((8, *model.input_shape), np.float32)
    again, _ = quiet_import(build_onnx(model, layout=layout))
    assert float(np.abs(again.predict_proba(x) - model.predict_proba(x)).max()) <= 1e-6
    assert again.get_config() == model.get_config()


def test_round_trip_through_files_keeps_classes_and_preprocessing(tmp_path):
    model = randomise(trained_like())
    path = export_onnx(model, tmp_path / "lenet.onnx")
    again, notes = quiet_import(path)
    assert notes == []  # nothing had to be assumed
    assert again.classes == model.classes
    assert again.preprocessing == model.preprocessing
    assert again.name == model.name
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(again.predict_proba(images), model.predict_proba(images), atol=1e-6)
    saved = cc.load(cc.save(again, tmp_path / "again.safetensors"))
    assert saved.classes == model.classes
    origin = saved.metadata["hyperparameters"]["imported_from"]
    assert origin["format"] == "onnx" and origin["producer"].startswith("classic-cnn")


# -- PyTorch's exports (fixtures made by scripts/make_onnx_fixtures.py) -----------------------


@pytest.fixture(scope="module")
def torch_outputs():
    return np.load(FIXTURES / "torch_outputs.npz")


@pytest.mark.parametrize("name", ["lenet5", "vgg_bn", "article", "misc"])
def test_pytorch_models_predict_as_pytorch(name, torch_outputs):
    model, _ = quiet_import(FIXTURES / f"{name}.onnx")
    x, want = torch_outputs[f"{name}.x"], torch_outputs[f"{name}.probs"]
    got = model.predict_proba(x)
    diff = float(np.abs(got - want).max())
    print(f"{name}: |predict_proba − PyTorch's softmax| ≤ {diff:.1e}")
    assert diff <= 1e-5, (name, diff)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert not model.ends_in_softmax  # a trailing Softmax becomes predict_proba's


def test_pytorch_lenet_brings_its_classes_and_normalisation(torch_outputs):
    model, notes = quiet_import(FIXTURES / "lenet5.onnx")
    assert notes == []
    assert model.classes[0] == "T-shirt/top" and model.classes[9] == "Ankle boot"
    assert model.preprocessing.mean == (0.286,) and model.preprocessing.std == (0.353,)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten",
        "Dense", "ReLU", "Dense", "ReLU", "Dense",
    ]  # fmt: skip
    assert model.layers[0].padding == "same"  # PyTorch's padding=2 on a 5×5 kernel
    # raw uint8 images through the file's normalisation give PyTorch's answers
    x = torch_outputs["lenet5.x"]
    images = np.clip(np.rint((x * 0.353 + 0.286) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(
        model.predict_proba(images), torch_outputs["lenet5.probs"], atol=2e-3
    )


def test_pytorch_vgg_keeps_batch_norm_and_permutes_per_feature_statistics():
    model, notes = quiet_import(FIXTURES / "vgg_bn.onnx")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("BatchNorm") == 2  # after a ReLU, and BatchNorm1d after the flatten
    assert kinds[kinds.index("Flatten") + 1] == "BatchNorm"
    bn = model.layers[kinds.index("Flatten") + 1]
    assert not np.allclose(bn.buffers["running_var"], 1.0)  # the random statistics arrived
    assert model.classes == [str(i) for i in range(10)]
    assert any("numbered" in note for note in notes)
    assert any("--mean" in note for note in notes)


def test_classes_and_normalisation_given_override_the_file(torch_outputs):
    names = [f"kind {i}" for i in range(10)]
    model, notes = quiet_import(FIXTURES / "vgg_bn.onnx", classes=names, mean=0.5, std=[0.25])
    assert notes == []
    assert model.classes == names
    assert model.preprocessing.mean == (0.5,) and model.preprocessing.std == (0.25,)
    with pytest.raises(OnnxImportError, match="10 scores but 3 class names"):
        quiet_import(FIXTURES / "vgg_bn.onnx", classes=["a", "b", "c"])
    with pytest.raises(OnnxImportError, match="std must be positive"):
        quiet_import(FIXTURES / "vgg_bn.onnx", std=0)
    with pytest.raises(OnnxImportError, match=r"one value, or one per channel \(3\)"):
        quiet_import(FIXTURES / "article.onnx", mean=[0.1, 0.2])


# -- graphs written here: the NHWC (Keras-style) export and the flatten permutation -----------


def weight(name, shape, rng, scale=0.3):
    return onnx.numpy_helper.from_array(
        (rng.standard_normal(shape) * scale).astype(np.float32), name
    )


def make_model(nodes, inits, in_dims, out_dims, opset=17, **kw):
    graph = H.make_graph(
        nodes,
        "g",
        [H.make_tensor_value_info("x", FLOAT, in_dims)],
        [H.make_tensor_value_info(kw.pop("out", "y"), FLOAT, out_dims)],
        initializer=inits,
    )
    model = H.make_model(graph, opset_imports=[H.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def keras_style(pads=None):
    """What tf2onnx makes of a Keras CNN: N×H×W×C input, a Transpose to N×C×H×W before the
    convolutions, a Transpose back before Keras's channels-last flatten (a Reshape), MatMul + Add
    for the dense layers, a Softmax at the end."""
    rng = np.random.default_rng(7)
    conv = {"auto_pad": "SAME_UPPER"} if pads is None else {"pads": pads}
    nodes = [
        H.make_node("Transpose", ["x"], ["t0"], "to_nchw", perm=[0, 3, 1, 2]),
        H.make_node("Conv", ["t0", "k1", "b1"], ["c1"], "conv1", strides=[2, 2], **conv),
        H.make_node("Relu", ["c1"], ["r1"], "relu1"),
        H.make_node("MaxPool", ["r1"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
        H.make_node("Transpose", ["p1"], ["t1"], "to_nhwc", perm=[0, 2, 3, 1]),
        H.make_node("Reshape", ["t1", "shape"], ["f"], "flatten"),
        H.make_node("MatMul", ["f", "w2"], ["m2"], "dense1"),
        H.make_node("Add", ["m2", "b2"], ["a2"], "dense1_bias"),
        H.make_node("Elu", ["a2"], ["e2"], "elu", alpha=0.8),
        H.make_node("MatMul", ["e2", "w3"], ["m3"], "dense2"),
        H.make_node("Add", ["m3", "b3"], ["logits"], "dense2_bias"),
        H.make_node("Softmax", ["logits"], ["y"], "softmax", axis=-1),
    ]
    # 27×27×2 input, 4×4 kernel, stride 2, 'same': 14×14×5 (pads 1 before, 2 after), pooled 7×7
    inits = [
        weight("k1", (5, 2, 4, 4), rng),
        weight("b1", (5,), rng),
        onnx.numpy_helper.from_array(np.array([-1, 7 * 7 * 5], np.int64), "shape"),
        weight("w2", (245, 12), rng, 0.1),
        weight("b2", (1, 12), rng),
        weight("w3", (12, 4), rng),
        weight("b3", (4,), rng),
    ]
    return make_model(nodes, inits, ["N", 27, 27, 2], ["N", 4])


@pytest.mark.parametrize("pads", [None, [1, 1, 2, 2]], ids=["SAME_UPPER", "explicit-pads"])
def test_keras_style_nhwc_graph_predicts_as_onnx_runtime(pads):
    proto = keras_style(pads)
    onnx.checker.check_model(proto, full_check=True)
    model, _ = quiet_import(proto)
    assert model.input_shape == (27, 27, 2)
    assert model.layers[0].padding == "same"
    x = np.random.default_rng(8).standard_normal((10, 27, 27, 2)).astype(np.float32)
    diff = float(np.abs(model.predict_proba(x) - run_ort(proto, x)).max())
    assert diff <= 1e-5, diff


def nchw_flatten_graph(with_bn: bool):
    """Conv → Flatten on N×C×H×W (features in C·H·W order) → [BatchNormalization] → Gemm."""
    rng = np.random.default_rng(11)
    nodes = [
        H.make_node("Conv", ["x", "k"], ["c"], "conv", pads=[1, 1, 1, 1]),
        H.make_node("Relu", ["c"], ["r"], "relu"),
        H.make_node("Flatten", ["r"], ["f"], "flatten", axis=1),
    ]
    inits = [weight("k", (3, 2, 3, 3), rng)]
    last = "f"
    if with_bn:
        nodes.append(H.make_node("BatchNormalization", ["f", "g", "be", "mu", "var"], ["n"], "bn"))
        inits += [
            weight("g", (60,), rng),
            weight("be", (60,), rng),
            weight("mu", (60,), rng),
            onnx.numpy_helper.from_array(rng.uniform(0.5, 1.5, 60).astype(np.float32), "var"),
        ]
        last = "n"
    nodes.append(H.make_node("Gemm", [last, "w", "b"], ["y"], "fc", transB=1, alpha=0.5, beta=2.0))
    inits += [weight("w", (6, 60), rng), weight("b", (6,), rng)]
    return make_model(nodes, inits, ["N", 2, 4, 5], ["N", 6])


@pytest.mark.parametrize("with_bn", [False, True])
def test_dense_rows_after_an_nchw_flatten_are_permuted(with_bn):
    proto = nchw_flatten_graph(with_bn)
    model, _ = quiet_import(proto)
    x_nchw = np.random.default_rng(12).standard_normal((7, 2, 4, 5)).astype(np.float32)
    want = run_ort(proto, x_nchw)
    got = model.forward(x_nchw.transpose(0, 2, 3, 1))
    assert float(np.abs(got - want).max()) <= 1e-5
    # the permutation is real: row (h, w, c) of the kernel is ONNX's row c·20 + h·5 + w
    onnx_w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    dense = next(layer for layer in model.layers if isinstance(layer, cc.Dense))
    h, w, c = 1, 3, 2
    np.testing.assert_allclose(
        dense.params["kernel"][h * 15 + w * 3 + c], 0.5 * onnx_w[:, c * 20 + h * 5 + w]
    )
    assert not np.allclose(dense.params["kernel"], 0.5 * onnx_w.T)


# -- refusals: not a chain, not a classic operator ---------------------------------------------


def chain(*nodes, inits=(), in_dims=("N", 1, 6, 6), out_dims=("N", 1, 6, 6), **kw):
    return make_model(list(nodes), list(inits), list(in_dims), list(out_dims), **kw)


def k(name="k", shape=(1, 1, 3, 3)):
    return weight(name, shape, np.random.default_rng(0))


def test_residual_add_is_refused_with_its_node():
    proto = chain(
        H.make_node("Conv", ["x", "k"], ["c"], "conv", pads=[1, 1, 1, 1]),
        H.make_node("Add", ["c", "x"], ["y"], "residual"),
        inits=[k()],
    )
    refused(proto, "branch")  # x feeds the conv and the add
    proto = chain(
        H.make_node("Relu", ["x"], ["r"], "relu"),
        H.make_node("Conv", ["r", "k"], ["c"], "conv", pads=[1, 1, 1, 1]),
        H.make_node("Add", ["c", "c"], ["y"], "double"),
        inits=[k()],
    )
    refused(proto, "node 'double' (Add)", "combines")


def test_concat_and_unknown_operators_are_named():
    proto = chain(
        H.make_node("Relu", ["x"], ["r"], "relu"),
        H.make_node("Concat", ["r", "r"], ["y"], "cat", axis=1),
        out_dims=("N", 2, 6, 6),
    )
    refused(proto, "node 'cat' (Concat)")
    proto = chain(H.make_node("LRN", ["x"], ["y"], "norm", size=3))
    refused(proto, "node 'norm' (LRN)", "unsupported operator 'LRN'")
    proto = chain(
        H.make_node("Relu", ["x"], ["r"], "relu"),
        H.make_node("Mul", ["r", "s"], ["y"], "scale"),
        inits=[weight("s", (1,), np.random.default_rng(0))],
    )
    refused(proto, "node 'scale' (Mul)")


@pytest.mark.parametrize(
    "attrs, fragment",
    [
        ({"group": 1, "dilations": [2, 2]}, "dilation"),
        ({"strides": [1, 2]}, "strides=[1, 2]"),
        ({"pads": [0, 1, 2, 0]}, "uneven padding"),
        ({"auto_pad": "SAME_LOWER"}, "SAME_UPPER"),
    ],
)
def test_convolutions_this_engine_cannot_compute_are_refused(attrs, fragment):
    proto = chain(H.make_node("Conv", ["x", "k"], ["y"], "conv", **attrs), inits=[k()])
    refused(proto, "node 'conv' (Conv)", fragment)


def test_grouped_convolution_and_padded_pooling_are_refused():
    proto = chain(
        H.make_node("Conv", ["x", "k"], ["y"], "dw", group=2, pads=[1, 1, 1, 1]),
        inits=[k(shape=(2, 1, 3, 3))],
        in_dims=("N", 2, 6, 6),
    )
    refused(proto, "node 'dw' (Conv)")
    proto = chain(
        H.make_node("MaxPool", ["x"], ["y"], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    )
    refused(proto, "node 'pool' (MaxPool)", "padding")
    proto = chain(
        H.make_node("MaxPool", ["x"], ["y"], "pool", kernel_shape=[2, 2], strides=[2, 2],
                    ceil_mode=1),
        in_dims=("N", 1, 7, 7),
    )  # fmt: skip
    refused(proto, "ceil_mode")


def test_odd_transposes_reshapes_and_inputs_are_refused():
    proto = chain(H.make_node("Transpose", ["x"], ["y"], "swap", perm=[0, 1, 3, 2]))
    refused(proto, "node 'swap' (Transpose)", "perm=[0, 1, 3, 2]")
    shape = onnx.numpy_helper.from_array(np.array([-1, 6, 6], np.int64), "s")
    proto = chain(H.make_node("Reshape", ["x", "s"], ["y"], "to3d"), inits=[shape])
    refused(proto, "node 'to3d' (Reshape)", "only to (batch, 36)")
    graph = H.make_graph(
        [H.make_node("Add", ["a", "b"], ["y"], "join")],
        "two",
        [H.make_tensor_value_info(n, FLOAT, ["N", 4]) for n in "ab"],
        [H.make_tensor_value_info("y", FLOAT, ["N", 4])],
    )
    refused(H.make_model(graph), "2 inputs")
    proto = chain(H.make_node("Relu", ["x"], ["y"], "relu"), in_dims=("N", 1, "H", "W"))
    refused(proto, "must be fixed")
    # ... unless the image size is given
    model, _ = quiet_import(
        chain(
            H.make_node("Conv", ["x", "k"], ["c"], "conv"),
            H.make_node("Flatten", ["c"], ["f"], "flat"),
            H.make_node("MatMul", ["f", "w"], ["y"], "fc"),
            inits=[k(), weight("w", (16, 3), np.random.default_rng(0))],
            in_dims=("N", 1, "H", "W"),
            out_dims=("N", 3),
        ),
        input_shape=(6, 6, 1),
    )
    assert model.input_shape == (6, 6, 1) and model.output_shape == (3,)


def test_a_graph_with_a_cycle_is_refused():
    proto = chain(
        H.make_node("Identity", ["x"], ["t1"], "start"),
        H.make_node("Relu", ["t1"], ["t2"], "a"),
        H.make_node("Relu", ["t2"], ["t1"], "b"),  # writes t1 again: a → b → a …
    )
    refused(proto, "cycle")
    proto = chain(
        H.make_node("Relu", ["x"], ["y"], "a"),
        H.make_node("Relu", ["z"], ["w"], "island"),  # not on the chain
    )
    refused(proto, "node 'island' (Relu)", "not on the chain")


def test_a_model_ending_in_c_h_w_features_is_refused():
    proto = chain(
        H.make_node("Relu", ["x"], ["r"], "relu"),
        H.make_node("Flatten", ["r"], ["y"], "flat"),
        in_dims=("N", 2, 3, 3),
        out_dims=("N", 18),
    )
    refused(proto, "C·H·W order")


# -- hostile files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_bytes():
    model = randomise(presets.build("article", seed=0))
    return build_onnx(model).SerializeToString()


def write(tmp_path, data: bytes, name="m.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_truncated_empty_and_foreign_files(tmp_path, good_bytes):
    for data in (b"", good_bytes[:7], good_bytes[: len(good_bytes) // 2], b"\x89PNG\r\n\x1a\n"):
        refused(write(tmp_path, data), "m.onnx")
    refused(tmp_path / "missing.onnx", "no such ONNX file")


def lenet_with(initializer_change, tmp_path):
    model = onnx.load_model_from_string(
        build_onnx(randomise(presets.build("lenet5", seed=0))).SerializeToString()
    )
    tensor = next(t for t in model.graph.initializer if t.name.endswith("kernel"))
    initializer_change(tensor)
    return write(tmp_path, model.SerializeToString())


def test_huge_declared_tensors_are_refused_before_allocating(tmp_path):
    def huge(t):
        t.ClearField("dims")
        t.dims.extend([10**6, 10**6])

    refused(lenet_with(huge, tmp_path), "declares", f"{MAX_ELEMENTS:,}")

    def lying(t):
        t.dims[0] += 1

    refused(lenet_with(lying, tmp_path), "bytes")

    def negative(t):
        t.dims[0] = -5

    refused(lenet_with(negative, tmp_path), "negative")

    def integer(t):
        t.data_type = TP.STRING

    refused(lenet_with(integer, tmp_path), "data type")


def test_a_tiny_file_asking_for_huge_feature_maps_is_refused():
    """4,096 1×1 kernels (16 KB of weights) on a 4,096×4,096 image: 68 billion numbers."""
    proto = chain(
        H.make_node("Conv", ["x", "k"], ["y"], "wide"),
        inits=[k(shape=(4096, 1, 1, 1))],
        in_dims=("N", 1, 4096, 4096),
        out_dims=("N", 4096, 4096, 4096),
    )
    refused(proto, "largest feature map", "68,719,476,736")


def external(location: str, offset=0, length=None):
    def change(t):
        size = len(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = TP.EXTERNAL
        entries = {"location": location, "offset": str(offset)}
        entries["length"] = str(size if length is None else length)
        for key, value in entries.items():
            t.external_data.add(key=key, value=value)

    return change


def test_external_data_outside_the_model_folder_is_never_read(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 10**6)
    refused(lenet_with(external("../secret.bin"), folder), "outside the model's folder")
    refused(lenet_with(external(str(secret)), folder), "outside the model's folder")
    (folder / "link.bin").symlink_to(secret)
    refused(lenet_with(external("link.bin"), folder), "outside the model's folder")
    refused(lenet_with(external("nothing.bin"), folder), "missing")
    (folder / "short.bin").write_bytes(b"\0" * 100)
    refused(lenet_with(external("short.bin"), folder), "does not hold")
    refused(lenet_with(external("short.bin", offset=-4, length=8), folder), "does not hold")


def test_external_data_beside_the_model_is_read(tmp_path):
    model = randomise(presets.build("lenet5", seed=0))
    proto = build_onnx(model)
    path = tmp_path / "lenet.onnx"
    onnx.save_model(
        proto, path, save_as_external_data=True, location="lenet.data", size_threshold=0
    )
    assert (tmp_path / "lenet.data").stat().st_size > 200_000
    again, _ = quiet_import(path)
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1), np.float32)
    np.testing.assert_allclose(again.predict_proba(x), model.predict_proba(x), atol=1e-6)
    with pytest.raises(OnnxImportError, match="given as bytes"):
        quiet_import(onnx.load_model(path, load_external_data=False))


FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def import_or_clear_error(path: Path) -> None:
    """Either a model or OnnxImportError in one line: never another exception, never a hang."""
    try:
        quiet_import(path)
    except OnnxImportError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(content=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, content):
    import_or_clear_error(write(tmp_path, content))


@FUZZ
@given(data=st.data(), n_edits=st.integers(1, 6))
def test_fuzz_mutations_of_a_valid_file(tmp_path, good_bytes, data, n_edits):
    """Flip, set, insert and delete bytes of a valid export (the article's network): headers,
    attribute values, tensor sizes and names all get hit."""
    content = bytearray(good_bytes)
    for _ in range(n_edits):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(content) - 1, 0)))
        if kind == "flip" and content:
            content[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and content:
            content[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del content[pos:]
        elif kind == "insert":
            content[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and content:
            del content[pos]
    import_or_clear_error(write(tmp_path, bytes(content)))


@FUZZ
@given(
    data=st.data(),
    field=st.sampled_from(["dims", "attr", "op", "input", "opset"]),
)
def test_fuzz_structured_edits_of_a_valid_graph(tmp_path, good_bytes, data, field):
    """Edits that keep the protobuf well formed: dimensions, attribute ints, operator names,
    wiring and opset versions set to arbitrary values."""
    proto = onnx.load_model_from_string(good_bytes)
    graph = proto.graph
    if field == "dims":
        t = data.draw(st.sampled_from(list(graph.initializer)))
        if t.dims:
            t.dims[data.draw(st.integers(0, len(t.dims) - 1))] = data.draw(st.integers(-3, 2**40))
    elif field == "attr":
        node = data.draw(st.sampled_from([n for n in graph.node if n.attribute]))
        attr = data.draw(st.sampled_from(list(node.attribute)))
        if attr.ints:
            attr.ints[0] = data.draw(st.integers(-(2**40), 2**40))
        else:
            attr.i = data.draw(st.integers(-(2**40), 2**40))
            attr.f = data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
    elif field == "op":
        node = data.draw(st.sampled_from(list(graph.node)))
        node.op_type = data.draw(st.sampled_from(["Conv", "Gemm", "Softmax", "Flatten", "X", ""]))
    elif field == "input":
        node = data.draw(st.sampled_from(list(graph.node)))
        names = [o for n in graph.node for o in n.output] + ["input", "", "nope"]
        node.input[0] = data.draw(st.sampled_from(names))
    else:
        proto.opset_import[0].version = data.draw(st.integers(-5, 10**6))
    import_or_clear_error(write(tmp_path, proto.SerializeToString()))
