"""Download images from a list of URLs into class folders: checked, deduplicated and resumable.

``download_images("urls.txt", "data/bears/grizzly")`` fetches every URL of a text file (one a line) into one
folder; ``download_images("photos.csv", "data/bears")`` reads a CSV of ``url,label`` into one folder per
label. Each body comes through the shared client (:mod:`imgtune.http_client`: retries, checked
redirects, timeouts) streamed with a size cap, must decode as an image (the extension and the
Content-Type are not trusted), and is skipped when its bytes equal a file already there.

A manifest, ``.imgtune-downloads.json`` in the destination, maps every URL tried to its file or to
why it failed, so a second run fetches only what is still missing: URLs that failed for good (a
404, not an image, too large, a redirect loop, a duplicate) are not tried again unless
``retry_failed``; those that may work later (a timeout, a refused connection, a 5xx, too slow, a file
that could not be saved) are. Whatever goes wrong with one URL is recorded as its failure: the other
URLs still download.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import threading
import time
import unicodedata
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imgtune.errors import ImgtuneError, UnreadableImageError
from imgtune.files import atomic_write
from imgtune.http_client import FetchError, HttpClient

MANIFEST = ".imgtune-downloads.json"
MAX_BYTES = 20_000_000
#: The longest file or folder name made from a URL or a label, in UTF-8 bytes: most file systems
#: allow 255, and the temporary file of an atomic write adds a dot and about 14 bytes.
MAX_NAME_BYTES = 200
#: The file extension given to each decoded format; the URL's own extension is not trusted.
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
#: Names Windows refuses whatever the extension.
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
#: Asked of every server; any answer is checked by decoding it.
ACCEPT = "image/*,*/*;q=0.5"


@dataclass
class DownloadReport:
    """What one run did. ``failed`` maps URL -> reason; ``duplicates`` maps URL -> the file it equals."""

    dest: Path
    downloaded: dict[str, Path] = field(default_factory=dict)
    already: int = 0  # URLs the manifest says were done before (not fetched again)
    duplicates: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines: counts, then the failures grouped by reason."""
        lines = [f"{len(self.downloaded)} downloaded, {len(self.duplicates)} duplicates skipped, "
                 f"{len(self.failed)} failed, {self.already} done before (see {self.dest / MANIFEST})"]
        by_reason: dict[str, list[str]] = {}
        for url, reason in self.failed.items():
            by_reason.setdefault(_reason_kind(reason), []).append(url)
        for kind, urls in sorted(by_reason.items(), key=lambda pair: -len(pair[1])):
            lines.append(f"  {len(urls)} {kind}: {', '.join(urls[:3])}{' ...' if len(urls) > 3 else ''}")
        return "\n".join(lines)


