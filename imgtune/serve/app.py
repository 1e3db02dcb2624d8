"""The web demo: a one-page app and a small JSON API around a run folder's model.

``create_app(run_dir)`` returns a FastAPI app with

- ``GET /``: a self-contained page (inline CSS and JS) to pick, drop or photograph an image and see
  the top classes and the Grad-CAM overlay;
- ``POST /api/predict``: multipart field ``file``; query ``top_k`` and ``cam``;
- ``GET /api/health``, ``GET /api/model`` and the OpenAPI document at ``/openapi.json``.

Every bad input gets a 4xx answer with ``{"detail": "one line"}``: a body over ``max_bytes`` 413,
an empty, truncated or undecodable file 400, a file that is not a JPEG, PNG, WebP, BMP, GIF or TIFF
415, more than ``max_pixels`` pixels (read from the header, before decoding) 413, a missing field or
bad query 422, and inference slower than ``timeout`` seconds 504. The model is loaded once; requests
run it in worker threads, one at a time on the PyTorch model (Grad-CAM adds hooks to it).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# they name classes imported inside create_app.
import asyncio
import base64
import io
import json
import threading
import time
from functools import partial
from pathlib import Path

from PIL import Image

from imgtune.errors import ImgtuneError, UnreadableImageError
from imgtune.errors import first_line

#: The image formats the demo decodes; PIL's other decoders never see an upload.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_BYTES = 10_000_000
MAX_PIXELS = 40_000_000
TIMEOUT = 30.0


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and the one-line reason shown to the user."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


#: The HTTP status for each kind of unreadable upload (see :class:`imgtune.errors.UnreadableImageError`).
UPLOAD_STATUS = {"empty": 400, "format": 415, "pixels": 413, "decode": 400}


def decode_upload(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode uploaded bytes into an upright RGB picture, as :func:`imgtune.data.images.decode_image` does.

    Raises:
        RequestError: 400 empty or undecodable, 415 not an allowed format, 413 too many pixels.
    """
    from imgtune.data.images import decode_image

    try:
        return decode_image(bytes(data), max_pixels=max_pixels, formats=ALLOWED_FORMATS)
    except UnreadableImageError as error:
        raise RequestError(UPLOAD_STATUS.get(error.kind, 400), str(error)) from None


