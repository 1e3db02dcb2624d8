"""Clean a dataset by hand: a local page of the images a model finds most suspicious, to keep, relabel or quarantine.

``create_app(data)`` ranks every readable image by how unlikely its label is, either out of fold
(:mod:`imgtune.curate.mislabel`, on frozen ImageNet features) or, with ``run_dir``, by a trained model's
loss, and serves a FastAPI app (meant for 127.0.0.1 only):

- ``GET /``: the page; ``GET /api/items``: the images in suspicion order; ``GET /api/image?path=``:
  a thumbnail;
- ``POST /api/keep``, ``/api/relabel``, ``/api/quarantine`` with ``{"path": ..., "label": ...}``;
- ``POST /api/undo``: undo the latest change; ``GET /api/log``: the changes not undone.

Relabelling moves the file to the other class folder (class-folder data) or rewrites its CSV row
(CSV data); quarantining moves it beside the data, as ``imgtune doctor --fix`` does. Every change
goes to the same log (:class:`imgtune.curate.changelog.ChangeLog`), so ``imgtune doctor --undo`` undoes it too.
A path from the page is refused unless it names, inside the data folder and without leaving it
through ``..``, an absolute path or a symlink, one of the images being cleaned.

No other web page can drive the server or see its images (:func:`refusal`): every API request needs
the session's random token, which only the page holds, in a custom header; requests from another
site or origin are refused; and only the host names 127.0.0.1 and localhost are served.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time.
import csv
import io
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from imgtune.curate.changelog import ChangeLog, free_name, move_file, quarantine, set_csv_label, undo
from imgtune.curate.doctor import data_root
from imgtune.curate.pages import render
from imgtune.errors import ImgtuneError, UnreadableImageError

THUMBNAIL = 256
#: The request header that carries the session's token (see :func:`refusal`).
TOKEN_HEADER = "X-Imgtune-Token"
#: What the page itself may fetch without a token: the page, which holds the token, and no icon.
OPEN_PATHS = ("/", "/favicon.ico")


class PathRefused(Exception):
    """A path from the page that is not one of the dataset's images; ``status`` is the HTTP answer."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Entry:
    """One image on the page: where it is now, its label, the model's view of it, and what was done."""

    path: Path  # absolute; in the quarantine folder once quarantined
    label: str
    probabilities: dict  # class -> the model's probability
    status: str = ""  # "", "kept", "relabelled" or "quarantined"

    @property
    def predicted(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def given_probability(self) -> float:
        return self.probabilities.get(self.label, 0.0)


class CleanSession:
    """The images being cleaned and every change made to them (all changes under one lock).

    Args:
        data: a folder of class folders (or of images named by ``label_re``), or with ``csv_path``
            the folder the CSV's file names are relative to.
        label_re, csv_path: as for :func:`imgtune.data.loaders.find_items`.
        run_dir: rank by this run's model (its loss on each image) instead of out-of-fold predictions.
        features: ``paths -> (N, F)`` features for the out-of-fold ranking (default: ImageNet features
            of ``arch`` with ``weights``).
        device: where the run's model runs.
    """

    def __init__(self, data, *, label_re: Optional[str] = None, csv_path=None, run_dir=None,
                 features: Optional[Callable] = None, arch: Optional[str] = None, weights: str = "imagenet",
                 device: str = "cpu"):
        from imgtune.data.loaders import check_images, find_items

        root = data_root(data, csv_path)
        if root is None:
            from imgtune.data.catalogue import CATALOGUE

            why = "a named dataset is read-only" if str(data) in CATALOGUE else "no such folder"
            raise ImgtuneError(f"{data}: {why}; clean needs a folder of images (or one with `csv_path`)")
        self.root, self.log = root, ChangeLog(root)
        self.csv_path = Path(csv_path).resolve() if csv_path is not None else None
        self.mode = "csv" if csv_path is not None else "names" if label_re else "folders"
        found = find_items(data, label_re=label_re, csv_path=csv_path)
        items, _ = check_images(found.items)
        if len({item.label for item in items}) < 2:
            raise ImgtuneError(f"{data}: needs readable images of at least two classes to rank")
        self.classes = sorted({item.label for item in items})
        # Where the class folder sits below the data folder: second under train/ and valid/, else first.
        self.class_at = 1 if self.mode == "folders" and any(item.split for item in items) else 0
        scored = _score_with_run(items, run_dir, device) if run_dir else _score_out_of_fold(items, features, arch,
                                                                                             weights)
        scored.sort(key=lambda entry: entry.given_probability)
        self.entries = scored
        self.csv_files = self._csv_files() if self.mode == "csv" else {}
        kept = {self.log.absolute(c["file"]) for b in self.log.batches() for c in b["changes"] if c["op"] == "keep"}
        for entry in self.entries:
            if entry.path.resolve() in kept:
                entry.status = "kept"
        self.lock = threading.Lock()

    # --- what the page sees ---------------------------------------------------------------------

    def items(self) -> list:
        """The entries for the page, most suspicious first."""
        return [dict(path=self._shown(e.path), label=e.label, predicted=e.predicted,
                     probability=round(e.probabilities[e.predicted], 4),
                     given_probability=round(e.given_probability, 4), status=e.status) for e in self.entries]

    def _shown(self, path: Path) -> str:
        path = path.resolve()
        if path.is_relative_to(self.root):
            return path.relative_to(self.root).as_posix()
        return self.log.relative(path)  # a quarantined file: relative to the data's parent folder

    def entry(self, relative: str) -> Entry:
        """The entry of a path from the page, after checking it stays inside the data folder.

        Raises:
            PathRefused: 400 for an absolute path, ``..`` or a symlink out; 404 for no such image.
        """
        if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative:
            raise PathRefused(400, "give the image's path relative to the data folder")
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts or relative.startswith("~") or ":" in pure.parts[0]:
            raise PathRefused(400, f"{relative}: paths must stay inside the data folder")
        full = self.root / pure
        if not full.resolve().is_relative_to(self.root) or any(
                p.is_symlink() for p in [full, *full.parents] if p.is_relative_to(self.root) and p != self.root):
            raise PathRefused(400, f"{relative}: leads outside the data folder (a symlink)")
        for entry in self.entries:
            if entry.path == full and entry.status != "quarantined":
                return entry
        raise PathRefused(404, f"{relative}: not one of the images being cleaned")

    def thumbnail(self, relative: str) -> bytes:
        """A JPEG of at most :data:`THUMBNAIL` pixels a side (the file itself is never sent)."""
        from imgtune.data.images import decode_image

        entry = self.entry(relative)
        try:
            image = decode_image(entry.path, min_size=THUMBNAIL)
        except UnreadableImageError as error:
            raise PathRefused(404, f"{relative}: {error}") from None
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    # --- changes --------------------------------------------------------------------------------

    def keep(self, relative: str) -> dict:
        with self.lock:
            entry = self.entry(relative)
            self.log.record([{"op": "keep", "file": self.log.relative(entry.path)}], "imgtune clean")
            entry.status = "kept"
            return self._result(entry)

    def relabel(self, relative: str, label: str) -> dict:
        with self.lock:
            entry = self.entry(relative)
            if label not in self.classes:
                raise PathRefused(400, f"{label!r} is not one of the classes ({', '.join(self.classes)})")
            if label == entry.label:
                raise PathRefused(400, f"{relative} is already labelled {label}")
            if self.mode == "csv":
                file = self.csv_files.get(entry.path.resolve())
                if file is None:
                    raise PathRefused(404, f"{relative}: not found in {self.csv_path.name}")
                set_csv_label(self.csv_path, file, entry.label, label)
                change = {"op": "relabel_csv", "csv": self.log.relative(self.csv_path), "file": file,
                          "old": entry.label, "new": label}
            elif self.mode == "folders":
                target = self._class_path(entry, label)
                move_file(entry.path, target)
                change = {"op": "move", "src": self.log.relative(entry.path), "dst": self.log.relative(target),
                          "label_from": entry.label, "label_to": label}
                entry.path = target
            else:
                raise PathRefused(400, "labels read from file names (--label-re) cannot be changed here; "
                                       "rename the file")
            self.log.record([change], "imgtune clean")
            entry.label, entry.status = label, "relabelled"
            return self._result(entry)

    def quarantine(self, relative: str) -> dict:
        with self.lock:
            entry = self.entry(relative)
            [change] = quarantine(self.root, [entry.path], by="imgtune clean")
            entry.path, entry.status = self.log.absolute(change["dst"]), "quarantined"
            return self._result(entry)

    def undo(self) -> dict:
        """Undo the latest logged change (from this page, another session or ``doctor --fix``)."""
        with self.lock:
            undone = undo(self.root, 1, csv_path=self.csv_path)
            for change in undone:
                self._revert(change)
            return {"undone": len(undone)}

    def _revert(self, change: dict) -> None:
        if change["op"] == "move":
            moved = self.log.absolute(change["dst"])
            for entry in self.entries:
                if entry.path == moved:
                    entry.path, entry.status = self.log.absolute(change["src"]), ""
                    entry.label = change.get("label_from", entry.label)
        elif change["op"] == "relabel_csv":
            for entry in self.entries:
                if self.csv_files.get(entry.path.resolve()) == change["file"]:
                    entry.label, entry.status = change["old"], ""
        elif change["op"] == "keep":
            for entry in self.entries:
                if entry.path.resolve() == self.log.absolute(change["file"]).resolve():
                    entry.status = ""

    def _class_path(self, entry: Entry, label: str) -> Path:
        """The same file in the class folder of ``label`` (under the same split folder, if any).

        The class folder is found by its place below the data folder, never by its name: a split
        folder, or a subfolder of a class, may be named like a class (``train/train/``).
        """
        parts = list(entry.path.relative_to(self.root).parts)
        if len(parts) < self.class_at + 2 or parts[self.class_at] != entry.label:
            raise ImgtuneError(f"{entry.path}: not in the class folder {entry.label}/ of {self.root}; "
                               "reload the page, or move the file by hand")
        parts[self.class_at] = label
        return free_name(self.root.joinpath(*parts))

    def _csv_files(self) -> dict:
        """Each image's file name as the CSV writes it, by its resolved path."""
        with open(self.csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        return {(self.root / row["file"]).resolve(): row["file"] for row in rows if row.get("file")}

    def _result(self, entry: Entry) -> dict:
        return dict(path=self._shown(entry.path), label=entry.label, status=entry.status)


def _score_out_of_fold(items, features, arch, weights) -> list:
    from functools import partial

    from imgtune.curate.mislabel import find_mislabels

    if features is None:
        from imgtune.train.features import imagenet_features

        features = partial(imagenet_features, arch=arch, weights=weights, progress=True)
    return [Entry(path=Path(s.path).resolve(), label=s.given, probabilities=s.probabilities)
            for s in find_mislabels(items, features=features)]


def _score_with_run(items, run_dir, device) -> list:
    from imgtune.data.loaders import ImageData
    from imgtune.explain.interpret import Interpretation

    labels = sorted({item.label for item in items})
    # Every image is "validation" here: the run's model scores them all, its training images too.
    data = ImageData(classes=labels, train=[], valid=list(items), description=str(run_dir))
    interp = Interpretation.from_run(run_dir, data, device=device)
    return [Entry(path=Path(path).resolve(), label=interp.classes[t],
                  probabilities=dict(zip(interp.classes, interp.probs[i].astype(float).tolist())))
            for i, (path, t) in enumerate(zip(interp.paths, interp.targets))]


def refusal(method: str, path: str, headers, token: str) -> Optional[PathRefused]:
    """Why a request is refused, or ``None``: what keeps other web pages from driving the cleaner.

    Only the page and the icon are open. Every other request needs ``token`` in :data:`TOKEN_HEADER`:
    only the page has it, and a browser sends a custom header to another origin only after a CORS
    preflight, which this app never allows; so forms, ``<img>`` and no-cors fetches from another site
    all get the same 403 (an image probe cannot tell which paths exist). Requests a browser marks as
    from another site or origin are refused even with the token; POST bodies must be JSON.

    Args:
        method, path: the request's method and URL path.
        headers: its headers (case-insensitive mapping), ``Host`` already checked to be a local name.
        token: the session's token.

    Returns:
        A :class:`PathRefused` with the HTTP status (403 or 415), or ``None`` to serve the request.
    """
    if method in ("GET", "HEAD") and path in OPEN_PATHS:
        return None
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):  # "none": typed in the address bar
        return PathRefused(403, f"refused: a request from another site ({site})")
    origin = headers.get("origin")
    if origin is not None and origin != f"http://{headers.get('host', '')}":
        return PathRefused(403, f"refused: a request from another origin ({origin})")
    given = headers.get(TOKEN_HEADER, "")
    # Bytes: compare_digest refuses str with non-ASCII characters, which a header may carry.
    if not secrets.compare_digest(given.encode("latin-1", "replace"), token.encode("ascii")):
        return PathRefused(403, f"refused: no or wrong {TOKEN_HEADER} header (use the page imgtune clean serves)")
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if method == "POST" and media_type != "application/json":
        return PathRefused(415, "send the change as JSON (Content-Type: application/json)")
    return None


def create_app(session: CleanSession):
    """The page and JSON API around ``session``; serve it on 127.0.0.1 only (see ``imgtune clean``).

    Returns:
        A ``fastapi.FastAPI`` app; ``app.state.token`` is its new random token (see :func:`refusal`).
    """
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from pydantic import BaseModel
        from starlette.middleware.trustedhost import TrustedHostMiddleware
    except ImportError:
        raise ImgtuneError("imgtune clean needs fastapi and uvicorn: pip install 'imgtune[serve]'") from None

    class Change(BaseModel):
        path: str
        label: Optional[str] = None

    app = FastAPI(title=f"imgtune clean: {session.root.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token = secrets.token_urlsafe(32)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = refusal(request.method, request.url.path, request.headers, app.state.token)
        response = (JSONResponse({"detail": refused.detail}, status_code=refused.status) if refused
                    else await call_next(request))
        # Not in another site's frame either: no clicks on the page's buttons through a disguise.
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        return response

    # Only local names: another site's page cannot reach the server through DNS rebinding. Added last,
    # so it runs first.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])

    @app.exception_handler(PathRefused)
    async def refused(request: Request, error: PathRefused):
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    @app.exception_handler(ImgtuneError)
    async def conflict(request: Request, error: ImgtuneError):
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return render("clean.html", title=session.root.name, token=app.state.token, token_header=TOKEN_HEADER)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in the browser's console

    @app.get("/api/items")
    def items() -> dict:
        with session.lock:
            return {"classes": session.classes, "mode": session.mode, "items": session.items()}

    @app.get("/api/image")
    def image(path: str = Query(...)) -> Response:
        return Response(session.thumbnail(path), media_type="image/jpeg",
                        headers={"Cache-Control": "no-store"})

    @app.post("/api/keep")
    def keep(change: Change) -> dict:
        return session.keep(change.path)

    @app.post("/api/relabel")
    def relabel(change: Change) -> dict:
        if not change.label:
            raise PathRefused(422, "give the new label")
        return session.relabel(change.path, change.label)

    @app.post("/api/quarantine")
    def to_quarantine(change: Change) -> dict:
        return session.quarantine(change.path)

    @app.post("/api/undo")
    def undo_latest() -> dict:
        return session.undo()

    @app.get("/api/log")
    def log() -> dict:
        return {"log": str(session.log.path), "batches": session.log.batches()}

    return app
