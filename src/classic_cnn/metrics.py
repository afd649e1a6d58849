"""Testing a model on images it never saw: accuracy, per-class precision/recall/F1, confusion."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``C[t, p]``: how many images of true class t were predicted as p."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of every class (0 where undefined, e.g. never predicted)."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def evaluate(model, data, batch_size: int | None = None, loss=None, flip: bool = False) -> dict:
    """Loss, accuracy, confusion matrix and per-class scores of ``model`` on ``data``.

    ``data`` is a :class:`~classic_cnn.data.Dataset` or an ``(images, labels)`` pair; uint8
    images go through the model's preprocessing. ``flip=True`` is test-time flip averaging:
    each image's class probabilities are averaged with those of its mirror image (left-right),
    and the loss is the cross-entropy of the averaged probabilities.
    """
    from .losses import CrossEntropyLoss
    from .model import INFERENCE_BATCH

    batch_size = batch_size or getattr(model, "inference_batch", INFERENCE_BATCH)
    x, y = (data.images, data.labels) if hasattr(data, "images") else data
    y = np.asarray(y)
    loss = loss or CrossEntropyLoss()
    total, preds = 0.0, []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        if flip or model.ends_in_softmax:
            probs = model.predict_proba(xb)
            if flip:
                probs = (probs + model.predict_proba(xb[:, :, ::-1])) / 2
            total -= float(np.log(np.maximum(probs[np.arange(len(yb)), yb], 1e-12)).sum())
            preds.append(probs.argmax(axis=1))
        else:
            logits = model.predict_logits(xb, batch_size)
            total += loss.forward(logits, yb) * len(logits)
            preds.append(logits.argmax(axis=1))
    predicted = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    n_classes = model.output_shape[-1]
    cm = confusion_matrix(y, predicted, n_classes)
    scores = per_class_scores(cm)
    return {
        "n": len(y),
        "loss": total / max(len(y), 1),
        "accuracy": float((predicted == y).mean()) if len(y) else float("nan"),
        "confusion": cm,
        "predicted": predicted,
        **scores,
    }
