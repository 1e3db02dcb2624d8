"""The web demo: a one-page app and a small JSON API around a run folder's model.

``create_app(run_dir)`` returns a FastAPI app with

- ``GET /``: a self-contained page (``templates/index.html``, CSS and JS inline) to pick, drop or
  photograph an image and see the top classes and the Grad-CAM overlay;
- ``POST /api/predict``: multipart field ``file``; query ``top_k`` and ``cam``;
- ``GET /api/health``, ``GET /api/model`` and the OpenAPI document at ``/openapi.json``.

Every bad input gets a 4xx answer with ``{"detail": "one line"}``: a body over ``max_bytes`` 413,
an empty, truncated or undecodable file 400, a file that is not a JPEG, PNG, WebP, BMP, GIF or TIFF
415, more than ``max_pixels`` pixels (read from the header, before decoding) 413, a missing field or
bad query 422 (see :mod:`imgtune.serve.uploads`). When the server listens on loopback, a request for
any other host name gets 421 (DNS rebinding; see :class:`~imgtune.serve.uploads.LoopbackHostOnly`).

The model is loaded once. The event loop only receives requests and answers them: each upload is
read, decoded, converted to RGB, resized and classified in a worker thread, all of it under
``timeout`` seconds (504 after; the thread is abandoned, not stopped, and keeps its slot until it
ends). At most ``max_concurrent`` uploads are in the workers at once; one more gets 503 with
``Retry-After: 1`` at once rather than waiting in a queue. ``/api/health`` never waits for a slot
or a decode. Predictions on the PyTorch model run one at a time (Grad-CAM adds hooks to it).

Micro-batching: a request without Grad-CAM, once its upload is decoded in its worker, hands the
picture to a :class:`~imgtune.serve.batcher.MicroBatcher`: pictures that arrive within
``batch_wait`` seconds of the first (10 ms by default; not at all when no other upload is being
decoded), up to ``max_batch`` (16) and in practice at most ``max_concurrent``, are preprocessed in
their workers and classified in one model call by one batching thread, and each worker takes
its own row of probabilities and its own ``top_k`` from it (the answer's ``batch`` says how many
pictures shared the call). Decoding and its refusals stay per request, so a bad upload never
reaches a batch; a request that times out takes its picture out of the queue. Grad-CAM requests, and
every request with ``max_batch=1``, are classified alone, as before.

Memory: each upload in the workers holds at most about ``2 * max_bytes`` of encoded data and
``12 * max_pixels`` bytes of pictures: the decoded one (Pillow keeps RGB, RGBA, LA, CMYK, I and F
in 4 bytes a pixel, 16-bit grey in 2), the 8-bit RGB result (4 bytes a pixel), and an RGBA copy for
grey with alpha (12 in all, the worst mode; 7 to 9 for the others: 16-bit and float images add one
8-bit plane, converted a strip of rows at a time in float32, see :func:`imgtune.data.images.to_rgb`).
With the defaults (10 MB, 40 megapixels) that is about 500 MB an upload, so ``max_concurrent``
times that for the whole server, beside the model.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# they name classes imported inside create_app.
import asyncio
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import jinja2
import numpy as np
from PIL import Image

from imgtune.errors import ImgtuneError, describe
from imgtune.serve.batcher import MAX_BATCH, MAX_WAIT, MicroBatcher
from imgtune.serve.uploads import (
    MAX_BYTES,
    MAX_PIXELS,
    BodyLimit,
    LoopbackHostOnly,
    RequestError,
    decode_upload,
    is_loopback,
)
from imgtune.system import usable_cores

TIMEOUT = 30.0

#: Seconds a client told the server is busy (503) should wait before it tries again.
RETRY_AFTER = 1


class Demo:
    """The loaded model, shared by every request: prediction (ONNX or PyTorch) and Grad-CAM (PyTorch)."""

    def __init__(self, run_dir: str | Path, *, backend: str = "auto", device: str = "cpu", int8: bool = False,
                 tta: str | None = None, max_batch: int = MAX_BATCH, batch_wait: float = MAX_WAIT):
        from imgtune.deploy.predict import Predictor, load_predictor
        from imgtune.explain.interpret import Interpretation

        self.run_dir = Path(run_dir)
        self.predictor = load_predictor(self.run_dir, backend=backend, device=device, int8=int8, tta=tta)
        self.torch = self.predictor if isinstance(self.predictor, Predictor) else Predictor.load(self.run_dir,
                                                                                                 device=device)
        self.explainer = Interpretation.for_model(self.torch)
        self.meta = self.predictor.meta
        self.classes = self.predictor.classes
        # Grad-CAM hooks the model's layer; a forward pass of another request meanwhile would be
        # captured too, so every use of the PyTorch model holds this lock. ONNX Runtime sessions are
        # safe to run from several threads.
        self.lock = threading.Lock()
        self.batcher = (MicroBatcher(self.batch_probabilities, max_batch=max_batch, max_wait=batch_wait)
                        if max_batch > 1 else None)

    def info(self) -> dict:
        """What ``/api/model`` answers: the run's name, architecture, classes, input and metrics."""
        meta = self.meta
        return dict(name=self.run_dir.resolve().name, arch=meta.get("arch") or meta.get("timm_name"),
                    timm_name=meta.get("timm_name"), classes=self.classes, size=meta.get("size"),
                    resize=meta.get("resize", "crop"), metrics=meta.get("metrics", {}),
                    backend="onnx" if self.predictor is not self.torch else "torch")

    def batch_probabilities(self, pictures: list) -> np.ndarray:
        """Class probabilities (a row each, with the predictor's test-time augmentation) of pictures
        already preprocessed by ``predictor.transform``, in one model call: what a batch runs."""
        import torch

        if self.predictor is self.torch:
            with self.lock:
                return self.predictor.probs_of(torch.stack(pictures)).numpy()
        return self.predictor.probs_of(torch.stack(pictures)).numpy()

    def predict(self, image: Image.Image, *, top_k: int, cam: bool) -> dict:
        """The top ``top_k`` classes of ``image`` alone and, with ``cam``, its Grad-CAM overlay as a data URI."""
        started = time.perf_counter()
        if self.predictor is self.torch:
            with self.lock:
                probs = self.predictor.predict([image]).probs[0]
        else:
            probs = self.predictor.predict([image]).probs[0]
        overlay = self._cam(image, int(probs.argmax())) if cam else None
        return {**self.answer(probs, top_k=top_k, batch=1), "seconds": time.perf_counter() - started, "cam": overlay}

    def answer(self, probs: np.ndarray, *, top_k: int, batch: int) -> dict:
        """The JSON answer for one image's row of probabilities (``seconds`` and ``cam`` are the caller's)."""
        from imgtune.deploy.predict import Prediction

        ranked = Prediction(self.classes, probs[None]).top_k(top_k)[0]
        return dict(labels=[dict(label=label, probability=p) for label, p in ranked], top=ranked[0][0],
                    batch=batch, cam=None)

    def classify_upload(self, upload: BinaryIO, *, max_pixels: int, top_k: int, cam: bool,
                        deadline: float | None = None) -> dict:
        """Read, decode and classify an uploaded file: what one worker does for ``POST /api/predict``.

        Without ``cam`` and with a batcher, the picture is preprocessed here and joins the next batch
        (see :mod:`imgtune.serve.batcher`); with ``cam``, or ``max_batch`` 1, it is classified alone.

        Args:
            upload: the uploaded file (read from its current position).
            max_pixels: the most pixels the image may have, read from its header before decoding.
            top_k: how many classes to return.
            cam: whether to add the Grad-CAM overlay.
            deadline: the ``time.monotonic()`` time the request times out at: a picture still queued
                for a batch then leaves the queue (``None``: no limit).

        Returns:
            What :meth:`predict` returns, with ``seconds`` counted from the start of decoding.

        Raises:
            RequestError: an image the demo refuses (see :func:`imgtune.serve.uploads.decode_upload`).
            TimeoutError: the picture was still waiting for its batch at ``deadline``.
        """
        started = time.perf_counter()
        if cam or self.batcher is None:
            image = decode_upload(upload.read(), max_pixels=max_pixels)
            answer = self.predict(image, top_k=top_k, cam=cam)
        else:
            def prepare():
                return self.predictor.transform(decode_upload(upload.read(), max_pixels=max_pixels))

            probs, batch = self.batcher.run(prepare, deadline=deadline)
            answer = self.answer(probs, top_k=top_k, batch=batch)
        return {**answer, "seconds": time.perf_counter() - started}

    def close(self) -> None:
        """Stop the batching thread (after the pictures it holds): the app's shutdown."""
        if self.batcher is not None:
            self.batcher.close()

    def _cam(self, image: Image.Image, class_index: int) -> str:
        x = self.explainer.input_tensor(image)  # transformed once for Grad-CAM and the overlay
        with self.lock:
            heatmap = self.explainer.grad_cam(x, class_index)
        buffer = io.BytesIO()
        self.explainer.overlay(x, heatmap).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(run_dir: str | Path, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               timeout: float = TIMEOUT, backend: str = "auto", max_concurrent: int | None = None,
               host: str | None = None, device: str = "cpu", int8: bool = False, tta: str | None = None,
               max_batch: int = MAX_BATCH, batch_wait: float = MAX_WAIT):
    """The demo app for the model bundle in ``run_dir``.

    Args:
        run_dir: a folder written by ``imgtune train`` (or ``Learner.save``).
        max_bytes: the largest request body accepted (413 above).
        max_pixels: the most pixels an image may have, checked from its header (413 above).
        timeout: seconds decoding and classifying one upload may take (504 after).
        backend: ``auto``, ``torch`` or ``onnx``, as for :func:`imgtune.deploy.predict.load_predictor`.
        device: where the model runs (and Grad-CAM): ``cpu``, ``cuda`` or ``mps``.
        max_concurrent: uploads decoded and classified at once (503 with ``Retry-After`` above);
            ``None``: twice the usable CPU cores.
        host: the address the server listens on. A loopback one (``127.0.0.1``, ``::1``,
            ``localhost``) makes the app refuse requests for any other host name (421); ``None``
            (serving it yourself, behind a proxy that sets its own ``Host``) or ``0.0.0.0`` checks nothing.
        int8: predict with the bundle's ``model.int8.onnx`` on ONNX Runtime (Grad-CAM stays float).
        tta: ``"flip"`` or ``"none"``, as for ``load_predictor``; ``None``: the bundle's own.
        max_batch: the most pictures classified in one model call (requests without Grad-CAM);
            1 classifies each request alone. Batches are also bounded by ``max_concurrent``.
        batch_wait: seconds the first picture of a batch waits for others to join it.

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

    demo = Demo(run_dir, backend=backend, device=device, int8=int8, tta=tta, max_batch=max_batch,
                batch_wait=batch_wait)
    n_classes = len(demo.classes)
    max_concurrent = max_concurrent or 2 * usable_cores()
    # As many threads as slots: an admitted upload starts at once, so its timeout measures its own work.
    workers = ThreadPoolExecutor(max_concurrent, thread_name_prefix="imgtune-serve")
    slots = threading.BoundedSemaphore(max_concurrent)

    class Problem(BaseModel):
        detail: str

    class Label(BaseModel):
        label: str
        probability: float

    class PredictResult(BaseModel):
        labels: list[Label]
        top: str
        seconds: float
        batch: int = 1  # how many images shared the model call
        cam: str | None = None

    problems = {status: {"model": Problem, "description": text} for status, text in [
        (400, "empty, truncated or undecodable image"), (413, "body or image too large"),
        (415, "not an allowed image format"), (421, "a host name other than loopback's (server on loopback)"),
        (422, "missing field or bad query"), (503, "busy: max_concurrent uploads in work; see Retry-After"),
        (504, "decoding and inference timed out")]}

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the demo works offline.
    @asynccontextmanager
    async def lifespan(app):
        yield
        demo.close()  # the batching thread ends with the server (it is a daemon thread where no lifespan runs)

    app = FastAPI(title=f"imgtune demo: {demo.info()['name']}", version=_version(), docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.demo = demo
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    if host is not None and is_loopback(host):
        app.add_middleware(LoopbackHostOnly)  # added last, so it runs first: before any body is read

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in error.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return JSONResponse({"detail": error.detail}, status_code=error.status, headers=error.headers)

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
        if not slots.acquire(blocking=False):
            raise RequestError(503, f"the server is busy ({max_concurrent} images in work); try again in "
                                    f"{RETRY_AFTER} s", headers={"Retry-After": str(RETRY_AFTER)})
        try:
            # Not later than the 504 below: a batch formed after it leaves this picture out.
            deadline = time.monotonic() + timeout
            job = workers.submit(demo.classify_upload, file.file, max_pixels=max_pixels, top_k=top_k, cam=cam,
                                 deadline=deadline)
        except BaseException:
            slots.release()
            raise
        # Released when the work really ends, in the worker, not when the request times out: an
        # abandoned decode still holds its memory, and the cap is on that.
        job.add_done_callback(lambda _: slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), timeout)
        except (asyncio.TimeoutError, TimeoutError):  # the event loop's, or the batch queue's in the worker
            raise RequestError(504, f"decoding and classifying took longer than the limit of {timeout:g} s") from None
        except RequestError:
            raise
        except Exception as error:  # never a 5xx with a traceback: the image is what made it fail
            raise RequestError(400, f"cannot classify this image ({describe(error)})") from None

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
