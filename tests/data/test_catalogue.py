"""The dataset catalogue: elpv from its package, pets from a local folder or a (local, test) download."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgtune.data import catalogue as datasets
from imgtune.data.loaders import load_data
from imgtune.data.catalogue import download, download_and_extract, load_elpv, load_elpv_binary
from imgtune.errors import ImgtuneError
from imgtune.data.images import load_image
from imgtune.http_client import user_agent

# The project's shared data sits beside the checkout (and beside CI's clone); never inside it.
PETS_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "oxford-pets-sample"
ELPV_CLASSES = ["functional", "possibly_defective", "likely_defective", "defective"]


def write_pet(path: Path, colour=(120, 80, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


# --- the catalogue ---------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_names():
    with pytest.raises(ImgtuneError, match="nope") as error:
        datasets.get("nope")
    for name in ["elpv", "elpv-binary", "pets"]:
        assert name in str(error.value)


def test_catalogue_entries_describe_themselves():
    assert datasets.DEFAULT in datasets.CATALOGUE
    for name, info in datasets.CATALOGUE.items():
        assert info.name == name and info.description and info.source and info.license
    assert datasets.get("elpv").available()
    assert not datasets.get("pets").available()  # the test cache is empty


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "mine"))
    assert datasets.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("IMGTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.default_cache_dir() == tmp_path / "xdg" / "imgtune"


# --- elpv (labels only: no image is decoded in these fast tests) ----------------------------------


def test_elpv_has_four_defect_levels_with_the_published_counts():
    found = load_elpv()
    assert len(found.items) == 2624
    assert found.classes == ELPV_CLASSES
    assert Counter(item.label for item in found.items) == {
        "functional": 1508, "possibly_defective": 295, "likely_defective": 106, "defective": 715,
    }
    assert all(item.split is None for item in found.items)
    assert len({item.path for item in found.items}) == 2624
    assert all(item.path.name.startswith("cell") and item.path.suffix == ".png" for item in found.items)


def test_elpv_binary_merges_the_levels_at_probability_one_half():
    found = load_elpv_binary()
    assert found.classes == ["functional", "defective"]
    assert Counter(item.label for item in found.items) == {"functional": 1508 + 295, "defective": 106 + 715}
    four = {item.path: item.label for item in load_elpv().items}
    merged = {"functional": "functional", "possibly_defective": "functional",
              "likely_defective": "defective", "defective": "defective"}  # fmt: skip
    assert all(merged[four[item.path]] == item.label for item in found.items)


def test_elpv_by_name_through_load_data():
    data = load_data("elpv", check=False, valid_pct=0.2, stratify=True, seed=0)
    assert data.classes == ELPV_CLASSES
    assert len(data.train) + len(data.valid) == 2624
    assert data.counts()["likely_defective"] == {"train": 85, "valid": 21}
    binary = load_data("elpv-binary", check=False)
    assert binary.classes == ["functional", "defective"]


def test_elpv_images_exist_and_one_loads_as_rgb():
    found = load_elpv()
    assert all(item.path.is_file() for item in found.items[:: 100])
    image = load_image(found.items[0].path)
    assert image.mode == "RGB" and image.size == (300, 300)


def test_elpv_data_dir_reads_its_labels(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "images/a.png  1.0  mono\n\nimages/b.png  0.0  poly\nimages/c.png  0.3333333333333333  mono\n"
    )
    found = load_elpv(tmp_path)
    assert [(item.path, item.label) for item in found.items] == [
        (tmp_path / "images" / "a.png", "defective"),
        (tmp_path / "images" / "b.png", "functional"),
        (tmp_path / "images" / "c.png", "possibly_defective"),
    ]
    with pytest.raises(ImgtuneError, match="`data_dir(=DIR)?`"):
        load_elpv(tmp_path / "elsewhere")


@pytest.mark.slow
def test_every_elpv_image_decodes():
    data = load_data("elpv", valid_pct=0.2, stratify=True)
    assert not data.skipped
    assert len(data.train) + len(data.valid) == 2624


# --- pets from a local folder -----------------------------------------------------------------------

PET_NAMES = ["great_pyrenees_12.jpg", "great_pyrenees_3.jpg", "Abyssinian_3.jpg", "Abyssinian_7.jpg"]


@pytest.mark.parametrize("subfolder", ["", "images"])
def test_pets_data_dir_reads_breeds_from_file_names(tmp_path, subfolder):
    for name in PET_NAMES:
        write_pet(tmp_path / subfolder / name)
    if subfolder:
        (tmp_path / "annotations").mkdir()
        write_pet(tmp_path / "annotations" / "trimap_1.png")  # not read: the images/ folder wins
    found = datasets.get("pets").items(data_dir=str(tmp_path))
    assert {item.path.name: item.label for item in found.items} == {
        "great_pyrenees_12.jpg": "great_pyrenees", "great_pyrenees_3.jpg": "great_pyrenees",
        "Abyssinian_3.jpg": "Abyssinian", "Abyssinian_7.jpg": "Abyssinian",
    }  # fmt: skip
    data = load_data("pets", data_dir=tmp_path, valid_pct=0.5, stratify=True)
    assert data.classes == ["Abyssinian", "great_pyrenees"]


def test_pets_data_dir_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(ImgtuneError, match="`data_dir(=DIR)?`"):
        load_data("pets", data_dir=tmp_path / "nope")


@pytest.mark.slow
@pytest.mark.skipif(not PETS_SAMPLE.is_dir(), reason="the Oxford pets sample is not on this machine")
def test_real_pets_sample_loads_37_breeds():
    data = load_data("pets", data_dir=PETS_SAMPLE, valid_pct=0.2, stratify=True)
    assert len(data.classes) == 37 and not data.skipped
    assert all(count == {"train": 8, "valid": 2} for count in data.counts().values())
    images, labels = next(iter(data.loaders(size=64, bs=8, num_workers=0)[1]))
    assert images.shape == (16, 3, 64, 64) and labels.max() < 37


# --- downloads from a local HTTP server -------------------------------------------------------------


def make_archive() -> bytes:
    """A tar.gz like the pets one: images/<breed>_<n>.jpg, plus noise so it is some tens of kB."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        members = {f"images/{name}": _jpeg_bytes(i) for i, name in enumerate(PET_NAMES)}
        members["images/noise.bin"] = np.random.default_rng(0).bytes(40_000)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _jpeg_bytes(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 10), (40 * seed, 100, 200)).save(out, "JPEG")
    return out.getvalue()


