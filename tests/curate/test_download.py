"""Downloads from a local server: only good, unique images land; every failure is named; a rerun fetches nothing."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from conftest import http_reply, http_trickle, noisy_image
from imgtune.cli import cli
from imgtune.curate import download
from imgtune.curate.download import MANIFEST, download_images, read_sources, safe_name
from imgtune.errors import ImgtuneError
from imgtune.http_client import user_agent

MAX_BYTES = 60_000
TIMEOUT = 0.5


def encoded(colour, seed, fmt="JPEG", size=48) -> bytes:
    buffer = io.BytesIO()
    noisy_image(colour, size, seed).save(buffer, format=fmt)
    return buffer.getvalue()


GOOD = {"/a/good1.jpg": encoded((200, 40, 40), 1), "/b/good2": encoded((40, 200, 40), 2, "PNG"),
        "/c/good3.png": encoded((40, 40, 200), 3, "PNG")}
SAME = GOOD["/a/good1.jpg"]
LONG = "熊" * 100  # 300 bytes of UTF-8: more than a file name may have
OTHER = {"/x/good1.jpg": encoded((5, 5, 5), 7)}  # another image with the same file name


class Server:
    """A loopback HTTP server with one path per kind of answer; counts the requests per path."""

    def __init__(self):
        self.requests = Counter()
        self.agents = set()  # the User-Agent of every request
        self.times = {}  # path -> when each request came
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body=b"", content_type="image/jpeg", headers=(), length=True):
                http_reply(self, status, body, [("Content-Type", content_type), *headers], length=length)

            def do_GET(self):
                with lock:
                    outer.requests[self.path] += 1
                    outer.agents.add(self.headers.get("User-Agent"))
                    outer.times.setdefault(self.path, []).append(time.monotonic())
                path = self.path
                if path in GOOD or path in OTHER:
                    self.send(200, GOOD.get(path) or OTHER[path])
                elif path == "/copy/same.jpg":
                    self.send(200, SAME)
                elif path == "/moved":
                    self.send(302, headers=[("Location", "/c/good3.png")])
                elif path == "/missing.jpg":
                    self.send(404, b"not here", "text/html")
                elif path == "/slow.jpg":
                    time.sleep(4 * TIMEOUT)
                    self.send(200, encoded((1, 2, 3), 9))
                elif path in ("/loop1", "/loop2"):
                    self.send(302, headers=[("Location", "/loop2" if path == "/loop1" else "/loop1")])
                elif path == "/big.jpg":  # says its size up front
                    self.send(200, b"\xff" * (2 * MAX_BYTES))
                elif path == "/big-stream.jpg":  # does not: stopped while streaming
                    self.close_connection = True
                    self.send(200, encoded((9, 9, 9), 5, "BMP", size=200), length=False)
                elif path == "/busy.jpg":  # asks to come back in a second, then answers
                    if outer.requests[path] == 1:
                        self.send(503, b"busy", "text/plain", headers=[("Retry-After", "1")])
                    else:
                        self.send(200, encoded((90, 30, 160), 11))
                elif path == "/fake.jpg":
                    self.send(200, b"<html><body>a login page</body></html>", "image/jpeg")
                elif path == "/trickle.jpg":  # 1 byte every 0.1 s: never quiet for a whole timeout
                    http_trickle(self, 300)
                elif path == "/caf%C3%A9.jpg":  # what a client sends for /café.jpg
                    self.send(200, encoded((120, 60, 30), 12))
                elif path == urllib.parse.quote(f"/{LONG}.jpg"):
                    self.send(200, encoded((30, 60, 120), 13))
                else:
                    self.send(500, b"unexpected", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    server = Server()
    yield server
    server.close()


PATHS = ["/a/good1.jpg", "/b/good2", "/moved", "/copy/same.jpg", "/missing.jpg", "/slow.jpg", "/loop1",
         "/big.jpg", "/big-stream.jpg", "/fake.jpg"]
OPTIONS = dict(timeout=TIMEOUT, retries=1, backoff=0.05, max_bytes=MAX_BYTES, workers=4)


def test_only_good_unique_images_land_and_failures_are_named(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("# bears\n" + "\n".join(server.url + p for p in PATHS) + "\n\n")
    dest = tmp_path / "grizzly"
    report = download_images(urls, dest, **OPTIONS)

    files = sorted(p for p in dest.iterdir() if not p.name.startswith("."))
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert len(files) == 3 and hashes == {hashlib.sha256(b).hexdigest() for b in GOOD.values()}
    # The extension comes from the decoded format, not from the URL.
    assert {p.suffix for p in files} == {".jpg", ".png"} and (dest / "good2.png").is_file()
    assert len(report.downloaded) == 3 and len(report.duplicates) == 1
    assert set(report.downloaded) | set(report.duplicates) == {server.url + p for p in PATHS[:4]}

    failed = {url.removeprefix(server.url): reason for url, reason in report.failed.items()}
    assert failed.keys() == {"/missing.jpg", "/slow.jpg", "/loop1", "/big.jpg", "/big-stream.jpg", "/fake.jpg"}
    assert failed["/missing.jpg"].startswith("HTTP 404")
    assert failed["/slow.jpg"].startswith("timed out")
    assert failed["/loop1"].startswith("redirect loop")
    assert failed["/big.jpg"].startswith("too large") and failed["/big-stream.jpg"].startswith("too large")
    assert failed["/fake.jpg"].startswith("not an image")
    assert server.requests["/slow.jpg"] == 2  # retried once; a 404 is not retried
    assert server.requests["/missing.jpg"] == 1
    summary = report.summary()
    assert "3 downloaded, 1 duplicates skipped, 6 failed" in summary and "HTTP 404 Not Found" in summary

    manifest = json.loads((dest / MANIFEST).read_text())
    assert len(manifest) == len(PATHS)

    # A second run asks the server only for what may work now (the timeout), and saves nothing new.
    server.requests.clear()
    again = download_images(urls, dest, **OPTIONS)
    assert set(server.requests) == {"/slow.jpg"}
    assert again.downloaded == {} and again.already == len(PATHS) - 1
    assert sorted(p for p in dest.iterdir() if not p.name.startswith(".")) == files

    # Failures for good are tried again only when asked.
    server.requests.clear()
    download_images(urls, dest, retry_failed=True, **OPTIONS)
    assert server.requests["/missing.jpg"] == 1 and server.requests["/a/good1.jpg"] == 0


def test_downloads_go_through_the_shared_client_which_honours_retry_after(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/busy.jpg\n{server.url}/moved\n")
    report = download_images(urls, tmp_path / "out", **{**OPTIONS, "retries": 1, "backoff": 0.01})
    assert sorted(p.name for p in report.downloaded.values()) == ["busy.jpg", "moved.png"]
    first, second = server.times["/busy.jpg"]
    assert second - first >= 0.9  # the server's Retry-After, not the 0.01 s backoff
    assert server.agents == {user_agent()} and user_agent().startswith("imgtune/")


def test_a_csv_fills_one_folder_per_label(server, tmp_path):
    table = tmp_path / "bears.csv"
    table.write_text(f"url,label\n{server.url}/a/good1.jpg,grizzly\n{server.url}/b/good2,black bear\n"
                     f"{server.url}/missing.jpg,teddy\n")
    report = download_images(table, tmp_path / "bears", **OPTIONS)
    assert (tmp_path / "bears" / "grizzly" / "good1.jpg").is_file()
    assert (tmp_path / "bears" / "black_bear" / "good2.png").is_file()
    assert not (tmp_path / "bears" / "teddy").exists() and len(report.failed) == 1


def test_an_image_already_in_the_folder_is_not_saved_again(server, tmp_path):
    dest = tmp_path / "grizzly"
    dest.mkdir()
    (dest / "mine.jpg").write_bytes(SAME)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/a/good1.jpg\n")
    report = download_images(urls, dest, **OPTIONS)
    assert report.duplicates == {f"{server.url}/a/good1.jpg": "mine.jpg"}
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST, "mine.jpg"]


def test_same_name_from_two_urls_gets_two_files(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/a/good1.jpg\n{server.url}/x/good1.jpg\n")
    download_images(urls, tmp_path / "out", **OPTIONS)
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert files == ["good1-1.jpg", "good1.jpg"]
    saved = {(tmp_path / "out" / name).read_bytes() for name in files}
    assert saved == {SAME, OTHER["/x/good1.jpg"]}


@pytest.mark.parametrize("text, expected", [
    ("../../etc/passwd", "etc_passwd"), ("CON", "_CON"), ("nul.txt", "_nul.txt"), ("a b:c*?", "a_b_c"),
    ("photo%20one", "photo_one"), ("", "image"), ("...", "image"), ("ours/é", "ours_é"), ("熊", "熊"),
])
def test_file_names_are_safe_everywhere(text, expected):
    assert safe_name(text) == expected


def test_bad_sources_give_one_line_errors(tmp_path):
    with pytest.raises(ImgtuneError, match="no such file"):
        read_sources(tmp_path / "none.txt")
    (tmp_path / "f.txt").write_text("file:///etc/passwd\n")
    with pytest.raises(ImgtuneError, match="not an http"):
        read_sources(tmp_path / "f.txt")
    (tmp_path / "n.csv").write_text("url,name\nhttp://x/a.jpg,a\n")
    with pytest.raises(ImgtuneError, match="url,label"):
        read_sources(tmp_path / "n.csv")


def test_the_cli_downloads_and_prints_the_summary(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/a/good1.jpg\n{server.url}/missing.jpg\n")
    result = CliRunner().invoke(cli, ["download", str(urls), "--dest", str(tmp_path / "d"), "--timeout", "1",
                                      "--retries", "0"])
    assert result.exit_code == 0, result.output
    assert "1 downloaded" in result.output and "HTTP 404" in result.output


def test_a_trickle_fails_at_the_deadline_while_the_others_download(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/trickle.jpg\n{server.url}/a/good1.jpg\n{server.url}/b/good2\n")
    start = time.monotonic()
    # 300 bytes at 10 a second would take 30 s; the URL must end by deadline + timeout (1.5 s): 3 s is generous.
    report = download_images(urls, tmp_path / "out", **{**OPTIONS, "deadline": 1.0})
    assert time.monotonic() - start < 3
    assert report.failed == {f"{server.url}/trickle.jpg": "too slow (not done after 1 s)"}
    assert len(report.downloaded) == 2 and "1 too slow:" in report.summary()
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest[f"{server.url}/trickle.jpg"]["transient"]  # tried again by the next run


def test_non_ascii_urls_are_fetched_and_long_names_cut_by_bytes(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/café.jpg\n{server.url}/{LONG}.jpg\n", encoding="utf-8")
    report = download_images(urls, tmp_path / "out", **OPTIONS)
    assert report.failed == {} and server.requests["/caf%C3%A9.jpg"] == 1
    names = sorted(path.name for path in report.downloaded.values())
    assert names[0] == "café.jpg"
    assert names[1].startswith("熊熊") and names[1].endswith(".jpg") and len(names[1].encode()) <= 200


def test_long_names_are_cut_at_a_character_keeping_the_extension():
    for text in [LONG, "é" * 150 + ".jpeg", "x" * 100 + ".png", "𠀀" * 90]:
        name = safe_name(text)
        assert len(name.encode()) <= 200 and len(name) <= 80 and name[:1] == text[:1]
        assert name.endswith(text[-5:] if "." in text else text[-1])
    assert safe_name(LONG, max_bytes=10) == "熊熊熊"


def test_an_error_while_saving_one_url_is_recorded_and_the_others_download(server, tmp_path, monkeypatch):
    write = download.atomic_write

    def failing_write(path, data, *args, **kwargs):
        if path.name.startswith("good2"):
            raise RuntimeError("injected")
        if path.name.startswith("good3"):
            raise OSError(28, "No space left on device")
        return write(path, data, *args, **kwargs)

    monkeypatch.setattr(download, "atomic_write", failing_write)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/a/good1.jpg\n{server.url}/b/good2\n{server.url}/c/good3.png\n")
    report = download_images(urls, tmp_path / "out", **OPTIONS)
    assert [path.name for path in report.downloaded.values()] == ["good1.jpg"]
    full = "could not save (OSError: [Errno 28] No space left on device)"
    assert report.failed == {f"{server.url}/b/good2": "unexpected error (RuntimeError: injected)",
                             f"{server.url}/c/good3.png": full}
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert not manifest[f"{server.url}/b/good2"]["transient"] and manifest[f"{server.url}/c/good3.png"]["transient"]


def test_refuse_private_records_a_refusal(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{server.url}/a/good1.jpg\n")
    result = CliRunner().invoke(cli, ["download", str(urls), "--dest", str(tmp_path / "d"), "--refuse-private",
                                      "--deadline", "5"])
    assert result.exit_code == 0, result.output
    assert "0 downloaded" in result.output and "1 private address refused" in result.output
    assert server.requests["/a/good1.jpg"] == 0
