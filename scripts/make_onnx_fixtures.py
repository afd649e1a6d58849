"""Foreign models for the ONNX importer: classic CNNs built in PyTorch, exported by PyTorch.

Run it with ``make onnx-fixtures`` (which installs the ``bench`` extra, where torch lives, and
``onnxscript``, which ``torch.onnx.export`` needs) or with any Python that has torch, onnx and
onnxscript. It writes, under ``tests/fixtures/onnx/``:

- ``lenet5.onnx``: LeNet-5 (5×5 convolutions, ReLU, max pooling, dense 120-84-10), *trained*
  two epochs on 20,000 Fashion-MNIST images by PyTorch, with the class names, the
  normalisation and the dataset's name in the file's metadata (as a careful exporter would put
  them; the keys are those ``cnn export`` writes);
- ``vgg_bn.onnx``: a small VGG with batch norm after every convolution and a BatchNorm1d after
  the flatten, running statistics set to random values (not the defaults 0 and 1), dropout;
  no metadata (the importer must number the classes);
- ``article.onnx``: the article's network (32×32×3 input, 5×5×3 kernels, ReLU, max pooling, a
  dense layer to 10 classes) ending in ``nn.Softmax``;
- ``misc.onnx``: the other operators: a strided convolution, LeakyReLU, ELU, Tanh, Sigmoid,
  average pooling, global average pooling;
- ``torch_outputs.npz``: for each model, a batch of inputs (channels-last, N×H×W×C, as this
  engine takes them; the LeNet's are real test images, normalised) and PyTorch's own
  ``softmax`` of the model's output on them (the article network's output is already one).

The test suite (``tests/test_onnx_import.py``) only reads these files, so it never imports
torch. Re-run the script only when a model changes, and commit its outputs with it.
"""

from __future__ import annotations

import io
import json
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "onnx"
SEED = 20251203
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training images, the usual torchvision Normalize

torch.manual_seed(SEED)
torch.set_num_threads(2)


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def vgg_bn() -> nn.Module:
    """Batch norm after each convolution (the exporter folds those into the convolution's
    weights) and, in the middle block, after the ReLU (which no exporter can fold: a
    BatchNormalization node the importer must read)."""

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.MaxPool2d(2),
        *block(8, 16),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.BatchNorm1d(16 * 7 * 7),  # per-feature statistics in PyTorch's C·H·W order
        nn.Dropout(0.3),
        nn.Linear(16 * 7 * 7, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def article() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
        nn.Softmax(dim=1),
    )


def misc() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ELU(0.5),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 12, 3),
        nn.Tanh(),
        nn.Conv2d(12, 12, 1),
        nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 6),
    )


def randomise_batch_norm(model: nn.Module) -> None:
    """Random running statistics, scales and shifts: the defaults (0, 1, 1, 0) would hide a
    statistic swapped or a permutation forgotten."""
    g = torch.Generator().manual_seed(SEED)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)


def fashion(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n images (uint8 N×28×28) and labels of Fashion-MNIST, read with the project's
    own IDX reader from wherever it finds the dataset."""
    sys.path.insert(0, str(ROOT / "src"))
    from classic_cnn.data import load_dataset

    ds = load_dataset("fashion-mnist", split)
    return ds.images[:n, :, :, 0], ds.labels[:n]


def train_lenet(model: nn.Module) -> float:
    """Two epochs of Adam on 20,000 training images; returns the accuracy on 2,000 test images."""
    images, labels = fashion("train", 20_000)
    x = (torch.tensor(images, dtype=torch.float32)[:, None] / 255 - MEAN) / STD
    y = torch.tensor(labels, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(2):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    t_images, t_labels = fashion("test", 2000)
    tx = (torch.tensor(t_images, dtype=torch.float32)[:, None] / 255 - MEAN) / STD
    with torch.no_grad():
        return float((model(tx).argmax(1).numpy() == t_labels).mean())


def export(model: nn.Module, example: torch.Tensor, path: Path, metadata=None) -> None:
    """``torch.onnx.export`` (the dynamo exporter, batch size free), then the metadata."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    proto.producer_name = "pytorch"
    proto.producer_version = torch.__version__
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(SEED)

    net = lenet5()
    accuracy = train_lenet(net)
    print(f"lenet5 trained by PyTorch: {100 * accuracy:.1f}% on 2,000 test images")
    meta = {
        "classes": json.dumps(CLASSES),
        "preprocessing": json.dumps(
            {"size": [28, 28], "channels": 1, "mean": [MEAN], "std": [STD], "background": "dark"}
        ),
        "dataset": json.dumps({"name": "fashion-mnist"}),
    }
    t_images, _ = fashion("test", 16)
    lenet_x = ((t_images.astype(np.float32) / 255 - MEAN) / STD)[..., None]
    cases = {
        "lenet5": (net, lenet_x, meta),
        "vgg_bn": (vgg_bn(), rng.standard_normal((8, 28, 28, 1)).astype(np.float32), None),
        "article": (article(), rng.standard_normal((8, 32, 32, 3)).astype(np.float32), None),
        "misc": (misc(), rng.standard_normal((8, 19, 23, 3)).astype(np.float32), None),
    }
    for name, (model, x, metadata) in cases.items():
        if name == "vgg_bn":
            randomise_batch_norm(model)
        model.eval()
        xt = torch.tensor(x.transpose(0, 3, 1, 2).copy())  # PyTorch's N×C×H×W
        with torch.no_grad():
            out = model(xt)
        probs = out if name == "article" else torch.softmax(out, dim=1)
        export(model, xt[:2], OUT / f"{name}.onnx", metadata)
        arrays[f"{name}.x"] = x
        arrays[f"{name}.probs"] = probs.numpy().astype(np.float32)
        size = (OUT / f"{name}.onnx").stat().st_size
        print(f"{name}: {size:,} bytes, outputs {tuple(out.shape)}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # fixed timestamps: the same bytes on every run
        for key in sorted(arrays):
            one = io.BytesIO()
            np.save(one, arrays[key], allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, one.getvalue())
    (OUT / "torch_outputs.npz").write_bytes(buf.getvalue())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