ARCHIVE = make_archive()
ARCHIVE_MD5 = hashlib.md5(ARCHIVE).hexdigest()


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves ARCHIVE at /pets.tar.gz with HTTP Range support, and records every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.requests: list[dict] = []
        self.agents: set[str] = set()  # the User-Agent of every request
        self.ranges = True  # False: ignore Range headers, as some servers do
        self.cut_next = False  # True: the next response stops half-way through its body

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/pets.tar.gz"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self):
        self.server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        self.server.agents.add(self.headers.get("User-Agent"))
        if self.path == "/moved/pets.tar.gz":
            self.send_response(301)
            self.send_header("Location", "/pets.tar.gz")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/pets.tar.gz":
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.server.ranges:
            start = int(match.group(1))
            if start >= len(ARCHIVE):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(ARCHIVE)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(ARCHIVE) - 1}/{len(ARCHIVE)}")
        else:
            self.send_response(200)
        body = ARCHIVE[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_next:
            self.server.cut_next = False
            body = body[: len(body) // 2]  # the connection drops: less than Content-Length arrives
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    server = ArchiveServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def extracted_names(dest: Path) -> set[str]:
    return {p.name for p in (dest / "images").iterdir()}


def test_fresh_download_extracts_and_writes_the_marker(server, tmp_path):
    dest = tmp_path / "pets"
    assert download_and_extract(server.url, ARCHIVE_MD5, dest) == dest
    assert extracted_names(dest) == set(PET_NAMES) | {"noise.bin"}
    assert (dest / ".extracted").read_text() == ARCHIVE_MD5
    assert (dest / "pets.tar.gz").read_bytes() == ARCHIVE
    assert not (dest / "pets.tar.gz.part").exists()
    assert server.requests == [{"path": "/pets.tar.gz", "range": None}]


def test_a_second_call_does_not_reach_the_server(server, tmp_path):
    dest = tmp_path / "pets"
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    (dest / "images" / "pug_1.jpg").write_bytes(b"added after extraction")
    assert download_and_extract(server.url, ARCHIVE_MD5, dest) == dest
    assert len(server.requests) == 1
    assert (dest / "images" / "pug_1.jpg").read_bytes() == b"added after extraction"  # not re-extracted


def test_a_verified_archive_without_marker_is_extracted_without_downloading(server, tmp_path):
    dest = tmp_path / "pets"
    dest.mkdir()
    (dest / "pets.tar.gz").write_bytes(ARCHIVE)
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    assert not server.requests
    assert (dest / ".extracted").is_file() and extracted_names(dest) >= set(PET_NAMES)


def test_a_partial_download_is_resumed_with_a_range_request(server, tmp_path):
    dest = tmp_path / "pets"
    dest.mkdir()
    (dest / "pets.tar.gz.part").write_bytes(ARCHIVE[:1000])
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    assert server.requests == [{"path": "/pets.tar.gz", "range": "bytes=1000-"}]
    assert (dest / "pets.tar.gz").read_bytes() == ARCHIVE
    assert (dest / ".extracted").read_text() == ARCHIVE_MD5
    assert not (dest / "pets.tar.gz.part").exists()


def test_a_complete_part_file_is_accepted_when_the_server_answers_416(server, tmp_path):
    dest = tmp_path / "pets"
    dest.mkdir()
    (dest / "pets.tar.gz.part").write_bytes(ARCHIVE)
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    assert server.requests[0]["range"] == f"bytes={len(ARCHIVE)}-"
    assert (dest / ".extracted").is_file()


def test_a_server_without_range_support_restarts_the_download(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "pets"
    dest.mkdir()
    (dest / "pets.tar.gz.part").write_bytes(ARCHIVE[:1000])
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    assert (dest / "pets.tar.gz").read_bytes() == ARCHIVE  # overwritten, not appended


def test_a_dropped_connection_keeps_the_part_file_and_the_next_run_resumes(server, tmp_path):
    server.cut_next = True
    dest = tmp_path / "pets"
    with pytest.raises(ImgtuneError, match="interrupted.*resume"):
        download_and_extract(server.url, ARCHIVE_MD5, dest)
    part = dest / "pets.tar.gz.part"
    assert part.read_bytes() == ARCHIVE[: len(ARCHIVE) // 2]
    assert not (dest / ".extracted").exists()
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    assert server.requests[-1]["range"] == f"bytes={len(ARCHIVE) // 2}-"
    assert (dest / "pets.tar.gz").read_bytes() == ARCHIVE


def test_a_wrong_checksum_is_an_error_and_nothing_is_extracted(server, tmp_path):
    dest = tmp_path / "pets"
    with pytest.raises(ImgtuneError, match="checksum"):
        download_and_extract(server.url, "0" * 32, dest)
    assert not (dest / ".extracted").exists() and not (dest / "images").exists()
    assert not (dest / "pets.tar.gz").exists()  # set aside, so the next run downloads afresh
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    assert (dest / ".extracted").read_text() == ARCHIVE_MD5


def test_a_corrupt_part_file_fails_the_checksum_then_recovers(server, tmp_path):
    dest = tmp_path / "pets"
    dest.mkdir()
    (dest / "pets.tar.gz.part").write_bytes(b"\0" * 1000)
    with pytest.raises(ImgtuneError, match="checksum"):
        download_and_extract(server.url, ARCHIVE_MD5, dest)
    download_and_extract(server.url, ARCHIVE_MD5, dest)
    assert server.requests[-1]["range"] is None
    assert (dest / "pets.tar.gz").read_bytes() == ARCHIVE


def test_the_archive_comes_through_the_shared_client_and_a_redirect_keeps_the_range(server, tmp_path):
    dest = tmp_path / "pets"
    dest.mkdir()
    (dest / "pets.tar.gz.part").write_bytes(ARCHIVE[:1000])
    download_and_extract(server.url.replace("/pets.tar.gz", "/moved/pets.tar.gz"), ARCHIVE_MD5, dest)
    assert server.requests == [{"path": "/moved/pets.tar.gz", "range": "bytes=1000-"},
                               {"path": "/pets.tar.gz", "range": "bytes=1000-"}]
    assert (dest / "pets.tar.gz").read_bytes() == ARCHIVE
    assert server.agents == {user_agent()}


def test_http_error_is_an_imgtune_error(server, tmp_path):
    with pytest.raises(ImgtuneError, match="HTTP 404"):
        download(server.url.replace("pets", "missing"), tmp_path / "missing.tar.gz")


def test_an_unreachable_server_fails_quickly_and_suggests_data_dir(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ImgtuneError, match="`data_dir(=DIR)?`"):
        download_and_extract(f"http://127.0.0.1:{port}/x.tar.gz", ARCHIVE_MD5, tmp_path / "x", timeout=5)
    assert time.monotonic() - start < 3
    assert not (tmp_path / "x" / ".extracted").exists()


def test_pets_by_name_downloads_into_the_cache_once(server, monkeypatch):
    monkeypatch.setattr(datasets, "PETS_URL", server.url)
    monkeypatch.setattr(datasets, "PETS_MD5", ARCHIVE_MD5)
    data = load_data("pets", valid_pct=0.5, stratify=True)
    assert data.classes == ["Abyssinian", "great_pyrenees"]
    assert all(item.path.is_relative_to(datasets.default_cache_dir() / "pets" / "images") for item in data.train)
    assert not data.skipped  # noise.bin is not an image file name, so it is not even listed
    assert datasets.get("pets").available()
    load_data("pets", valid_pct=0.5, stratify=True)
    assert len(server.requests) == 1
