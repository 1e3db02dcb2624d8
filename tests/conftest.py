"""Tiny image folders made on the fly, and a tiny learner that learns them in a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def noisy_image(colour, size: int = 32, seed: int = 0) -> Image.Image:
    """A square of ``colour`` with noise, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def make_class_folders(root: Path, n: int = 8, size: int = 32, colours=COLOURS, ext: str = ".png") -> Path:
    """``root/<class>/<class>_<i><ext>``: one folder per colour class."""
    for k, (name, colour) in enumerate(colours.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noisy_image(colour, size, seed=100 * k + i).save(root / name / f"{name}_{i}{ext}")
    return root


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's cache or reaches the network for weights."""
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run tiny models on one CPU thread: they gain nothing from more, and on a busy machine the
    threads' barriers cost far more than the work (50x slower seen on 2 shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 colour classes x 8 noisy 32x32 PNG images, one folder per class."""
    return make_class_folders(tmp_path / "colours")


@pytest.fixture
def tiny_data(image_folder):
    from imgtune import load_data

    return load_data(image_folder, valid_pct=0.25, stratify=True, seed=0)


def chromium_or_skip(*modules: str) -> str:
    """Debian's Chromium for a browser test, with Playwright (and ``modules``) importable.

    Skips with the reason when they are missing; fails instead where ``IMGTUNE_REQUIRE_BROWSER`` is set
    (CI installs the browser, so there a missing one is a broken setup, not a reason to skip).
    """
    import importlib
    import os
    import shutil

    path = os.environ.get("IMGTUNE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        for module in ("playwright.sync_api", *modules):
            importlib.import_module(module)
    except ImportError:
        path = None
    if not path:
        message = "no Chromium and Playwright here (apt-get install chromium; pip install -e '.[dev]')"
        if os.environ.get("IMGTUNE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return path



#: Chromium switches for a headless run in a container: no sandbox (root), no GPU, no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def launch_chromium(playwright, executable: str):
    """Debian's Chromium (from :func:`chromium_or_skip`) started headless by Playwright."""
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)

TINY = dict(arch="test_efficientnet", weights="none", size=32, bs=6, num_workers=0, progress=False, device="cpu")


@pytest.fixture
def tiny_learner(tiny_data):
    """A randomly initialised tiny EfficientNet on the colour folders (CPU, no loader processes)."""
    from imgtune import Learner

    return Learner.from_data(tiny_data, **TINY)


def train_colour_run(root: Path) -> Path:
    """``root/run``: the bundle of a tiny model trained one epoch on colour folders made under ``root``."""
    from imgtune import Learner, load_data

    data = load_data(make_class_folders(root / "colours"), valid_pct=0.25, stratify=True, seed=0)
    learner = Learner.from_data(data, **TINY)
    learner.fit_one_cycle(1, 1e-2)
    learner.save(root / "run", metrics={"valid_accuracy": 0.75})
    return root / "run"


def serve_in_thread(app):
    """Serve an ASGI app with uvicorn on a free loopback port, in a background thread: a generator for
    a fixture (``yield from serve_in_thread(app)``) that yields the app's URL and stops it afterwards."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


def http_reply(handler, status: int, body: bytes = b"", headers=(), *, length: bool = True) -> None:
    """Answer a test server's request (a BaseHTTPRequestHandler): status, headers, an optional
    Content-Length and the body; a client that hung up is not an error of the server's."""
    handler.send_response(status)
    for key, value in headers:
        handler.send_header(key, value)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass


def http_trickle(handler, length: int, every: float = 0.1) -> None:
    """Answer 200 with ``length`` bytes sent one at a time, ``every`` seconds apart: a server that is
    never quiet for a whole timeout, yet never done (until the client gives up)."""
    import time

    handler.send_response(200)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()
    for _ in range(length):
        try:
            handler.wfile.write(b"x")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        time.sleep(every)


def watch_page(page, errors: list, requests: list | None = None) -> None:
    """Collect a browser page's console errors and uncaught exceptions into ``errors`` (and the URL of
    every request it makes into ``requests``)."""
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    if requests is not None:
        page.on("request", lambda r: requests.append(r.url))


class Crash(Exception):
    """A simulated kill: raised by :class:`CrashAfter` once a given epoch's checkpoint is written."""


class CrashAfter:
    """A callback that raises :class:`Crash` after ``phase`` epoch ``epoch`` (the checkpoint callback,
    earlier in the list, has written that epoch's checkpoint by then)."""

    def __init__(self, phase, epoch):
        self.phase, self.epoch = phase, epoch

    def after_epoch(self, learner):
        if (learner.phase, learner.epoch) == (self.phase, self.epoch):
            raise Crash