def read_sources(source: str | Path) -> list[tuple[str, str | None]]:
    """``(url, label)`` pairs from a text file of URLs (label ``None``) or a CSV with ``url,label`` columns.

    A file whose first line names a ``url`` column is read as a CSV; blank lines and ``#`` comments
    of a text file are ignored.
    """
    source = Path(source)
    if not source.is_file():
        raise ImgtuneError(f"{source}: no such file; give a text file of URLs or a CSV of url,label")
    text = source.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0].strip().lower() if text.strip() else ""
    if "," in first and "url" in [c.strip() for c in first.split(",")]:
        reader = csv.DictReader(text.splitlines())
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "label" not in columns:
            raise ImgtuneError(f"{source}: a CSV needs the columns url,label; found {columns}")
        pairs = []
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("url") or not row.get("label"):
                raise ImgtuneError(f"{source}:{reader.line_num}: empty url or label")
            pairs.append((row["url"], row["label"]))
    else:
        pairs = [(line.strip(), None) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not pairs:
        raise ImgtuneError(f"{source}: no URLs in this file")
    for url, _ in pairs:
        try:
            scheme = urllib.parse.urlsplit(url).scheme
        except ValueError as error:  # e.g. http://[::1/x
            raise ImgtuneError(f"{source}: {url!r} is not a valid URL ({error})") from None
        if scheme not in ("http", "https"):
            raise ImgtuneError(f"{source}: {url!r} is not an http(s) URL")
    return pairs


def safe_name(text: str, *, max_length: int = 80, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file or folder name that every OS accepts: letters and digits (any script, NFC), ``._-``, not
    a name Windows reserves, at most ``max_length`` characters and ``max_bytes`` bytes of UTF-8 (file
    systems count bytes: 80 Chinese characters are 240). A longer name is cut at a character, keeping
    its extension."""
    text = unicodedata.normalize("NFC", urllib.parse.unquote(text))
    name = _cut(re.sub(r"[^\w.-]+", "_", text).strip("._ "), max_length, max_bytes)
    if not name or name.split(".")[0].lower() in RESERVED:
        name = f"_{name}" if name else "image"
    return name


def _cut(name: str, max_length: int, max_bytes: int) -> str:
    """``name`` cut to ``max_length`` characters and ``max_bytes`` UTF-8 bytes, its extension (up to 16
    characters after the last dot) kept whole."""
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > 16:
        stem, extension = name, ""
    else:
        extension = f".{extension}"
    room = max_bytes - len(extension.encode())
    # A cut in the middle of a character's bytes drops that character ("ignore").
    stem = stem[:max_length - len(extension)].encode()[:room].decode("utf-8", "ignore").rstrip("._ ")
    return f"{stem}{extension}" if stem else name[:max_length].encode()[:max_bytes].decode("utf-8", "ignore")


def download_images(
    source: str | Path,
    dest: str | Path,
    *,
    workers: int = 8,
    timeout: float = 10.0,
    deadline: float | None = None,
    retries: int = 2,
    backoff: float = 1.0,
    max_bytes: int = MAX_BYTES,
    max_redirects: int = 5,
    retry_failed: bool = False,
    refuse_private: bool = False,
    progress=None,
) -> DownloadReport:
    """Download the images listed in ``source`` into ``dest``.

    Args:
        source: a text file of URLs (all into ``dest``) or a CSV of ``url,label`` (into ``dest/<label>``).
        dest: the destination folder, created if needed.
        workers: downloads at the same time.
        timeout: seconds to connect, and between two reads of one response.
        deadline: seconds one URL may take, tries and waits included, however slowly its bytes come
            (default: ten times ``timeout``); then it fails as ``too slow`` (tried again next run).
        retries: further tries after a timeout, a connection error, a 429 or a 5xx answer, waiting
            ``backoff * 2**try`` seconds (or the server's Retry-After, up to 30 s) in between.
        max_bytes: a larger body is refused (from Content-Length, or as it streams).
        max_redirects: redirects followed at most; a redirect back to a URL seen before is a loop.
        retry_failed: try again the URLs that failed for good in an earlier run.
        refuse_private: refuse URLs and redirects to hosts on loopback, private or link-local addresses
            (for URL lists from the web; off by default so that local servers work).
        progress: called with ``(url, outcome)`` after each URL, e.g. to update a progress bar.

    Returns:
        A :class:`DownloadReport`; the manifest in ``dest`` is updated after every URL. An error while
        fetching, decoding or saving one URL is that URL's failure; an unexpected one (a bug) is
        recorded with its exception type, e.g. ``unexpected error (ValueError: ...)``, for good.
    """
    pairs = read_sources(source)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ImgtuneError(f"{dest}: exists and is not a folder; choose another `dest`")
    dest.mkdir(parents=True, exist_ok=True)
    store = _Store(dest)
    report = DownloadReport(dest)
    todo = []
    for url, label in dict(pairs).items():  # a URL listed twice is fetched once
        done = store.manifest.get(url)
        if done and ("file" in done or "duplicate_of" in done or (done.get("error") and not done.get("transient")
                                                                    and not retry_failed)):
            report.already += 1
            continue
        todo.append((url, label))
    client = HttpClient(timeout=timeout, deadline=deadline, retries=retries, backoff=backoff,
                        max_redirects=max_redirects, refuse_private=refuse_private, pool_size=max(1, workers),
                        headers={"Accept": ACCEPT})

    def one(pair):
        url, label = pair
        try:
            outcome = store.add(url, client.get(url, max_bytes=max_bytes), label)
        except FetchError as error:
            outcome = store.fail(url, error)
        except OSError as error:  # saving: a full disk, a name the file system refuses, no permission
            outcome = store.fail(url, FetchError(f"could not save ({type(error).__name__}: {error})", True))
        except Exception as error:  # noqa: BLE001 -- one URL's bug must not end the run; its type is recorded
            outcome = store.fail(url, FetchError(f"unexpected error ({type(error).__name__}: {error})"))
        if progress:
            progress(url, outcome)
        return url, outcome

    try:
        with client, ThreadPoolExecutor(max(1, workers)) as pool:
            for url, outcome in pool.map(one, todo):
                if "file" in outcome:
                    report.downloaded[url] = dest / outcome["file"]
                elif "duplicate_of" in outcome:
                    report.duplicates[url] = outcome["duplicate_of"]
                else:
                    report.failed[url] = outcome["error"]
    finally:
        store.finish()
    return report


class _Store:
    """The destination folder and its manifest; every change is made under one lock."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.path = dest / MANIFEST
        self.lock = threading.Lock()
        self.saved_at = 0.0
        try:
            self.manifest = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError as error:
            raise ImgtuneError(f"{self.path}: not valid JSON ({error}); move it away to start afresh") from None
        # The content hash of every image already in dest, so that a copy is never saved twice.
        self.hashes = {entry["sha256"]: entry["file"] for entry in self.manifest.values() if "sha256" in entry}
        known = set(self.hashes.values())
        for path in sorted(dest.rglob("*")):
            relative = path.relative_to(dest).as_posix()
            if path.is_file() and not path.name.startswith(".") and relative not in known:
                self.hashes.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), relative)

    def add(self, url: str, data: bytes, label: str | None) -> dict:
        from imgtune.data.images import decode_image

        try:
            decode_image(data)
        except UnreadableImageError as error:
            raise FetchError(f"not an image ({error})") from None
        digest = hashlib.sha256(data).hexdigest()
        extension = EXTENSIONS.get(_format_of(data), ".img")
        folder = self.dest / safe_name(label) if label is not None else self.dest
        # Room for the extension and a "-<n>" that tells two files of one name apart.
        stem = safe_name(Path(urllib.parse.urlsplit(url).path).stem,
                         max_bytes=MAX_NAME_BYTES - len(extension) - 8) or "image"
        with self.lock:
            if digest in self.hashes:
                return self._record(url, {"duplicate_of": self.hashes[digest]})
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stem}{extension}"
            n = 1
            while path.exists() or path.is_symlink():
                path, n = folder / f"{stem}-{n}{extension}", n + 1
            atomic_write(path, data)  # the name was checked free under the lock
            relative = path.relative_to(self.dest).as_posix()
            self.hashes[digest] = relative
            return self._record(url, {"file": relative, "sha256": digest})

    def fail(self, url: str, error: FetchError) -> dict:
        with self.lock:
            return self._record(url, {"error": error.reason, "transient": error.transient})

    def _record(self, url: str, outcome: dict) -> dict:
        """Called under the lock."""
        self.manifest[url] = outcome
        # Saved at most every 2 s (and at the end): rewriting a manifest of 10,000 URLs after each is slow.
        if time.monotonic() - self.saved_at > 2.0:
            self._save()
        return outcome

    def finish(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        self.saved_at = time.monotonic()
        atomic_write(self.path, json.dumps(self.manifest, indent=1, sort_keys=True))  # never half a manifest


def _format_of(data: bytes) -> str:
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(data)) as image:
        return image.format or ""


def _reason_kind(reason: str) -> str:
    """The reason without its details, to group failures: ``HTTP 404 Not Found``, ``timed out``, ..."""
    if reason.startswith("HTTP"):
        return reason
    return reason.split(" (")[0].split(" after ")[0]
