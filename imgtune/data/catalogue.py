"""The catalogue of named datasets: where each comes from, how it is verified, whether it works offline."""

from __future__ import annotations

import hashlib
import importlib.util
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from imgtune.data.sources import PETS_LABEL_RE, Item, ItemList, items_from_name_re
from imgtune.data.cache import default_cache_dir
from imgtune.errors import ImgtuneError
from imgtune.files import atomic_write
from imgtune.progress import progress_bar

DEFAULT = "elpv"


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset. ``load(data_dir)`` returns its items; ``available()`` says if that works offline now."""

    name: str
    description: str
    source: str
    license: str
    load: Callable[[Path | None], ItemList]
    available: Callable[[], bool]

    def items(self, data_dir: str | Path | None = None) -> ItemList:
        return self.load(Path(data_dir) if data_dir is not None else None)


# --- ELPV: solar cells, shipped inside a PyPI package -------------------------------------------

#: Annotated defect probabilities and the class names we give them, in order of severity.
ELPV_CLASSES = {0.0: "functional", 1 / 3: "possibly_defective", 2 / 3: "likely_defective", 1.0: "defective"}
ELPV_BINARY = ("functional", "defective")


def _elpv_root() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise ImgtuneError("the elpv dataset needs the package elpv-dataset: pip install elpv-dataset")
    return Path(spec.origin).parent / "data"


def _elpv_rows(data_dir: Path | None) -> list[tuple[Path, float, str]]:
    root = data_dir or _elpv_root()
    labels = root / "labels.csv"
    if not labels.is_file():
        raise ImgtuneError(f"{labels}: not found; `data_dir` must be the folder holding labels.csv and images/")
    rows = []
    for line in labels.read_text().splitlines():
        if line.strip():
            name, probability, kind = line.split()
            rows.append((root / name, float(probability), kind))
    return rows


def _elpv_class(probability: float) -> str:
    nearest = min(ELPV_CLASSES, key=lambda p: abs(p - probability))
    return ELPV_CLASSES[nearest]


def load_elpv(data_dir: Path | None = None) -> ItemList:
    rows = _elpv_rows(data_dir)
    items = [Item(path, _elpv_class(p)) for path, p, _ in rows]
    return ItemList(items, classes=list(ELPV_CLASSES.values()), description="elpv: solar cells, 4 defect levels")


def load_elpv_binary(data_dir: Path | None = None) -> ItemList:
    rows = _elpv_rows(data_dir)
    items = [Item(path, ELPV_BINARY[p >= 0.5]) for path, p, _ in rows]
    return ItemList(items, classes=list(ELPV_BINARY), description="elpv-binary: solar cells, functional vs defective")


# --- Oxford-IIIT Pet: downloaded once into the cache ---------------------------------------------

PETS_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz"
PETS_MD5 = "5c4f3ee8e5d25df40f4fd59a7f44e54c"


def load_pets(data_dir: Path | None = None) -> ItemList:
    if data_dir is not None:
        folder = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
        if not folder.is_dir():
            raise ImgtuneError(f"{data_dir}: not a folder; `data_dir` must hold the pet images (or images/)")
    else:
        folder = download_and_extract(PETS_URL, PETS_MD5, default_cache_dir() / "pets") / "images"
    found = items_from_name_re(folder, PETS_LABEL_RE)
    found.description = f"pets: Oxford-IIIT Pet breeds from {folder}"
    return found


def download_and_extract(url: str, md5: str, dest: Path, *, timeout: float = 10.0) -> Path:
    """Download a tar archive (resuming a partial download), verify its MD5 and extract it once.

    Returns ``dest``, which holds the extracted archive; a marker file records a finished extraction
    so later calls return at once.
    """
    done = dest / ".extracted"
    if done.is_file() and done.read_text().strip() == md5:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / Path(urlparse(url).path).name
    if not (archive.is_file() and file_md5(archive) == md5):
        download(url, archive, timeout=timeout)
        digest = file_md5(archive)
        if digest != md5:
            archive.replace(archive.with_suffix(archive.suffix + ".bad"))
            raise ImgtuneError(f"{url}: checksum mismatch (md5 {digest}, expected {md5}); run again to re-download")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    atomic_write(done, md5)
    return dest


def download(url: str, target: Path, *, timeout: float = 10.0, chunk: int = 1 << 20) -> None:
    """Download ``url`` to ``target``, resuming from ``target.part`` with an HTTP Range request.

    Args:
        url: an http(s) URL (redirects are followed, at most 5).
        target: the file to create; ``target.part`` holds what arrived so far.
        timeout: seconds to connect, and between two reads.
        chunk: bytes written at a time.

    Raises:
        ImgtuneError: the server answered with an error, cannot be reached, or the download broke
            off (the ``.part`` file is kept, so the next call resumes).
    """
    from imgtune.http_client import FetchError, HttpClient  # urllib3 loads only when something downloads

    part = target.with_suffix(target.suffix + ".part")
    offset = part.stat().st_size if part.exists() else 0
    # No retries: a broken download is resumed by the next call, and an offline one should fail quickly.
    with HttpClient(timeout=timeout, retries=0) as client:
        try:
            with client.open(url, headers={"Range": f"bytes={offset}-"} if offset else None) as response:
                _save_body(client, response, url, part, offset, chunk)
        except FetchError as error:
            if error.status == 416 and offset:  # the part file is already complete
                part.replace(target)
                return
            if error.status is not None:
                raise ImgtuneError(f"{url}: download failed (HTTP {error.status})") from None
            raise ImgtuneError(f"cannot download {url} ({error.detail}); offline, pass `data_dir=DIR` pointing at "
                               "a local copy of the images") from None
    part.replace(target)


def _save_body(client, response, url: str, part: Path, offset: int, chunk: int) -> None:
    """Append the body of ``response`` (from :class:`imgtune.http_client.HttpClient`) to ``part`` (a 206
    answer to a Range) or write it afresh (a 200: the server ignores Ranges)."""
    from imgtune.http_client import FetchError

    resumed = bool(offset) and response.status == 206
    length = response.headers.get("Content-Length")
    expected = None if length is None else int(length) + (offset if resumed else 0)
    # Megabytes, for a download of hundreds of them (the pets archive: 790 MB).
    bar = progress_bar(None if expected is None else expected / 1e6, desc=f"download {part.stem}",
                       unit="MB")
    bar.update(offset / 1e6 if resumed else 0)
    try:
        with open(part, "ab" if resumed else "wb") as out:
            for block in client.chunks(response, chunk):
                out.write(block)
                bar.update(len(block) / 1e6)
    except OSError as error:  # writing, not reading
        raise ImgtuneError(f"{url}: download interrupted ({error}); run again to resume it") from None
    except FetchError as error:
        # What arrived stays in the .part file, so that the next run resumes instead of starting over.
        if expected is None:
            raise ImgtuneError(f"{url}: download interrupted ({error.reason}); run again to resume it") from None
    finally:
        bar.close()
    received = part.stat().st_size
    if expected is not None and received < expected:
        raise ImgtuneError(
            f"{url}: download interrupted after {received} of {expected} bytes; run again to resume it"
        )


def file_md5(path: Path) -> str:
    """The MD5 of a file's bytes, as 32 hex digits (read a megabyte at a time)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_present(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


def _pets_cached() -> bool:
    return (default_cache_dir() / "pets" / ".extracted").is_file()


CATALOGUE: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "elpv",
            "2,624 electroluminescence images of solar cells (300x300, grey), 4 defect levels",
            "PyPI package elpv-dataset (embedded, offline)",
            "CC BY-NC-SA 4.0",
            load_elpv,
            _package_present("elpv_dataset"),
        ),
        DatasetInfo(
            "elpv-binary",
            "the same solar cells as 2 classes: functional vs defective (defect probability >= 0.5)",
            "PyPI package elpv-dataset (embedded, offline)",
            "CC BY-NC-SA 4.0",
            load_elpv_binary,
            _package_present("elpv_dataset"),
        ),
        DatasetInfo(
            "pets",
            "Oxford-IIIT Pet: 7,390 photos of 37 cat and dog breeds, breed from the file name",
            f"downloaded once from {PETS_URL} (or --data-dir)",
            "CC BY-SA 4.0",
            load_pets,
            _pets_cached,
        ),
    ]
}


def get(name: str) -> DatasetInfo:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ImgtuneError(f"unknown dataset {name!r}; known: {', '.join(CATALOGUE)}") from None
