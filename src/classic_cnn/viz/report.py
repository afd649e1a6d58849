"""One self-contained HTML report per training run: every picture embedded as a PNG data URI,
no scripts, no external files, so it opens offline and can be mailed as one file.

A report is a list of sections between markers (``<!-- section:ID -->`` …
``<!-- /section:ID -->``); :func:`replace_section` puts a new or updated section in place, which
is how ``cnn test`` adds the test split's results to the report that ``cnn train`` wrote.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import numpy as np

END = "<!-- sections-end -->"

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML

    def html(self) -> str:
        return (
            f'<!-- section:{self.id} -->\n<section id="{html.escape(self.id)}">'
            f"<h2>{html.escape(self.title)}</h2>\n{self.body}\n</section>\n"
            f"<!-- /section:{self.id} -->\n"
        )


def png_figure(png: bytes, alt: str, caption: str = "") -> str:
    """An ``<img>`` with the PNG embedded as a data URI, and its caption."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">{cap}</figure>'
    )


def table(rows, head=None) -> str:
    """A plain HTML table; numbers are right-aligned."""

    def cell(v, tag="td"):
        cls = ' class="num"' if isinstance(v, (int, float, np.integer, np.floating)) else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(cell(h, "th") for h in head) + "</tr>")
    out += ["<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows]
    out.append("</table>")
    return "\n".join(out)


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def render(title: str, sections: list[Section]) -> str:
    """The whole report as one HTML document."""
    body = "".join(s.html() for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}{END}\n</body>\n</html>\n"
    )


def replace_section(document: str, section: Section) -> str:
    """The document with ``section`` in place of the one with the same id, or added at the end."""
    start, stop = f"<!-- section:{section.id} -->", f"<!-- /section:{section.id} -->"
    i = document.find(start)
    if i >= 0:
        j = document.find(stop, i)
        if j >= 0:
            j += len(stop) + 1
            return document[:i] + section.html() + document[j:]
    k = document.find(END)
    if k < 0:
        raise ValueError("not a classic-cnn report (no sections-end marker)")
    return document[:k] + section.html() + document[k:]


# --------------------------------------------------------------------------------------------
# The sections of a training run's report
# --------------------------------------------------------------------------------------------


def summary_section(model, info: dict) -> Section:
    """The run's facts (a dict of label → value) and the model's layers."""
    rows = [(k, v) for k, v in info.items()]
    layers = [
        (r["name"], r["type"], "×".join(map(str, r["output_shape"])), r["params"], r["macs"])
        for r in model.summary_rows()
    ]
    body = table(rows) + table(layers, ("layer", "type", "output shape", "parameters", "MACs"))
    return Section("summary", "Summary", body)


def curves_section(history: list[dict]) -> Section:
    from .plots import plot_curves, to_png

    png = to_png(plot_curves(history))
    rows = [
        (
            r["epoch"],
            f"{r['train_loss']:.4f}",
            f"{100 * r['train_accuracy']:.2f}%",
            f"{r['val_loss']:.4f}",
            f"{100 * r['val_accuracy']:.2f}%",
        )
        for r in history
    ]
    body = png_figure(
        png,
        "training curves",
        "Loss and accuracy after each epoch on the training images and on the held-out "
        "validation images. Validation well below training means memorising.",
    ) + table(rows, ("epoch", "train loss", "train acc", "val loss", "val acc"))
    return Section("curves", "Training curves", body)


def results_section(
    section_id: str,
    title: str,
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    k: int = 16,
) -> Section:
    """Accuracy, the confusion matrix and the most confidently misclassified images of one
    split."""
    from ..metrics import confusion_matrix, per_class_scores
    from .arrays import most_confident_mistakes
    from .plots import plot_confusion, plot_misclassified, to_png

    predicted = probs.argmax(axis=1)
    cm = confusion_matrix(np.asarray(labels), predicted, len(classes))
    scores = per_class_scores(cm)
    accuracy = float((predicted == labels).mean())
    wrong = most_confident_mistakes(probs, labels, k)
    body = paragraph(f"Accuracy {100 * accuracy:.2f}% on {len(labels):,} images.")
    body += png_figure(
        to_png(plot_confusion(cm, classes, f"{title}: confusion matrix")),
        "confusion matrix",
        "Rows: the true class; columns: what the network said. The diagonal is right.",
    )
    body += table(
        [
            (
                c,
                f"{scores['precision'][i]:.3f}",
                f"{scores['recall'][i]:.3f}",
                f"{scores['f1'][i]:.3f}",
                int(scores["support"][i]),
            )
            for i, c in enumerate(classes)
        ],
        ("class", "precision", "recall", "F1", "images"),
    )
    body += png_figure(
        to_png(
            plot_misclassified(
                images[wrong],
                labels[wrong],
                predicted[wrong],
                probs[wrong, predicted[wrong]],
                classes,
                f"{title}: the {len(wrong)} most confidently misclassified",
            )
        ),
        "misclassified images",
        "Wrong answers the network was surest of: true label, prediction, its probability.",
    )
    return Section(section_id, title, body)


def filters_section(model) -> Section:
    from ..explain import conv_layer_names
    from .arrays import filter_grid
    from .plots import plot_filters, to_png

    body = ""
    for name in conv_layer_names(model):
        layer = next(lyr for lyr in model.layers if lyr.name == name)
        grid = filter_grid(layer.params["kernel"])
        body += png_figure(
            to_png(plot_filters(grid, f"{name}: {grid.tiles.shape[0]} kernels")),
            f"filters of {name}",
            "Each tile is one kernel's weights: light where it adds the pixel, dark where it "
            "subtracts it.",
        )
    return Section("filters", "Filters", body or paragraph("No convolution layers."))


