"""The article, computed: each of its figures reproduced with the library's real operations.

:func:`steps` returns one record per figure (plain data: arrays and numbers) and
:func:`run_tour` prints what each shows (``cnn tour``) and, with ``out``, saves the pictures.
The tests check the records against the article's numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import ops
from .explain import explain
from .layers import Conv2D, MaxPool2D
from .losses import MSELoss
from .model import Sequential
from .optim import SGD

#: the curve the article's 7×7 detector looks for: (row, col) of each weight of 30
CURVE = [(0, 5), (1, 4), (2, 3), (3, 2), (4, 2), (5, 2), (6, 2)]

#: the small grid of the pooling figures (its top-left 4×4 is the classic 2×2/2 example)
POOL_GRID = np.array(
    [
        [1, 1, 2, 4, 0],
        [5, 6, 7, 8, 1],
        [3, 2, 1, 0, 9],
        [1, 2, 3, 4, 2],
        [0, 5, 1, 3, 6],
    ],
    dtype=np.float32,
)

#: the article's fully connected output for a "3": 75% three, 10% one and two, 5% nine
ARTICLE_PROBS = np.array([0, 0.1, 0.1, 0.75, 0, 0, 0, 0, 0, 0.05])


def curve_detector() -> np.ndarray:
    """The article's 7×7 kernel: weight 30 along a curve bending out to the right, 0 elsewhere."""
    k = np.zeros((7, 7), np.float32)
    for r, c in CURVE:
        k[r, c] = 30
    return k


def curve_image() -> np.ndarray:
    """A 32×32 image with a curve at the top left: four pixels of 50 and one of 20 on the
    detector's curve (and a bright pixel off the curve, which meets a zero weight)."""
    image = np.zeros((32, 32), np.float32)
    for (r, c), v in zip(CURVE[1:6], [50, 50, 50, 50, 20], strict=True):
        image[r, c] = v
    image[6, 6] = 90
    return image


def _conv_model(filters: int, kernel: int, seed: int) -> Sequential:
    return Sequential([Conv2D(filters, kernel)], input_shape=(32, 32, 3), seed=seed, name="conv")


