"""``vitcraft serve``: a local web page to try a trained model on your own images.

One page (``static/index.html`` with its ``app.js`` and ``app.css``, all served
from here, nothing from the network) where you choose or drop an image and see
the top-5 classes with their probabilities, the image with the [CLS]-attention
overlay of a chosen block and head, and the attention-rollout overlay. The
page talks to a small JSON API:

* ``GET /api/info``: the model (name, classes, blocks, heads) and the upload limits;
* ``POST /api/predict``: a multipart form with the file in field ``image`` and
  optional ``layer`` (block index, default -1 = last) and ``head`` ("mean" or
  an index). Answers ``{"name", "top5": [{"name", "probability"}], "image",
  "overlay_cls", "caption_cls", "overlay_rollout", "caption_rollout", "layer",
  "head", "layers", "heads"}``, the pictures as PNG data URIs (an overlay the
  model cannot have, e.g. rollout of a CNN, is null and its caption says
  why), or ``{"error": "..."}`` with status 400 (unreadable image, bad
  layer/head), 413 (over the size limit) or 415 (not a form).

Predictions come from :class:`vitcraft.inference.Predictor`, the same code as
``vitcraft predict``. Overlays are drawn here as PNGs like ``viz``'s figures
(jet colour map at alpha 0.6 over the image, each map stretched to its own
range), so the page needs no JavaScript libraries. Requests run in worker
threads; the predictor serialises model calls, and at most
``MAX_IMAGES_AT_ONCE`` uploads are decoded at a time, which bounds memory.

Needs the ``serve`` extra: ``pip install 'vitcraft[serve]'`` (Starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

import base64
import io
import socket
import threading
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import python_multipart  # noqa: F401  Starlette parses multipart forms with it; fail early if it is missing
import torch
import uvicorn
from matplotlib import colormaps
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from vitcraft.attention_maps import POOLING_TITLE, upsample_map
from vitcraft.errors import VitcraftError
from vitcraft.inference import Predictor, colour_mode

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # largest accepted image file
MAX_PIXELS = 50_000_000  # largest accepted width x height, checked before decoding (a 48-megapixel photo fits)
FORM_OVERHEAD_BYTES = 64 * 1024  # room for the multipart boundaries and the small fields around the file
DISCARD_LIMIT_BYTES = 100 * 1024 * 1024  # an oversized body is read and dropped up to this, then cut off
MAX_IMAGES_AT_ONCE = 2  # uploads decoded at the same time: a 50-megapixel RGB image takes 150 MB
DISPLAY_SIDE = 256  # longer side in pixels of the pictures the page shows (app.css sizes them so)
OVERLAY_ALPHA = 0.6  # as plots.plot_attention_overlays
TOP_K = 5
STATIC_DIR = Path(__file__).with_name("static")
# the "jet" colour map as a lookup table, read-only and so safe to share between threads
JET = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.float32)  # (256, 3)
# the page loads only what this server sends; data: URIs carry the pictures
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'",
                    "X-Content-Type-Options": "nosniff"}


class UploadError(Exception):
    """A request the page must explain to the user: message and HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------- pictures
def _png_data_uri(pixels: np.ndarray) -> str:
    """uint8 (H, W, 3) -> "data:image/png;base64,..."."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def display_image(data: bytes, mode: str) -> np.ndarray:
    """The uploaded image as the page shows it: uint8 (h, w, 3), longer side DISPLAY_SIDE, aspect kept.

    In the model's colour ``mode`` ("RGB" or "L"), so a grayscale model's
    input looks gray. Small images are enlarged with nearest-neighbour, so
    their pixels stay visible as blocks.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (DISPLAY_SIDE, DISPLAY_SIDE))  # JPEGs: decode at a reduced scale, much faster
        scale = DISPLAY_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.convert(mode).convert("RGB")
        resample = Image.NEAREST if scale > 1 else Image.BILINEAR
        return np.asarray(image.resize(size, resample), dtype=np.uint8)


