"""The web demo: a one-page app and a small JSON API around a run folder's model.

``create_app(run_dir)`` returns a FastAPI app with

- ``GET /``: a self-contained page (``templates/index.html``, CSS and JS inline) to pick, drop or
  photograph an image and see the top classes and the Grad-CAM overlay;
- ``POST /api/predict``: multipart field ``file``; query ``top_k`` and ``cam``;
- ``GET /api/health``, ``GET /api/model`` and the OpenAPI document at ``/openapi.json``.

Every bad input gets a 4xx answer with ``{"detail": "one line"}``: a body over ``max_bytes`` 413,
an empty, truncated or undecodable file 400, a file that is not a JPEG, PNG, WebP, BMP, GIF or TIFF
415, more than ``max_pixels`` pixels (read from the header, before decoding) 413, a missing field or
bad query 422 (see :mod:`imgtune.serve.uploads`), and inference slower than ``timeout`` seconds 504.
The model is loaded once; requests run it in worker threads, one at a time on the PyTorch model
(Grad-CAM adds hooks to it).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# they name classes imported inside create_app.
import asyncio
import base64
import io
import threading
import time
from functools import lru_cache, partial
from pathlib import Path

import jinja2
from PIL import Image

from imgtune.errors import ImgtuneError, first_line
from imgtune.serve.uploads import MAX_BYTES, MAX_PIXELS, BodyLimit, RequestError, decode_upload

TIMEOUT = 30.0


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

    html = render_page(demo.info())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return html

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


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the demo's templates: package data, autoescape on, undefined names fail."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("imgtune.serve", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.policies["json.dumps_kwargs"] = {}  # `tojson` keeps the keys in the order /api/model gives them
    return env


def render_page(info: dict) -> str:
    """The demo page (``templates/index.html``) for a model.

    Args:
        info: what ``/api/model`` answers (:meth:`Demo.info`); the page's script reads it.

    Returns:
        The whole page, with its CSS and JS inline.
    """
    return environment().get_template("index.html").render(model=info)


def _version() -> str:
    from imgtune import __version__

    return __version__
