"""Model and checkpoint files that are broken or hostile get a clear error, never code
execution; an older format version keeps loading."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

import classic_cnn as cc
from classic_cnn import io, presets
from classic_cnn.train import load_state

from .conftest import FUZZ_EXAMPLES
from .test_io_presets import trained_like

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_V1 = ROOT / "tests" / "fixtures" / "model_v1.safetensors"


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "good.safetensors"
    return io.save(trained_like(), path).read_bytes()


def split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def load_bytes(tmp_path, data: bytes):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    return cc.load(path)


def test_truncated_and_empty_files(tmp_path, good_bytes):
    for data in (b"", good_bytes[:5], good_bytes[:100], good_bytes[: len(good_bytes) // 2]):
        with pytest.raises(io.ModelFileError, match="not a safetensors model file"):
            load_bytes(tmp_path, data)


def test_header_that_lies_about_sizes_or_dtypes(tmp_path, good_bytes):
    header, body = split(good_bytes)
    name = next(k for k in header if k != "__metadata__")
    lying = json.loads(json.dumps(header))
    begin, end = lying[name]["data_offsets"]
    lying[name]["data_offsets"] = [begin, end + 10**12]  # claims a terabyte
    with pytest.raises(io.ModelFileError):
        load_bytes(tmp_path, join(lying, body))
    huge = json.loads(json.dumps(header))
    huge[name]["shape"] = [10**9, 10**9]
    with pytest.raises(io.ModelFileError):
        load_bytes(tmp_path, join(huge, body))
    wrong_dtype = json.loads(json.dumps(header))
    wrong_dtype[name]["dtype"] = "I32"  # same byte count, integer data
    with pytest.raises(io.ModelFileError, match="floating point"):
        load_bytes(tmp_path, join(wrong_dtype, body))


def test_missing_metadata_and_unknown_layers(tmp_path, good_bytes):
    header, body = split(good_bytes)
    bare = {k: v for k, v in header.items() if k != "__metadata__"}
    with pytest.raises(io.ModelFileError, match="not a classic-cnn model"):
        load_bytes(tmp_path, join(bare, body))
    meta = dict(header["__metadata__"])
    del meta["architecture"]
    with pytest.raises(io.ModelFileError, match="architecture"):
        load_bytes(tmp_path, join({**bare, "__metadata__": meta}, body))
    arch = json.loads(header["__metadata__"]["architecture"])
    arch["layers"][0] = {"class_name": "os.system", "config": {"command": "touch /tmp/pwned"}}
    meta = {**header["__metadata__"], "architecture": json.dumps(arch)}
    with pytest.raises(io.ModelFileError, match=r"unknown layer class 'os\.system'"):
        load_bytes(tmp_path, join({**bare, "__metadata__": meta}, body))
    meta = {**header["__metadata__"], "classes": json.dumps(["only", "two"])}
    with pytest.raises(io.ModelFileError, match="'classes' must list 10 names"):
        load_bytes(tmp_path, join({**bare, "__metadata__": meta}, body))


def test_architecture_bigger_than_its_weights_is_refused_before_allocating(tmp_path, good_bytes):
    header, body = split(good_bytes)
    arch = json.loads(header["__metadata__"]["architecture"])
    dense = next(s for s in arch["layers"] if s["class_name"] == "Dense")
    dense["config"]["units"] = 10**9  # would need gigabytes if built
    meta = {**header["__metadata__"], "architecture": json.dumps(arch)}
    with pytest.raises(io.ModelFileError, match="should have shape"):
        load_bytes(tmp_path, join({**header, "__metadata__": meta}, body))


def test_weights_of_the_wrong_shape(tmp_path):
    model = trained_like()
    sd = model.state_dict()
    sd["dense_1.kernel"] = np.zeros((400, 7), np.float32)
    meta = {
        "format": "classic-cnn",
        "format_version": "1",
        "architecture": json.dumps(model.get_config()),
    }
    with pytest.raises(io.ModelFileError, match=r"dense_1.kernel.*\(400, 120\).*\(400, 7\)"):
        load_bytes(tmp_path, st_save(sd, metadata=meta))


def test_a_checkpoint_is_not_a_model_and_back(tmp_path):
    from classic_cnn.train import fit, save_state

    from .test_train import bars, quiet, small_model

    state = fit(small_model(), bars(64), epochs=1, console=quiet())
    ckpt = save_state(state, tmp_path / "c.safetensors")
    with pytest.raises(io.ModelFileError, match="not a classic-cnn model"):
        cc.load(ckpt)
    model = io.save(state.model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a classic-cnn training-state file"):
        load_state(model)
    (tmp_path / "junk").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a training-state file"):
        load_state(tmp_path / "junk")


def test_a_version_1_model_file_still_loads():
    """A sample written by format version 1, committed: later versions must keep reading it."""
    model = cc.load(SAMPLE_V1)
    assert model.metadata["format_version"] == "1"
    assert model.classes[0] == "T-shirt/top" and model.input_shape == (28, 28, 1)
    expected = np.load(SAMPLE_V1.with_suffix(".expected.npz"))
    np.testing.assert_allclose(
        model.predict_proba(expected["images"]), expected["probs"], rtol=1e-5, atol=1e-7
    )


def test_nothing_in_the_project_unpickles():
    pattern = re.compile(
        r"\bimport pickle\b|\bpickle\.loads?\b|allow_pickle\s*=\s*True|\btorch\.load\b"
        r"|cloudpickle|\bdill\b|joblib\.load"
    )
    offenders = []
    for folder in ("src", "scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_never_crash_the_loader(tmp_path, data):
    with pytest.raises(io.ModelFileError):
        load_bytes(tmp_path, data)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzz_mutated_model_files(tmp_path, good_bytes, data):
    """Flip, cut or overwrite bytes of a good file (header included): either it still loads or
    it raises ModelFileError; nothing else escapes."""
    raw = bytearray(good_bytes)
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, min(header_end + 64, len(raw) - 1)))
        raw[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        model = load_bytes(tmp_path, bytes(raw))
    except io.ModelFileError:
        return
    assert model.forward(np.zeros((1, *model.input_shape), model.dtype)).shape[0] == 1


LAYER_NAMES = ["Conv2D", "Dense", "ReLU", "MaxPool2D", "Flatten", "Dropout", "BatchNorm", "Nope"]


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(LAYER_NAMES)},
            optional={
                "filters": st.one_of(st.integers(-2, 8), st.text(max_size=3)),
                "kernel_size": st.one_of(
                    st.integers(-1, 6), st.lists(st.integers(0, 4), max_size=3)
                ),
                "units": st.integers(-1, 20),
                "rate": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
                "pool_size": st.integers(0, 4),
                "padding": st.sampled_from(["same", "valid", "full", -1, 2]),
                "bogus": st.integers(),
            },
        ),
        max_size=6,
    ),
    st.lists(st.integers(0, 12), max_size=4),
)
def test_fuzz_architecture_files(tmp_path, layers, input_shape):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"input_shape": input_shape, "layers": layers}))
    try:
        model = presets.build(str(path))
    except ValueError:  # ArchitectureError is one
        return
    assert model.output_shape


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.text(max_size=300))
def test_fuzz_architecture_text(tmp_path, text):
    for suffix in (".json", ".toml"):
        path = tmp_path / f"arch{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            presets.build(str(path))
        except ValueError:
            pass
