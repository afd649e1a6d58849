"""Golden values from PyTorch for classic-cnn's ops, losses and optimizers.

Run it with ``make fixtures`` (which calls ``.venv/bin/python scripts/make_torch_fixtures.py``
after installing the ``bench`` extra, where torch lives), or directly with a Python that has
torch. It writes ONE file, ``tests/fixtures/torch_golden.npz``, which is committed: the test
suite (``tests/test_torch_golden.py``) only reads it, so the tests never import torch.
Re-run it only when a case is added or changed, and commit the new file with the script.

Everything is computed in float64 from inputs drawn by one seeded ``np.random.Generator``.
Arrays are stored in the project's layout: activations N×H×W×C, convolution kernels
KH×KW×C_in×C_out, dense weights in×out. PyTorch's NCHW / OIHW / out×in layouts appear only
inside this script, where the arrays cross the boundary.

Keys are ``group.case.name``; the groups are ``conv2d``, ``maxpool2d``, ``avgpool2d``,
``dense``, ``batchnorm``, ``loss`` and ``optim``. Settings a case needs (stride, padding spec,
pool size, loss options, optimizer class and config) are stored beside its arrays, as 0-d or
small int arrays and strings, so the file loads with ``allow_pickle=False``. The file is
written with fixed zip timestamps, so running the script twice gives the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEED = 20240611
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch_golden.npz"

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # the same summation order on every run, hence the same bytes

rng = np.random.default_rng(SEED)


# --------------------------------------------------------------------------------------------
# Layout at the boundary
# --------------------------------------------------------------------------------------------


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    """A float64 tensor from a NumPy array (a copy, so torch never writes into our inputs)."""
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def nhwc_to_nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


def nchw_to_nhwc(a: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(a.detach().numpy().transpose(0, 2, 3, 1))


def hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def oihw_to_hwio(w: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(w.detach().numpy().transpose(2, 3, 1, 0))


def arr(a: torch.Tensor) -> np.ndarray:
    return a.detach().numpy().copy()  # keeps a 0-d loss 0-d


def keras_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras's 'same' along one axis, written out from DESIGN.md (not imported from the code
    under test): the output has ceil(size / stride) positions, the total padding is what that
    needs, and an odd extra row/column goes at the end (bottom/right)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------

# (case, x shape N×H×W×C_in, kernel KH×KW, C_out, stride, padding spec, bias)
CONV_CASES = [
    ("s1_valid_3x3_cin3", (2, 6, 7, 3), (3, 3), 4, 1, "valid", True),
    ("s2_pad1_3x3_cin4", (2, 7, 6, 4), (3, 3), 2, 2, 1, True),
    # H=11: the last input row falls in no window, so its gradient must be exactly zero.
    ("s3_valid_even4x3_cin2", (2, 11, 9, 2), (4, 3), 3, 3, "valid", True),
    ("s3_pad2_even2x2_cin6", (1, 8, 8, 6), (2, 2), 5, 3, 2, True),
    ("s1_same_5x5_cin5", (1, 6, 6, 5), (5, 5), 3, 1, "same", True),
    ("s1_same_even2x2_cin1", (2, 5, 6, 1), (2, 2), 3, 1, "same", True),
    ("s2_same_3x3_cin3", (2, 7, 8, 3), (3, 3), 2, 2, "same", True),
    ("s2_same_even4x4_cin4", (2, 6, 7, 4), (4, 4), 2, 2, "same", True),
    ("s2_valid_3x3_nobias", (2, 7, 7, 4), (3, 3), 3, 2, "valid", False),
]


def conv_case(x_shape, kernel, cout, stride, padding, bias) -> dict:
    _, h, width, cin = x_shape
    kh, kw = kernel
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((kh, kw, cin, cout)) / math.sqrt(kh * kw * cin)
    b = rng.standard_normal(cout) if bias else None

    if padding == "same":
        pads = (keras_same_pads(h, kh, stride), keras_same_pads(width, kw, stride))
    elif padding == "valid":
        pads = ((0, 0), (0, 0))
    else:
        pads = ((padding, padding), (padding, padding))
    (pt, pb), (pl, pr) = pads

    xt, wt = t(nhwc_to_nchw(x), True), t(hwio_to_oihw(w), True)
    bt = t(b, True) if bias else None
    if padding == "same":
        # PyTorch has no Keras 'same' for stride > 1: pad explicitly, then a valid convolution.
        yt = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, bt, stride=stride)
        assert yt.shape[2:] == (math.ceil(h / stride), math.ceil(width / stride))
        if stride == 1:  # where PyTorch's own 'same' exists, the explicit pads agree with it
            with warnings.catch_warnings():  # even kernels: torch warns it pads a copy, fine
                warnings.simplefilter("ignore", UserWarning)
                native = F.conv2d(xt, wt, bt, stride=1, padding="same")
            assert torch.allclose(native, yt, rtol=0, atol=1e-12)
    else:
        yt = F.conv2d(xt, wt, bt, stride=stride, padding=pt)
    dy = rng.standard_normal(nchw_to_nhwc(yt).shape)
    yt.backward(t(nhwc_to_nchw(dy)))

    case = {
        "x": x,
        "w": w,
        "dy": dy,
        "y": nchw_to_nhwc(yt),
        "dx": nchw_to_nhwc(xt.grad),
        "dw": oihw_to_hwio(wt.grad),
        "stride": np.array(stride),
        "padding": np.array(str(padding)),  # 'valid', 'same' or the int as text
        "pads": np.array(pads),  # the explicit ((top, bottom), (left, right)) used
    }
    if bias:
        case |= {"b": b, "db": arr(bt.grad)}
    return case


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------

# (case, kind, x shape, pool size, stride)
POOL_CASES = [
    ("max_2x2_s2", "max", (2, 6, 7, 3), (2, 2), 2),
    ("max_3x3_s1", "max", (2, 5, 6, 2), (3, 3), 1),
    ("max_3x3_s2", "max", (2, 7, 8, 3), (3, 3), 2),
    ("max_2x3_s2", "max", (1, 6, 7, 2), (2, 3), 2),
    ("avg_2x2_s2", "avg", (2, 6, 7, 3), (2, 2), 2),
    ("avg_3x3_s2", "avg", (2, 7, 8, 3), (3, 3), 2),
]


def distinct_values(shape) -> np.ndarray:
    """Values at least 0.05 apart (also in float32), so no max-pool window has a tie."""
    size = math.prod(shape)
    v = (rng.permutation(size) + rng.uniform(0.0, 0.5, size)) * 0.1 - 0.05 * size
    return v.reshape(shape)


def pool_case(kind, x_shape, pool, stride) -> dict:
    x = distinct_values(x_shape) if kind == "max" else rng.standard_normal(x_shape)
    xt = t(nhwc_to_nchw(x), True)
    fn = F.max_pool2d if kind == "max" else F.avg_pool2d
    yt = fn(xt, kernel_size=pool, stride=stride)
    dy = rng.standard_normal(nchw_to_nhwc(yt).shape)
    yt.backward(t(nhwc_to_nchw(dy)))
    return {
        "x": x,
        "dy": dy,
        "y": nchw_to_nhwc(yt),
        "dx": nchw_to_nhwc(xt.grad),
        "pool_size": np.array(pool),
        "stride": np.array(stride),
    }


# --------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------

DENSE_CASES = [("in7_out5", 4, 7, 5, True), ("in6_out3_nobias", 3, 6, 3, False)]


def dense_case(n, fan_in, units, bias) -> dict:
    x = rng.standard_normal((n, fan_in))
    w = rng.standard_normal((fan_in, units)) / math.sqrt(fan_in)  # in×out, the project's layout
    b = rng.standard_normal(units) if bias else None
    xt, wt = t(x, True), t(w, True)
    bt = t(b, True) if bias else None
    yt = F.linear(xt, wt.T, bt)  # torch.nn.Linear keeps out×in: transpose at the boundary
    dy = rng.standard_normal(tuple(yt.shape))
    yt.backward(t(dy))
    case = {"x": x, "w": w, "dy": dy, "y": arr(yt), "dx": arr(xt.grad), "dw": arr(wt.grad)}
    if bias:
        case |= {"b": b, "db": arr(bt.grad)}
    return case


# --------------------------------------------------------------------------------------------
# Batch normalisation
# --------------------------------------------------------------------------------------------

MOMENTUM, EPS = 0.1, 1e-5

# (case, x shape, training)
BN_CASES = [
    ("conv_train", (3, 4, 5, 3), True),
    ("dense_train", (6, 4), True),
    ("conv_eval", (2, 3, 4, 3), False),
    ("dense_eval", (5, 4), False),
]


def batchnorm_case(x_shape, training) -> dict:
    c = x_shape[-1]
    conv = len(x_shape) == 4
    x = 2.0 + 3.0 * rng.standard_normal(x_shape)
    gamma = 1.0 + 0.3 * rng.standard_normal(c)
    beta = rng.standard_normal(c)
    if training:  # a fresh layer: running statistics start at 0 / 1
        mean_in, var_in = np.zeros(c), np.ones(c)
    else:  # given statistics, as after training
        mean_in, var_in = 2.0 + rng.standard_normal(c), rng.uniform(4.0, 12.0, c)
    xt = t(nhwc_to_nchw(x) if conv else x, True)
    gt, bt = t(gamma, True), t(beta, True)
    rm, rv = t(mean_in), t(var_in)
    # PyTorch's BatchNorm: biased batch variance to normalise, unbiased one for running_var.
    yt = F.batch_norm(xt, rm, rv, gt, bt, training=training, momentum=MOMENTUM, eps=EPS)
    y = nchw_to_nhwc(yt) if conv else arr(yt)
    dy = rng.standard_normal(y.shape)
    yt.backward(t(nhwc_to_nchw(dy) if conv else dy))
    return {
        "x": x,
        "gamma": gamma,
        "beta": beta,
        "running_mean_in": mean_in,
        "running_var_in": var_in,
        "dy": dy,
        "y": y,
        "dx": nchw_to_nhwc(xt.grad) if conv else arr(xt.grad),
        "dgamma": arr(gt.grad),
        "dbeta": arr(bt.grad),
        "running_mean_out": arr(rm),
        "running_var_out": arr(rv),
        "training": np.array(training),
        "momentum": np.array(MOMENTUM),
        "eps": np.array(EPS),
    }


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def huge_logits(n: int, k: int) -> np.ndarray:
    """Logits of ±1e4 magnitude, exactly representable in float32 (multiples of 0.25 near 1e4),
    with some rows holding two close winners so that the gradient is not just 0 and ±1."""
    z = rng.choice([-1e4, 1e4], size=(n, k)) + 0.25 * rng.integers(-8, 9, size=(n, k))
    z[0, :2] = [1e4, 1e4 - 0.75]
    z[1, 1:3] = [1e4 + 0.5, 1e4]
    z[2] = -1e4 + 0.25 * np.arange(k)  # every logit hugely negative
    return z


def loss_case(kind, logits, labels=None, targets=None, label_smoothing=0.0) -> dict:
    """``kind`` 'ce' (torch.nn.CrossEntropyLoss) or 'mse' (torch.nn.MSELoss on softmax
    probabilities against one-hot rows, the article's loss); targets are integer labels or
    probability rows."""
    zt = t(logits, True)
    if kind == "ce":
        tgt = torch.tensor(labels) if labels is not None else t(targets)
        loss = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(zt, tgt)
    else:
        onehot = F.one_hot(torch.tensor(labels), logits.shape[1]).to(torch.float64)
        loss = torch.nn.MSELoss()(torch.softmax(zt, dim=1), onehot)
    loss.backward()
    case = {
        "kind": np.array(kind),
        "logits": logits,
        "label_smoothing": np.array(label_smoothing),
        "loss": arr(loss),
        "dlogits": arr(zt.grad),
    }
    if labels is not None:
        case["labels"] = labels
    else:
        case["targets"] = targets
    return case


def loss_cases() -> dict[str, dict]:
    n, k = 6, 5

    def labels() -> np.ndarray:
        return rng.integers(0, k, size=n).astype(np.int64)

    soft = rng.uniform(0.0, 1.0, (n, k))
    soft /= soft.sum(axis=1, keepdims=True)
    return {
        "ce_labels": loss_case("ce", 2.0 * rng.standard_normal((n, k)), labels()),
        "ce_labels_huge": loss_case("ce", huge_logits(n, k), labels()),
        "ce_soft_targets": loss_case("ce", 2.0 * rng.standard_normal((n, k)), targets=soft),
        "ce_label_smoothing": loss_case(
            "ce", 2.0 * rng.standard_normal((n, k)), labels(), label_smoothing=0.1
        ),
        "mse_labels": loss_case("mse", 2.0 * rng.standard_normal((n, k)), labels()),
        "mse_labels_huge": loss_case("mse", huge_logits(n, k), labels()),
    }


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------

STEPS = 3

# (case, classic_cnn class, classic_cnn config, torch class, torch kwargs)
OPTIM_CASES = [
    ("sgd_plain", "SGD", {"lr": 0.1}, torch.optim.SGD, {"lr": 0.1}),
    (
        "sgd_momentum",
        "SGD",
        {"lr": 0.1, "momentum": 0.9},
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9},
    ),
    (
        "sgd_nesterov_wd",
        "SGD",
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    ("adam", "Adam", {"lr": 0.05}, torch.optim.Adam, {"lr": 0.05}),
    (
        "adam_l2",
        "Adam",
        {"lr": 0.05, "weight_decay": 0.1},
        torch.optim.Adam,
        {"lr": 0.05, "weight_decay": 0.1},
    ),
    (
        "adamw",
        "AdamW",
        {"lr": 0.05, "weight_decay": 0.1},
        torch.optim.AdamW,
        {"lr": 0.05, "weight_decay": 0.1},
    ),
]

PARAM_SHAPES = {"conv.kernel": (2, 2, 1, 3), "conv.bias": (3,)}


def optim_case(cls_name, config, torch_cls, torch_kwargs) -> dict:
    names = list(PARAM_SHAPES)
    p0 = {name: rng.standard_normal(shape) for name, shape in PARAM_SHAPES.items()}
    grads = [
        {name: rng.standard_normal(shape) for name, shape in PARAM_SHAPES.items()}
        for _ in range(STEPS)
    ]
    tp = {name: t(p0[name], True) for name in names}
    opt = torch_cls([tp[name] for name in names], **torch_kwargs)
    case = {
        "class": np.array(cls_name),
        "config": np.array(json.dumps(config, sort_keys=True)),
        "steps": np.array(STEPS),
        "names": np.array(names),
    }
    for name in names:
        case[f"param0.{name}"] = p0[name]
    for step, g in enumerate(grads, start=1):
        for name in names:
            tp[name].grad = t(g[name])
        opt.step()
        for name in names:
            case[f"grad{step}.{name}"] = g[name]
            case[f"param{step}.{name}"] = arr(tp[name])
    return case


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed``, but with a fixed timestamp on every member, so that the
    same arrays give the same bytes (a re-run leaves git clean)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    tmp.replace(path)


def main() -> None:
    groups: dict[str, dict[str, dict]] = {
        "conv2d": {name: conv_case(*spec) for name, *spec in CONV_CASES},
        "maxpool2d": {},
        "avgpool2d": {},
        "dense": {name: dense_case(*spec) for name, *spec in DENSE_CASES},
        "batchnorm": {name: batchnorm_case(*spec) for name, *spec in BN_CASES},
        "loss": loss_cases(),
        "optim": {name: optim_case(*spec) for name, *spec in OPTIM_CASES},
    }
    for name, kind, *spec in POOL_CASES:
        groups[f"{kind}pool2d"][name] = pool_case(kind, *spec)

    arrays = {"meta.torch_version": np.array(torch.__version__), "meta.seed": np.array(SEED)}
    for group, cases in groups.items():
        for case, fields in cases.items():
            for field, value in fields.items():
                value = np.asarray(value)
                assert value.dtype != object, (group, case, field)
                if value.dtype.kind == "f":
                    assert value.dtype == np.float64 and np.isfinite(value).all(), (case, field)
                arrays[f"{group}.{case}.{field}"] = value
    write_npz(OUT, arrays)
    n_cases = sum(len(c) for c in groups.values())
    size = OUT.stat().st_size
    print(f"wrote {OUT} ({n_cases} cases, {len(arrays)} arrays, {size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