def steps(seed: int = 0) -> list[dict]:
    """One record per figure of the article, computed."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(1, 32, 32, 3)).astype(np.float32)  # 0..255, as pixels
    out = []

    # 1. a 5×5×3 kernel over a 32×32×3 input: 28×28 = 784 numbers
    one = _conv_model(1, 5, seed)
    fmap = one.forward(image)
    e = explain(one, image, "conv2d_1", (0, 0), 0)
    out.append(
        {
            "name": "one kernel",
            "input_shape": image.shape[1:],
            "kernel_shape": one.layers[0].params["kernel"].shape[:3],
            "map_shape": fmap.shape[1:3],
            "numbers": int(fmap[0, :, :, 0].size),
            "explanation": e,
            "forward_value": float(fmap[0, 0, 0, 0]),
        }
    )

    # 2. two kernels: 28×28×2
    two = _conv_model(2, 5, seed)
    out.append({"name": "two kernels", "map_shape": two.forward(image).shape[1:]})

    # 3. the curve detector
    det = _conv_model(1, 7, seed)
    w = np.zeros((7, 7, 3, 1), np.float32)
    w[:, :, 0, 0] = curve_detector()  # it looks at the first channel
    det.layers[0].params["kernel"] = w
    det.layers[0].params["bias"][:] = 0
    x = np.repeat(curve_image()[None, :, :, None], 3, axis=3)
    fmap = det.forward(x)[0, :, :, 0]
    right = fmap.shape[1] - 1
    out.append(
        {
            "name": "curve detector",
            "kernel": curve_detector(),
            "image": curve_image(),
            "map": fmap,
            "map_shape": fmap.shape,
            "match": explain(det, x, "conv2d_1", (0, 0), 0),
            "elsewhere": explain(det, x, "conv2d_1", (0, right), 0),
        }
    )

    # 4. max pooling: 2×2 stride 2, 3×3 stride 1, 3×3 stride 2
    grid = POOL_GRID[None, :, :, None]
    pools = []
    for size, stride in ((2, 2), (3, 1), (3, 2)):
        y = MaxPool2D(size, stride).forward(grid)[0, :, :, 0]
        pools.append((f"{size}×{size} stride {stride}", size, stride, y))
    out.append({"name": "max pooling", "grid": POOL_GRID, "pools": pools})

    # 5. softmax over 10 digits: scores whose softmax is the article's output
    logits = np.log(np.maximum(ARTICLE_PROBS, 1e-4)) + 2.0  # any shift gives the same softmax
    out.append({"name": "softmax", "logits": logits, "probs": ops.softmax(logits[None])[0]})

    # 6. one back-propagation step: forward, MSE loss, backward, w ← w − lr·dL/dW
    from .presets import article

    layers, shape = article(10)
    net = Sequential(layers, shape, seed=seed, name="article")
    # a small, normalised input: with freshly initialised kernels the output is then close to
    # the article's [.1 .1 … .1], no class preferred yet
    x = (0.05 * rng.standard_normal((1, *shape))).astype(np.float32)
    label = np.array([3])
    loss = MSELoss()
    before = float(loss.forward(net.forward(x), label))
    probs_before = ops.softmax(net.forward(x))[0]
    params = {k: v.copy() for k, v in net.parameters().items()}
    lr = 1.0  # MSE of probabilities has small gradients: a large step shows the change
    net.train_step(x, label, loss, SGD(lr))
    grads = net.gradients()
    after = float(loss.forward(net.forward(x), label))
    name = "conv2d_1.kernel"
    out.append(
        {
            "name": "back-propagation",
            "loss_before": before,
            "loss_after": after,
            "probs_before": probs_before,
            "probs_after": ops.softmax(net.forward(x))[0],
            "lr": lr,
            "param": name,
            "w_before": params[name],
            "grad": grads[name],
            "w_after": net.parameters()[name],
        }
    )
    return out


def _grid_text(a: np.ndarray, fmt: str = "{:>4g}") -> list[str]:
    return ["    " + " ".join(fmt.format(v) for v in row) for row in a]


def run_tour(print_fn=print, out: Path | None = None, seed: int = 0) -> list[dict]:
    """Print what each of the article's figures shows, computed; with ``out``, save the
    pictures there. Returns the records of :func:`steps`."""
    records = steps(seed)
    p = print_fn
    s = {r["name"]: r for r in records}

    r = s["one kernel"]
    e = r["explanation"]
    p("1. Convolution: one kernel slides over the image")
    p(
        f"   input {'×'.join(map(str, r['input_shape']))}, kernel "
        f"{'×'.join(map(str, r['kernel_shape']))} → feature map "
        f"{'×'.join(map(str, r['map_shape']))} = {r['numbers']} numbers (1 + (32 − 5) / 1 = 28)"
    )
    p(
        f"   the top-left number: the sum of the {e.products.size} products of the 5×5×3 patch "
        f"and the kernel = {e.total:.6g}, + bias {e.bias:g} = {e.conv_value:.6g} "
        f"(the forward pass gives {r['forward_value']:.6g})"
    )
    p("")
    p("2. Two kernels of the same size: two feature maps stacked")
    p(f"   feature maps {'×'.join(map(str, s['two kernels']['map_shape']))}")
    p("")
    r = s["curve detector"]
    m, z = r["match"], r["elsewhere"]
    p("3. A 7×7 curve detector (weight 30 along a curve, 0 elsewhere)")
    for line in _grid_text(r["kernel"], "{:>3g}"):
        p(line)
    nz = [(i, j) for i, j in zip(*np.nonzero(m.products[..., 0]), strict=True)]
    terms = " + ".join(f"{m.patch[i, j, 0]:g}·{m.kernel[i, j, 0]:g}" for i, j in nz)
    p(
        f"   over the curve (top left): {terms} = {m.total:g}   "
        f"(the article: 4·(50·30) + (20·30) = 6600)"
    )
    p(f"   over an empty part (top right, col {z.position[1]}): {z.total:g}")
    p(
        f"   feature map {'×'.join(map(str, r['map_shape']))} (32 − 7 + 1 = 26): large where "
        f"the curve is, 0 where nothing is"
    )
    p("")
    r = s["max pooling"]
    p("4. Max pooling keeps the largest number of each window")
    for line in _grid_text(r["grid"]):
        p(line)
    for label, _, _, y in r["pools"]:
        p(f"   {label} → {y.shape[0]}×{y.shape[1]}: {y.astype(int).tolist()}")
    p("")
    r = s["softmax"]
    p("5. The fully connected layer's scores through softmax: probabilities summing to 1")
    p("   " + "  ".join(f"{d}:{q:.2f}" for d, q in enumerate(r["probs"])))
    p(f"   the most probable digit: {int(r['probs'].argmax())} ({r['probs'].max():.2f})")
    p("")
    r = s["back-propagation"]
    p("6. One step of training (the article's network, MSE loss, label 3)")
    p("   forward pass (random kernels): " + " ".join(f"{q:.2f}" for q in r["probs_before"]))
    p(f"   loss before: {r['loss_before']:.6f}")
    g = r["grad"]
    p(
        f"   backward pass: dL/dW of {r['param']} {'×'.join(map(str, g.shape))}, "
        f"largest |dL/dW| {np.abs(g).max():.3g}"
    )
    i = np.unravel_index(np.abs(g).argmax(), g.shape)
    p(
        f"   weight update w ← w − lr·dL/dW (lr {r['lr']:g}): e.g. {r['w_before'][i]:.6f} − "
        f"{r['lr']:g}·{g[i]:.3g} = {r['w_after'][i]:.6f}"
    )
    p(
        f"   loss after:  {r['loss_after']:.6f} (lower), p(3) {r['probs_before'][3]:.4f} → "
        f"{r['probs_after'][3]:.4f}"
    )
    if out is not None:
        from .viz.plots import plot_curve_detector, plot_explain, plot_pooling, save_png

        c = s["curve detector"]
        paths = [
            save_png(
                plot_curve_detector(c["image"], c["kernel"], c["map"]),
                Path(out) / "tour-curve-detector.png",
            ),
            save_png(
                plot_explain(c["match"], np.clip(c["image"], 0, 255).astype(np.uint8)[..., None]),
                Path(out) / "tour-curve-explain.png",
            ),
            save_png(
                plot_pooling(
                    s["max pooling"]["grid"],
                    [(label, y) for label, _, _, y in s["max pooling"]["pools"]],
                ),
                Path(out) / "tour-pooling.png",
            ),
        ]
        p("")
        for path in paths:
            p(f"wrote {path}")
    return records