def overlay(pixels: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """A patch-grid map (g, g) drawn over uint8 ``pixels`` (h, w, 3) -> uint8 (h, w, 3).

    The map is bilinearly stretched to the picture, scaled to its own
    min..max (red is where this image's attention is highest) and blended
    with the jet colour map at OVERLAY_ALPHA, as ``plots.plot_attention_overlays`` draws it.
    """
    heat = upsample_map(grid[None], pixels.shape[:2])[0].numpy()  # (h, w)
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    colours = JET[np.rint(heat * 255).astype(np.int64)]  # (h, w, 3)
    blended = (1 - OVERLAY_ALPHA) * pixels.astype(np.float32) + OVERLAY_ALPHA * colours
    return np.rint(blended).clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------- requests
def _parse_layer_head(layer: str, head: str) -> tuple[int, int | str]:
    """The form's layer and head text -> (int, int or "mean")."""
    try:
        return int(layer), (head if head == "mean" else int(head))
    except ValueError:
        raise UploadError(f"layer must be an integer and head an integer or 'mean', got {layer!r} and {head!r}") \
            from None


def _too_large() -> UploadError:
    return UploadError(f"the upload is larger than the limit of {MAX_UPLOAD_BYTES // 2**20} MB", 413)


async def _receive_body(request: Request, limit: int) -> bytes:
    """The request body, or UploadError 413 once it passes ``limit`` bytes, whatever Content-Length claimed.

    An oversized body is still read (and dropped) up to DISCARD_LIMIT_BYTES:
    a client still sending when the server answers and closes sees a reset
    connection instead of the 413 and its message.
    """
    if int(request.headers.get("content-length") or 0) > DISCARD_LIMIT_BYTES:
        raise _too_large()
    body, received, more = bytearray(), 0, True
    while more and received <= DISCARD_LIMIT_BYTES:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise UploadError("the upload was interrupted")
        chunk, more = message.get("body", b""), message.get("more_body", False)
        received += len(chunk)
        if received <= limit:
            body += chunk
    if received > limit:
        raise _too_large()
    return bytes(body)


async def _read_upload(request: Request) -> tuple[bytes, str, str, str]:
    """(file bytes, file name, layer text, head text) of a POST /api/predict form."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadError("send the image as a multipart/form-data upload in the field 'image'", 415)
    body = await _receive_body(request, MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES)

    async def chunks():
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=4).parse()
    except MultiPartException as error:
        raise UploadError(f"cannot read the upload form: {error}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise UploadError("the form has no file in the field 'image'")
        data = await upload.read()
        if len(data) > MAX_UPLOAD_BYTES:
            raise _too_large()
        if not data:
            raise UploadError(f"{upload.filename or 'the upload'} is empty")
        return data, upload.filename or "upload", str(form.get("layer", "-1")), str(form.get("head", "mean"))
    finally:
        await form.close()


def _captions(predictor: Predictor, layer: int | None, head: int | str | None) -> dict[str, str]:
    """The title under each map for the model's kind of attention maps (see Predictor.map_kind)."""
    if predictor.map_kind == "pooling":
        return {"cls": POOLING_TITLE, "rollout": ""}
    heads = "mean of heads" if head == "mean" else f"head {head}"
    return {"cls": f"[CLS] attention, block {layer}, {heads}", "rollout": f"Attention rollout, {heads}"}


def explain(predictor: Predictor, data: bytes, name: str, layer: int, head: int | str) -> dict:
    """The JSON answer for one uploaded image (see the module docstring). Raises VitcraftError.

    A map the model cannot have (no [CLS] token, e.g. a CNN or Swin) comes
    back as ``null`` with the reason as its caption.
    """
    image = predictor.read(data, name, MAX_PIXELS)[None]  # (1, C, H, W)
    top = predictor.top_k(image, TOP_K)[0]
    pixels = display_image(data, colour_mode(predictor.num_channels))
    maps = {method: predictor.attention(image, method, layer, head) for method in ("cls", "rollout")}
    if predictor.map_kind == "cls":  # the block and head as the page shows them: counted from 0
        layer, head = layer % predictor.num_layers, head if head == "mean" else head % predictor.num_heads
    else:  # neither applies
        layer, head = None, None
    answer = {"name": name, "top5": [{"name": class_name, "probability": p} for class_name, p in top],
              "image": _png_data_uri(pixels), "layer": layer, "head": head,
              "layers": predictor.num_layers, "heads": predictor.num_heads}
    captions = _captions(predictor, layer, head)
    for method, result in maps.items():
        is_map = isinstance(result, torch.Tensor)  # else the sentence saying why the model has no such map
        answer[f"overlay_{method}"] = _png_data_uri(overlay(pixels, result[0])) if is_map else None
        answer[f"caption_{method}"] = captions[method] if is_map else result
    return answer


def create_app(predictor: Predictor, title: str) -> Starlette:
    """The Starlette app of the page and its API for ``predictor``; ``title`` names the model on the page."""
    image_slots = threading.BoundedSemaphore(MAX_IMAGES_AT_ONCE)

    def guarded_explain(*args) -> dict:
        with image_slots:
            return explain(predictor, *args)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

    async def info(request: Request) -> Response:
        return JSONResponse({"title": title, "classes": predictor.class_names, "maps": predictor.map_kind,
                             "layers": predictor.num_layers, "heads": predictor.num_heads,
                             "image_size": predictor.image_size,
                             "channels": predictor.num_channels, "max_upload_bytes": MAX_UPLOAD_BYTES,
                             "max_pixels": MAX_PIXELS})

    async def predict(request: Request) -> Response:
        try:
            data, name, layer, head = await _read_upload(request)
            layer_index, head_index = _parse_layer_head(layer, head)
            return JSONResponse(await run_in_threadpool(guarded_explain, data, name, layer_index, head_index))
        except UploadError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        except VitcraftError as error:
            return JSONResponse({"error": str(error)}, status_code=400)

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)  # no favicon, and no 404 in the browser console

    async def server_error(request: Request, error: Exception) -> Response:
        return JSONResponse({"error": f"the server failed on this request ({type(error).__name__}); "
                                      f"see its terminal"}, status_code=500)

    routes = [Route("/", page), Route("/api/info", info), Route("/api/predict", predict, methods=["POST"]),
              Route("/favicon.ico", no_icon), Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")]
    return Starlette(routes=routes, exception_handlers={Exception: server_error})


# ------------------------------------------------------------------ running
def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or VitcraftError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        raise VitcraftError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve(predictor: Predictor, title: str, host: str = "127.0.0.1", port: int = 7860,
          log: Callable[[str], None] | None = None) -> None:
    """Serve the page until interrupted. ``log`` gets the address line (and a warning off loopback); default print."""
    log = log or partial(print, flush=True)
    sock = _listen(host, port)
    bound_port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: {host} lets other machines use this page; it has no password")
    log(f"serving {title} at http://{url_host}:{bound_port}/ (Ctrl-C stops)")
    config = uvicorn.Config(create_app(predictor, title), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
