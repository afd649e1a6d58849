"""Losses: how wrong the network's scores are, and the gradient that starts backpropagation.

Both losses take the model's raw scores (logits, N×K) and the targets: integer class labels
(N,) or one-hot / probability rows (N×K). ``forward`` returns the loss as a float;
``backward`` returns dL/dlogits (N×K) for the last forward call.
"""

from __future__ import annotations

import numbers

import numpy as np

from .ops import log_softmax, softmax


def _targets(targets, logits: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
    """Targets as probability rows (N×K) in the logits' dtype, checked against the logits."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, classes). Received: shape {logits.shape}")
    n, k = logits.shape
    t = np.asarray(targets)
    if t.ndim == 1:
        if t.shape[0] != n:
            raise ValueError(
                f"expected {n} labels for {n} rows of logits. Received: {t.shape[0]} labels"
            )
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"labels must be integers. Received: dtype {t.dtype}")
        if n and (t.min() < 0 or t.max() >= k):
            raise ValueError(
                f"labels must be in [0, {k - 1}] for {k} classes. "
                f"Received: labels from {t.min()} to {t.max()}"
            )
        onehot = np.zeros((n, k), dtype=logits.dtype)
        onehot[np.arange(n), t] = 1
        t = onehot
    elif t.shape != logits.shape:
        raise ValueError(
            f"targets must be labels (N,) or rows (N, K) matching logits {logits.shape}. "
            f"Received: shape {t.shape}"
        )
    else:
        t = t.astype(logits.dtype, copy=False)
    if label_smoothing:
        t = t * (1 - label_smoothing) + label_smoothing / k
    return t


class Loss:
    """Base: ``forward(logits, targets) -> float``; ``backward() -> dL/dlogits``."""

    #: a loss that applies softmax itself refuses a model that already ends in one
    applies_softmax = True

    def __call__(self, logits, targets) -> float:
        return self.forward(logits, targets)

    def forward(self, logits, targets) -> float:
        raise NotImplementedError

    def backward(self) -> np.ndarray:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy, fused: ``L = −mean_n Σ_k t_nk · log softmax(z_n)_k``.

    Computed through log-softmax with the maximum subtracted, so logits of ±1e4 give a finite
    loss and gradient. The gradient is ``(softmax(z) − t) / N``. ``label_smoothing`` ε mixes
    the targets with the uniform distribution: ``t ← (1 − ε)·t + ε/K``.
    """

    def __init__(self, label_smoothing: float = 0.0):
        if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing must be in [0, 1). Received: label_smoothing={label_smoothing!r}"
            )
        self.label_smoothing = float(label_smoothing)
        self._cache = None

    def forward(self, logits, targets) -> float:
        t = _targets(targets, logits, self.label_smoothing)
        logp = log_softmax(logits)
        self._cache = (np.exp(logp), t)
        return float(-(t * logp).sum() / logits.shape[0])

    def backward(self) -> np.ndarray:
        p, t = self._cache
        return (p - t) / p.dtype.type(p.shape[0])

    def get_config(self):
        return {"label_smoothing": self.label_smoothing}


class MSELoss(Loss):
    """The article's loss: softmax probabilities against one-hot targets, squared error.

    ``L = mean over all N·K elements of (p − t)²`` with ``p = softmax(z)`` (the mean over every
    element, as PyTorch's ``MSELoss`` reduces). The gradient goes back through the softmax:
    ``dL/dp = 2(p − t) / (N·K)``, ``dL/dz = p ⊙ (dL/dp − Σ_k dL/dp_k · p_k)``.
    """

    def __init__(self):
        self._cache = None

    def forward(self, logits, targets) -> float:
        t = _targets(targets, logits)
        p = softmax(logits)
        self._cache = (p, t)
        d = p - t
        return float((d * d).mean())

    def backward(self) -> np.ndarray:
        p, t = self._cache
        dp = 2 * (p - t) / p.dtype.type(p.size)
        return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


LOSSES = {"cross-entropy": CrossEntropyLoss, "mse": MSELoss}


def get_loss(name_or_loss) -> Loss:
    """A loss by name ('cross-entropy' or 'mse'), or the given Loss unchanged."""
    if isinstance(name_or_loss, Loss):
        return name_or_loss
    if name_or_loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}. Received: {name_or_loss!r}")
    return LOSSES[name_or_loss]()