class Demo:
    """The loaded model, shared by every request: prediction (ONNX or PyTorch) and Grad-CAM (PyTorch)."""

    def __init__(self, run_dir: str | Path, *, backend: str = "auto"):
        from imgtune.deploy.predict import Predictor, load_predictor
        from imgtune.explain.interpret import Interpretation

        self.run_dir = Path(run_dir)
        self.predictor = load_predictor(self.run_dir, backend=backend)
        self.torch = self.predictor if isinstance(self.predictor, Predictor) else Predictor.load(self.run_dir)
        self.explainer = Interpretation.for_model(self.torch)
        self.meta = self.predictor.meta
        self.classes = self.predictor.classes
        # Grad-CAM hooks the model's layer; a forward pass of another request meanwhile would be
        # captured too, so every use of the PyTorch model holds this lock. ONNX Runtime sessions are
        # safe to run from several threads.
        self.lock = threading.Lock()

    def info(self) -> dict:
        """What ``/api/model`` answers: the run's name, architecture, classes, input and metrics."""
        meta = self.meta
        return dict(name=self.run_dir.resolve().name, arch=meta.get("arch") or meta.get("timm_name"),
                    timm_name=meta.get("timm_name"), classes=self.classes, size=meta.get("size"),
                    resize=meta.get("resize", "crop"), metrics=meta.get("metrics", {}),
                    backend="onnx" if self.predictor is not self.torch else "torch")

    def predict(self, image: Image.Image, *, top_k: int, cam: bool) -> dict:
        """The top ``top_k`` classes of ``image`` and, with ``cam``, its Grad-CAM overlay as a data URI."""
        started = time.perf_counter()
        if self.predictor is self.torch:
            with self.lock:
                prediction = self.predictor.predict([image])
        else:
            prediction = self.predictor.predict([image])
        ranked = prediction.top_k(top_k)[0]
        overlay = self._cam(image, int(prediction.probs[0].argmax())) if cam else None
        return dict(labels=[dict(label=label, probability=p) for label, p in ranked], top=ranked[0][0],
                    seconds=time.perf_counter() - started, cam=overlay)

    def _cam(self, image: Image.Image, class_index: int) -> str:
        x = self.explainer.input_tensor(image)  # transformed once for Grad-CAM and the overlay
        with self.lock:
            heatmap = self.explainer.grad_cam(x, class_index)
        buffer = io.BytesIO()
        self.explainer.overlay(x, heatmap).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, by its Content-Length or as it streams."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        too_large = f"the request body is larger than the limit of {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, detail = (413, too_large) if length.isdigit() else (400, "invalid Content-Length header")
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body on to its handler.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


def create_app(run_dir: str | Path, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               timeout: float = TIMEOUT, backend: str = "auto"):
    """The demo app for the model bundle in ``run_dir``.

    Args:
        run_dir: a folder written by ``imgtune train`` (or ``Learner.save``).
        max_bytes: the largest request body accepted (413 above).
        max_pixels: the most pixels an image may have, checked from its header (413 above).
        timeout: seconds one prediction may take (504 after).
        backend: ``auto``, ``torch`` or ``onnx``, as for :func:`imgtune.deploy.predict.load_predictor`.

    Returns:
        A ``fastapi.FastAPI`` app; serve it with uvicorn.
    """
    try:
        from fastapi import FastAPI, File, Query, Request, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from pydantic import BaseModel
    except ImportError:
        raise ImgtuneError("the web demo needs fastapi, uvicorn and python-multipart: "
                           "pip install 'imgtune[serve]'") from None

    demo = Demo(run_dir, backend=backend)
    n_classes = len(demo.classes)

    class Problem(BaseModel):
        detail: str

    class Label(BaseModel):
        label: str
        probability: float

    class PredictResult(BaseModel):
        labels: list[Label]
        top: str
        seconds: float
        cam: str | None = None

    problems = {status: {"model": Problem, "description": text} for status, text in [
        (400, "empty, truncated or undecodable image"), (413, "body or image too large"),
        (415, "not an allowed image format"), (422, "missing field or bad query"), (504, "inference timed out")]}

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the demo works offline.
    app = FastAPI(title=f"imgtune demo: {demo.info()['name']}", version=_version(), docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in error.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        # Escaped so that no class name can close the <script> element it is embedded in.
        model_json = json.dumps(demo.info()).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return PAGE.replace("__MODEL__", model_json)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in the browser's console

    @app.get("/api/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/api/model")
    async def model() -> dict:
        return demo.info()

    @app.post("/api/predict", response_model=PredictResult, responses=problems)
    async def predict(file: UploadFile = File(..., description="the image"),
                      top_k: int = Query(3, ge=1, le=n_classes, description="how many classes to return"),
                      cam: bool = Query(True, description="include the Grad-CAM overlay as a PNG data URI")):
        data = await file.read()
        image = decode_upload(data, max_pixels=max_pixels)
        work = partial(demo.predict, image, top_k=top_k, cam=cam)
        try:
            # On timeout the worker thread is abandoned, not stopped: it finishes in the background.
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, work), timeout)
        except asyncio.TimeoutError:
            raise RequestError(504, f"inference took longer than the limit of {timeout:g} s") from None
        except RequestError:
            raise
        except Exception as error:  # never a 5xx with a traceback: the image is what made it fail
            raise RequestError(400, f"cannot classify this image ({type(error).__name__}: "
                                    f"{first_line(error)[:150]})") from None

    return app




