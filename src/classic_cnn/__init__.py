"""classic-cnn: a classic convolutional neural network from first principles on NumPy."""

from .attribution import attribute, gradcam, gradient_x_input, occlusion, saliency
from .io import load, save
from .layers import (
    ELU,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Softmax,
    Tanh,
)
from .losses import CrossEntropyLoss, MSELoss
from .metrics import evaluate
from .model import Sequential, gradient_check
from .optim import SGD, Adam, AdamW, CosineDecay, OneCycle, StepDecay
from .train import fit

__version__ = "0.1.0"


def __getattr__(name: str):
    # ONNX export and import load lazily: `import classic_cnn` never imports onnx (an optional
    # extra)
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name == "import_onnx":
        from .onnx_import import import_onnx

        return import_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ELU",
    "SGD",
    "Adam",
    "AdamW",
    "AvgPool2D",
    "BatchNorm",
    "Conv2D",
    "CosineDecay",
    "CrossEntropyLoss",
    "Dense",
    "Dropout",
    "Flatten",
    "LeakyReLU",
    "MSELoss",
    "MaxPool2D",
    "OneCycle",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "StepDecay",
    "Tanh",
    "__version__",
    "attribute",
    "evaluate",
    "export_onnx",
    "fit",
    "gradcam",
    "gradient_check",
    "gradient_x_input",
    "import_onnx",
    "load",
    "occlusion",
    "saliency",
    "save",
]