def maps_section(model, images: np.ndarray, labels=None) -> Section:
    """Feature maps of a few images (uint8, already the model's size)."""
    from ..explain import feature_maps
    from .arrays import map_grid
    from .plots import plot_feature_maps, to_png

    classes = model.classes
    body = ""
    x = model.preprocessing.apply(images, model.dtype) if model.preprocessing else images
    probs = model.predict_proba(x)
    for i in range(len(images)):
        grids = [map_grid(r["name"], r["type"], r["maps"]) for r in feature_maps(model, x[i])]
        truth = f" (true class: {classes[labels[i]]})" if labels is not None and classes else ""
        body += png_figure(
            to_png(plot_feature_maps(images[i], grids, probs[i], classes, f"image {i}{truth}")),
            f"feature maps of image {i}",
            "Every convolution, activation and pooling layer's output for this image, one tile "
            "per channel; bright where the channel's pattern is found.",
        )
    return Section("maps", "Feature maps", body)


def why_picks(labels: np.ndarray, probs: np.ndarray, k: int = 6) -> tuple[list[int], list[int]]:
    """Up to ``k`` correctly classified images (the most confident of each class in turn, so
    that the classes differ) and the ``k`` most confidently misclassified ones: two lists of
    indices."""
    from .arrays import most_confident_mistakes

    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    right = np.flatnonzero(predicted == labels)
    right = right[np.argsort(-confidence[right], kind="stable")]
    picks, seen = [], set()
    for i in right:
        if int(labels[i]) not in seen:
            picks.append(int(i))
            seen.add(int(labels[i]))
        if len(picks) == k:
            break
    return picks, [int(i) for i in most_confident_mistakes(probs, labels, k)]


def why_section(model, images: np.ndarray, labels: np.ndarray, probs: np.ndarray, k: int = 6):
    """Grad-CAM (:func:`classic_cnn.attribution.gradcam`, the default layer) of the predicted
    class for ``k`` correctly and ``k`` wrongly classified images (uint8, the model's size)."""
    from ..attribution import default_gradcam_layer, gradcam
    from .plots import plot_why_gallery, to_png

    try:
        layer = default_gradcam_layer(model)
    except ValueError as exc:
        return Section("why", "Why this class (Grad-CAM)", paragraph(str(exc)))
    classes = model.classes or [str(i) for i in range(probs.shape[1])]
    x = model.preprocessing.apply(images, model.dtype) if model.preprocessing else images
    body = paragraph(
        f"Grad-CAM on {layer}: each of the layer's maps weighted by how much the predicted "
        "class's score rises with it (the mean of its gradient), summed, negative parts set to "
        "0, enlarged to the image. Bright: where the network found evidence for the class it "
        "chose. Each map is on its own scale, 0 (dark) to its largest value (bright)."
    )
    right, wrong = why_picks(np.asarray(labels), probs, k)
    for title, picks in (("correctly classified", right), ("misclassified", wrong)):
        if not picks:
            body += paragraph(f"No {title} images.")
            continue
        attrs = [gradcam(model, x[i], layer=layer) for i in picks]
        captions = [
            f"true {classes[labels[i]]}\npred {a.class_name} {a.probability:.2f}"
            for i, a in zip(picks, attrs, strict=True)
        ]
        body += png_figure(
            to_png(plot_why_gallery(images[picks], attrs, captions, f"Grad-CAM, {title}")),
            f"Grad-CAM of {title} images",
            f"{title.capitalize()} validation images with the Grad-CAM of the class the network "
            "chose" + (" (the most confident mistakes)" if title == "misclassified" else "") + ".",
        )
    return Section("why", "Why this class (Grad-CAM)", body)


def model_images(model, data) -> np.ndarray:
    """A Dataset's uint8 images as the model sees them (its size and channels)."""
    from ..data.batches import convert_images

    prep = model.preprocessing
    if prep is None:
        return data.images
    return convert_images(data.images, prep.input_shape, prep.background)


def train_report(model, history: list[dict], val_set, info: dict, n_maps: int = 2) -> str:
    """The report of a training run: summary, curves, validation results (confusion matrix,
    misclassified images), filters, the feature maps of ``n_maps`` validation images and
    Grad-CAM of a few correctly and wrongly classified ones."""
    images = model_images(model, val_set)
    probs = model.predict_proba(images)
    classes = model.classes or [str(i) for i in range(probs.shape[1])]
    # a few images the model gets right, of different classes, for the feature maps
    picks, seen = [], set()
    for i in np.flatnonzero(probs.argmax(axis=1) == val_set.labels):
        if int(val_set.labels[i]) not in seen:
            picks.append(int(i))
            seen.add(int(val_set.labels[i]))
        if len(picks) == n_maps:
            break
    sections = [
        summary_section(model, info),
        curves_section(history),
        results_section("validation", "Validation images", images, val_set.labels, probs, classes),
        filters_section(model),
        maps_section(model, images[picks], val_set.labels[picks]),
        why_section(model, images, val_set.labels, probs),
    ]
    return render(f"classic-cnn run: {model.name} on {info.get('data', '')}", sections)


def test_section(model, test_set, probs: np.ndarray, source: str) -> Section:
    """The test split's results, for :func:`replace_section` into a run's report."""
    classes = model.classes or [str(i) for i in range(probs.shape[1])]
    return results_section(
        "test",
        f"Test images ({source})",
        model_images(model, test_set),
        test_set.labels,
        probs,
        classes,
    )