def _version() -> str:
    from imgtune import __version__

    return __version__


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgtune demo</title>
<style>
  body { font: 16px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 40rem; padding: 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin: 0 0 .3rem; }
  .meta { color: #555; font-size: .9rem; overflow-wrap: anywhere; }
  #drop { display: block; border: 2px dashed #888; border-radius: .6rem; padding: 1.5rem 1rem; text-align: center;
          margin: 1rem 0; cursor: pointer; }
  #drop.over { background: #eef4ff; border-color: #3a6ee8; }
  #file { display: block; margin: .6rem auto 0; max-width: 100%; }
  #status { min-height: 1.4rem; }
  .error { color: #b00020; }
  .row { display: grid; grid-template-columns: minmax(5rem, 30%) 1fr 4rem; gap: .5rem; align-items: center;
         margin: .25rem 0; }
  .label { overflow-wrap: anywhere; }
  .bar { background: #e5e5e5; border-radius: .3rem; height: 1rem; }
  .bar > span { display: block; height: 100%; background: #3a6ee8; border-radius: .3rem; }
  .row.top .label { font-weight: 600; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
  .images { display: flex; flex-wrap: wrap; gap: 1rem; margin-top: 1rem; }
  .images figure { margin: 0; flex: 1 1 12rem; }
  .images img { width: 100%; image-rendering: auto; border-radius: .4rem; }
  figcaption { font-size: .85rem; color: #555; }
</style>
</head>
<body>
<h1 id="name">imgtune demo</h1>
<div class="meta" id="about"></div>
<label id="drop" for="file">Choose, drop or take a photo
  <input id="file" type="file" accept="image/*" capture="environment">
</label>
<div id="status" role="status"></div>
<div id="result" hidden>
  <div id="labels"></div>
  <div class="images">
    <figure><img id="preview" alt="your image"><figcaption>your image</figcaption></figure>
    <figure><img id="cam" alt="Grad-CAM overlay"><figcaption>where the model looked (Grad-CAM)</figcaption></figure>
  </div>
</div>
<script id="model" type="application/json">__MODEL__</script>
<script>
"use strict";
const model = JSON.parse(document.getElementById("model").textContent);
const $ = (id) => document.getElementById(id);
$("name").textContent = model.name;
const accuracy = model.metrics && typeof model.metrics.valid_accuracy === "number"
  ? `validation accuracy ${(100 * model.metrics.valid_accuracy).toFixed(1)}%` : "validation accuracy unknown";
$("about").textContent = `${model.arch}, ${model.size} px; ${accuracy}; classes: ${model.classes.join(", ")}`;

function show(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function classify(file) {
  if (!file) return;
  show("Classifying " + file.name + " ...", false);
  $("result").hidden = true;
  const body = new FormData();
  body.append("file", file);
  const k = Math.min(5, model.classes.length);
  try {
    const response = await fetch(`api/predict?top_k=${k}&cam=true`, { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) { show(String(answer.detail || response.statusText), true); return; }
    const rows = $("labels");
    rows.replaceChildren();
    answer.labels.forEach((item, i) => {
      const row = document.createElement("div");
      row.className = i === 0 ? "row top" : "row";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = item.label;
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = (100 * item.probability).toFixed(1) + "%";
      bar.append(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = (100 * item.probability).toFixed(1) + "%";
      row.append(label, bar, pct);
      rows.append(row);
    });
    if ($("preview").src) URL.revokeObjectURL($("preview").src);
    $("preview").src = URL.createObjectURL(file);
    if (answer.cam) { $("cam").src = answer.cam; }
    $("cam").parentElement.hidden = !answer.cam;
    show(`${answer.top} (${answer.seconds.toFixed(2)} s)`, false);
    $("result").hidden = false;
  } catch (error) {
    show("The server did not answer: " + error, true);
  }
}

$("file").addEventListener("change", () => classify($("file").files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
  event.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (event) => {
  event.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (event) => classify(event.dataTransfer.files[0]));
</script>
</body>
</html>
"""
