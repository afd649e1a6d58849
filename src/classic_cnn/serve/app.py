"""The explorer's web app: one page and a JSON API over one model.

Why FastAPI (on Starlette) rather than bare Starlette: the issue asks for a JSON API "with an
OpenAPI schema, usable from scripts", and for malformed JSON and wrong types to be answered with
a 4xx and a message. FastAPI derives both the schema and that validation from the request
models below, so they cannot drift apart from the code; bare Starlette would need the schema
written by hand (as YAML in docstrings) and the validation written twice. Its cost is pydantic,
a well-kept library. Swagger UI (``/docs``) is turned off because it loads its scripts from a
CDN; the schema itself is served at ``/api/openapi.json``.

Safety, as the issue states it:

- The server answers only to the address it serves (:class:`HostCheck`, against DNS
  rebinding): a Host header naming any other host gets a 421.
- A request body over :data:`MAX_UPLOAD_BYTES` (10 MB) + a little multipart overhead is refused
  with a 413 before any of it is parsed (:class:`BodyLimit`).
- Uploaded files go through :func:`classic_cnn.data.images.read_image`, the command line's own
  validation (non-images, damaged files, decompression bombs → 400 with the reason).
- Nothing from a request names a file: the model is the one the app was made with, the static
  files are served by Starlette's ``StaticFiles`` from the package's own folder (which refuses
  paths leading out of it), and an upload is written to a temporary file whose name we choose.
- The model's layers keep per-call state (the caches for the backward pass), so every
  computation on it runs under one lock; the server's thread pool still overlaps the decoding,
  the JSON and the network I/O of concurrent requests.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..attribution import METHODS, attribute, default_gradcam_layer, gradcam_layers
from ..explain import explain, explainable_layers, feature_maps, prepare_image
from ..layers import Conv2D
from ..viz.arrays import filter_grid, map_grid

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 * 1000 * 1000  # 10 MB, the stated limit for an uploaded image file
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024  # the file plus the multipart / JSON wrapping
MAX_SIDE = 4096  # the largest side of a pixel array sent as JSON
LOOPBACK = ("127.0.0.1", "localhost", "::1")

Invert = Literal["auto", "yes", "no"]


# --------------------------------------------------------------------------------------------
# Two small ASGI guards, outermost: they run before any routing or parsing
# --------------------------------------------------------------------------------------------


def _json_error(status: int, message: str) -> tuple[dict, dict]:
    body = json.dumps({"detail": message}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
    }
    return start, {"type": "http.response.body", "body": body}


def host_name(header: str) -> str:
    """The host part of a Host header, lower case: ``"[::1]:8000"`` → ``"::1"``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """Refuse requests whose Host header is not one of ``allowed`` (DNS-rebinding guard): a page
    on another site that resolves its own name to 127.0.0.1 still sends its own name."""

    def __init__(self, app, allowed):
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                start, body = _json_error(
                    421,
                    f"this server answers only to {', '.join(sorted(self.allowed))}; "
                    f"the request was addressed to {host or 'no host'!r}",
                )
                if scope["type"] == "http":
                    await send(start)
                    await send(body)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Read at most ``limit`` bytes of a request body, then hand it on whole; a larger body
    (announced or actual) is answered with 413 and never parsed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        message = (
            f"the request is larger than the limit of {MAX_UPLOAD_BYTES // 1_000_000} MB "
            "for an upload"
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            for m in _json_error(413, message):
                await send(m)
            return
        body = bytearray()
        more = True
        while more:
            m = await receive()
            if m["type"] == "http.disconnect":
                return
            body += m.get("body", b"")
            more = m.get("more_body", False)
            if len(body) > self.limit:
                for m in _json_error(413, message):
                    await send(m)
                return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def allowed_hosts(host: str) -> set[str]:
    """The names a browser may use for a server bound to ``host``."""
    names = {host_name(host) if ":" not in host else host.lower()}
    if host in LOOPBACK or host.startswith("127."):
        names |= set(LOOPBACK)
    if host in ("0.0.0.0", "::", ""):  # every interface: this machine's names and addresses
        import socket

        names |= set(LOOPBACK)
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names |= {a[4][0] for a in socket.getaddrinfo(name, None)}
            except OSError:
                pass
    return names


# --------------------------------------------------------------------------------------------
# Request bodies (they also make the OpenAPI schema)
# --------------------------------------------------------------------------------------------

PIXELS_DOC = (
    "An image as nested lists of integers 0–255: H×W (gray) or H×W×C with C = 1 or 3, any "
    "size up to 4096 per side; it is converted as the command line converts an image file "
    "(colour, size keeping the aspect ratio, polarity). Send the `seen` array a previous answer "
    "returned, with invert 'no', to ask about exactly the input the network saw."
)


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pixels: Annotated[list[Any], Field(description=PIXELS_DOC, examples=[[[0, 255], [255, 0]]])]
    invert: Annotated[
        Invert,
        Field(
            description="Invert to the training polarity: 'auto' judges from the image's border."
        ),
    ] = "auto"


class MapsIn(ImageIn):
    layers: Annotated[
        list[str] | None, Field(description="Only these layers (default: every layer with maps).")
    ] = None


class ExplainIn(ImageIn):
    layer: Annotated[str, Field(description="A convolution, pooling or activation layer.")]
    row: Annotated[int, Field(description="Row in the layer's output.")]
    col: Annotated[int, Field(description="Column in the layer's output.")]
    channel: Annotated[
        int | None, Field(description="Filter or channel (default: the strongest there).")
    ] = None


class WhyIn(ImageIn):
    method: Annotated[
        Literal["gradcam", "saliency", "gradient-x-input", "occlusion"],
        Field(description="The attribution method."),
    ] = "gradcam"
    class_name: Annotated[
        str | None, Field(description="The class to explain (default: the most probable).")
    ] = None
    layer: Annotated[
        str | None,
        Field(description="Grad-CAM's layer (default: the last conv / activation with maps)."),
    ] = None
    patch: Annotated[int, Field(ge=1, description="Occlusion: the grey patch's side.")] = 4
    stride: Annotated[int, Field(ge=1, description="Occlusion: the patch's step.")] = 2


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _pixels_array(pixels) -> np.ndarray:
    """JSON pixels → uint8 (H, W, C), or ValueError saying what is wrong."""
    try:
        a = np.asarray(pixels)
    except ValueError:
        raise ValueError(
            "pixels must be a rectangular array (rows of equal length) of integers 0–255"
        ) from None
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(
            f"pixels must be H×W or H×W×C with C = 1 or 3. Received: shape {list(np.shape(a))}"
        )
    if a.dtype.kind not in "iu":
        raise ValueError(f"pixels must be integers 0–255. Received: values of type {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(
            f"pixels must be integers 0–255. Received: values from {a.min()} to {a.max()}"
        )
    if max(a.shape[:2]) > MAX_SIDE:
        raise ValueError(f"pixels: at most {MAX_SIDE} per side. Received: shape {list(a.shape)}")
    return a.astype(np.uint8)


def _sample_source(model):
    """The model's own test images when its dataset is a named one found on this machine
    (never downloaded from here): ``(Dataset | None, reason)``."""
    from ..data.named import DATASETS, load_dataset

    name = (model.metadata.get("dataset") or {}).get("name")
    if not name:
        return None, "the model file does not name its dataset"
    if name not in DATASETS:
        return None, f"the model's dataset {name!r} is not one of {', '.join(DATASETS)}"
    try:
        return load_dataset(name, "test", download=False), ""
    except Exception as exc:  # not found, damaged: the page just offers no random image
        return None, f"{name} test images are not on this machine ({str(exc).splitlines()[0]})"


def create_app(model, *, host: str = "127.0.0.1", samples="auto", title: str | None = None):
    """The explorer app for ``model`` (a loaded :class:`~classic_cnn.model.Sequential` with
    preprocessing), answering to the names of ``host``.

    ``samples``: a Dataset of test images for "random test image", ``None`` for none, or
    ``"auto"``: the model's named dataset when it is on this machine.
    """
    if model.preprocessing is None:
        raise ValueError(f"model '{model.name}' records no preprocessing; it cannot take images")
    if samples == "auto":
        samples, samples_reason = _sample_source(model)
    else:
        samples_reason = "" if samples is not None else "no test images were given to the server"
    classes = model.classes or [str(i) for i in range(model.output_shape[-1])]
    lock = threading.Lock()
    title = title or model.name

    api = FastAPI(
        title="classic-cnn explorer",
        version=__version__,
        description=f"Look inside the model '{title}': predictions, feature maps, and the "
        "arithmetic behind any number of a feature map.",
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: not here
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        parts = []
        for e in errors[:3]:
            if e.get("type") == "json_invalid":
                error = (e.get("ctx") or {}).get("error", "")
                parts.append(f"the body is not valid JSON ({error})" if error else "not JSON")
                continue
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        detail = "invalid request: " + "; ".join(parts)
        return JSONResponse(
            {"detail": detail, "errors": json.loads(json.dumps(errors, default=str))[:10]}, 422
        )

    @api.exception_handler(ValueError)
    async def _bad_value(request: Request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, 400)

    # -- the model ------------------------------------------------------------------------------

    def prepared(pixels, invert):
        seen, x, flipped = prepare_image(model, _pixels_array(pixels), invert)
        return seen, x, bool(flipped)

    def prediction(seen, x, flipped) -> dict:
        with lock:
            probs = model.predict_proba(x)[0].astype(np.float64)
        order = np.argsort(-probs, kind="stable")
        return {
            "seen": seen.tolist(),
            "inverted": flipped,
            "classes": classes,
            "probabilities": probs.tolist(),
            "prediction": classes[int(order[0])],
            "top": [{"class": classes[int(i)], "probability": float(probs[i])} for i in order],
        }

    summary_rows = model.summary_rows()
    probe = np.zeros((1, *model.input_shape), model.dtype)
    map_names = [r["name"] for r in feature_maps(model, probe)]  # layers with H×W×C maps
    explainable = set(explainable_layers(model))
    try:
        why_layer = default_gradcam_layer(model)
    except ValueError:
        why_layer = None

    @api.get("/api/summary", tags=["model"], summary="The model: layers, shapes, classes")
    def summary() -> dict:
        """Everything about the model that does not depend on an input: its layers with output
        shapes, parameter and multiply-accumulate counts, its classes, preprocessing, the
        layers whose numbers /api/explain takes apart, and the upload limit."""
        prep = model.preprocessing
        return {
            "name": title,
            "version": __version__,
            "input_shape": list(model.input_shape),
            "classes": classes,
            "preprocessing": prep.to_dict(),
            "dataset": model.metadata.get("dataset"),
            "metrics": model.metadata.get("metrics"),
            "parameters": int(model.count_params()),
            "layers": [
                {
                    "name": r["name"],
                    "type": r["type"],
                    "output_shape": list(r["output_shape"]),
                    "params": r["params"],
                    "macs": r["macs"],
                }
                for r in summary_rows
            ],
            "map_layers": map_names,
            "explainable": explainable_layers(model),
            "drawable": prep.channels == 1 and max(prep.size) <= 64,
            "samples": {
                "available": samples is not None,
                "name": getattr(samples, "name", None),
                "count": len(samples) if samples is not None else 0,
                "reason": samples_reason,
            },
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "why": {
                "methods": [m for m in METHODS if m != "gradcam" or why_layer],
                "gradcam_layers": gradcam_layers(model),
                "default_layer": why_layer,
            },
        }

    @api.get("/api/filters", tags=["model"], summary="A convolution layer's kernels")
    def filters(
        layer: Annotated[
            str | None, Query(description="A Conv2D layer (default: the first).")
        ] = None,
    ) -> dict:
        """The kernels of a convolution layer as tiles in [0, 1] under one shared symmetric
        scale: ``weight = vmin + tile·(vmax − vmin)``, 0.5 is a zero weight. ``tiles`` is
        (C_out, KH, KW, 3) for an RGB first layer (``colour``), else (C_out, C_in, KH, KW)."""
        convs = [lyr for lyr in model.layers if isinstance(lyr, Conv2D)]
        if not convs:
            raise HTTPException(404, f"model '{title}' has no convolution layers")
        names = [c.name for c in convs]
        if layer is None:
            conv = convs[0]
        elif layer in names:
            conv = convs[names.index(layer)]
        else:
            raise HTTPException(
                404, f"no convolution layer named {layer!r}; valid: {', '.join(names)}"
            )
        kernel = conv.params["kernel"]
        grid = filter_grid(kernel)
        return {
            "layer": conv.name,
            "shape": list(kernel.shape),
            "colour": grid.colour,
            "vmin": grid.vmin,
            "vmax": grid.vmax,
            "scale": grid.scale_text(),
            "tiles": grid.tiles.tolist(),
            "bias": conv.params["bias"].tolist() if "bias" in conv.params else None,
        }

    @api.post("/api/predict", tags=["input"], summary="Class probabilities for pixels")
    def predict(body: ImageIn) -> dict:
        """The probabilities of every class (in the model's class order, and sorted as
        ``top``), and ``seen``: the uint8 image the network actually took (H×W×C)."""
        return prediction(*prepared(body.pixels, body.invert))

    @api.post("/api/predict-file", tags=["input"], summary="Class probabilities for a file")
    def predict_file(
        file: Annotated[UploadFile, File(description="An image file (any size, up to 10 MB).")],
        invert: Annotated[Invert, Form()] = "auto",
    ) -> dict:
        """Like /api/predict for an uploaded image file (JPG, PNG, GIF, BMP, WebP, … up to
        10 MB), validated as the command line validates one: anything that is not a readable
        image is a 400 with the reason. Also returns the file's own size."""
        from ..data.images import ImageError, read_image

        name = os.path.basename(file.filename or "upload") or "upload"
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"{name} is larger than the 10 MB limit")
        if not data:
            raise HTTPException(400, f"{name} is empty")
        # read_image takes a path: the bytes go to a temporary file whose name is ours
        with tempfile.TemporaryDirectory(prefix="classic-cnn-upload-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            try:
                image = read_image(path)
            except ImageError as exc:
                raise HTTPException(400, f"cannot read {name} as an image: {exc.reason}") from None
        seen, x, flipped = prepare_image(model, image, invert)
        out = prediction(seen, x, bool(flipped))
        out["file"] = {"name": name, "height": image.shape[0], "width": image.shape[1],
                       "channels": image.shape[2], "bytes": len(data)}  # fmt: skip
        return out

    @api.post("/api/maps", tags=["inside"], summary="Every layer's feature maps")
    def maps(body: MapsIn) -> dict:
        """The feature maps of every convolution, batch-norm, activation and pooling layer,
        in order: ``maps`` is (C, H, W) (one map per channel), with the layer's colour scale
        (``vmin``..``vmax``; ``signed``: symmetric around 0)."""
        seen, x, flipped = prepared(body.pixels, body.invert)
        with lock:
            records = feature_maps(model, x, body.layers)
        layers = []
        for r in records:
            g = map_grid(r["name"], r["type"], r["maps"])
            h, w, c = r["maps"].shape
            layers.append(
                {
                    "name": g.name,
                    "type": g.type,
                    "shape": [h, w, c],
                    "vmin": g.vmin,
                    "vmax": g.vmax,
                    "signed": g.signed,
                    "explainable": g.name in explainable,
                    "maps": g.tiles.astype(np.float64).tolist(),
                }
            )
        return {"seen": seen.tolist(), "inverted": flipped, "layers": layers}

    @api.post("/api/explain", tags=["inside"], summary="The arithmetic behind one number")
    def explain_unit(body: ExplainIn) -> dict:
        """Why ``layer[row, col, channel]`` is what it is: for a convolution the patch of the
        layer's input under the kernel, the kernel, their element-wise products, the sum, the
        bias and each following batch-norm / activation step; for pooling the window and its
        winner; and ``receptive_field`` (top, left, bottom, right; ends excluded) in the
        input image. ``value`` equals the forward pass."""
        _, x, flipped = prepared(body.pixels, body.invert)
        with lock:
            e = explain(model, x, body.layer, (body.row, body.col), body.channel)
        return e.to_dict() | {"inverted": flipped}

    @api.post("/api/why", tags=["inside"], summary="Why this class: an attribution map")
    def why(body: WhyIn) -> dict:
        """Which pixels pushed the network to a class: ``map`` (H×W, the input's size) by
        Grad-CAM (on ``layer``), saliency (|d score / d pixel|), gradient × input or occlusion
        (a grey ``patch`` moved by ``stride``: the drop in the class's probability), for
        ``class_name`` (default: the top class), with its ``probability`` and the map's colour
        scale (``vmin``..``vmax``; ``signed``: symmetric around 0)."""
        seen, x, flipped = prepared(body.pixels, body.invert)
        options = {"layer": body.layer} if body.method == "gradcam" else {}
        if body.method == "occlusion":
            options = {"patch": body.patch, "stride": body.stride}
        with lock:
            a = attribute(model, x, body.method, body.class_name, **options)
        return a.record() | {"seen": seen.tolist(), "inverted": flipped}

    @api.get("/api/sample", tags=["input"], summary="A test image of the model's dataset")
    def sample(
        index: Annotated[
            int | None, Query(ge=0, description="Which test image (default: a random one).")
        ] = None,
    ) -> dict:
        """A test image of the model's own dataset, as the network sees it (``seen``), with
        its true class; 404 when the dataset is not on this machine."""
        if samples is None:
            raise HTTPException(404, f"no test images: {samples_reason}")
        n = len(samples)
        if index is None:
            index = int(np.random.default_rng().integers(n))
        if index >= n:
            raise HTTPException(400, f"index {index} is out of range: {n} test images (0..{n - 1})")
        from ..data.batches import convert_images

        prep = model.preprocessing
        seen = convert_images(samples.images[index : index + 1], prep.input_shape, prep.background)
        label = int(samples.labels[index])
        return {
            "index": index,
            "dataset": samples.name,
            "count": n,
            "label": label,
            "true_class": samples.classes[label],
            "seen": seen[0].tolist(),
        }

    # -- the page -----------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    guarded = HostCheck(BodyLimit(api), allowed_hosts(host))
    guarded.api = api  # for tests and scripts that want the FastAPI object
    return guarded


def serve(model_path, host: str = "127.0.0.1", port: int = 8000, echo=print) -> None:
    """Load ``model_path`` and serve the explorer on ``host:port`` until Ctrl-C."""
    import socket

    import uvicorn

    from ..io import load

    model = load(model_path)
    app = create_app(model, host=host, title=Path(model_path).name)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    echo(f"classic-cnn explorer for {model_path}: http://{shown}:{port}/  (Ctrl-C to stop)")
    if not (host in LOOPBACK or host.startswith("127.")):
        echo(
            f"note: listening on {host}, not only on this machine (127.0.0.1): anyone who can "
            "reach this address can use the page and the API; there is no login"
        )
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
