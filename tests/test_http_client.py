"""The one HTTP client, against a loopback server: retries and Retry-After, checked redirects, size cap, proxies."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import http_reply, http_trickle
from imgtune import http_client
from imgtune.http_client import (
    FetchError,
    HttpClient,
    private_address,
    redirect_refusal,
    to_uri,
    user_agent,
)

BODY = bytes(range(256)) * 40  # 10 kB


class Server:
    """One path per behaviour; counts the requests per path and keeps the headers of the last one."""

    def __init__(self):
        self.requests: Counter = Counter()
        self.headers: dict[str, dict[str, str]] = {}
        self.times: dict[str, list[float]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body=b"", headers=(), length=True):
                http_reply(self, status, body, headers, length=length)

            def do_GET(self):
                path = self.path
                outer.requests[path] += 1
                outer.headers[path] = dict(self.headers.items())
                outer.times.setdefault(path, []).append(time.monotonic())
                seen = outer.requests[path]
                if path in ("/body", "http://example.invalid/through-a-proxy"):
                    self.answer(200, BODY)
                elif path == "/busy":  # asks to wait a second, then answers
                    self.answer(200, BODY) if seen > 1 else self.answer(503, headers=[("Retry-After", "1")])
                elif path == "/busy-for-long":
                    self.answer(200, BODY) if seen > 1 else self.answer(429, headers=[("Retry-After", "3600")])
                elif path == "/busy-garbled":
                    self.answer(200, BODY) if seen > 1 else self.answer(503, headers=[("Retry-After", "soon")])
                elif path == "/down":
                    self.answer(503, b"down")
                elif path == "/cut":  # the first answer stops half-way through its body
                    if seen == 1:
                        self.close_connection = True
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(BODY)))
                        self.end_headers()
                        self.wfile.write(BODY[: len(BODY) // 2])
                    else:
                        self.answer(200, BODY)
                elif match := re.fullmatch(r"/hop/(\d+)/(\d+)", path):  # hop n of at most m, then the body
                    n, last = map(int, match.groups())
                    if n < last:
                        self.answer(302, headers=[("Location", f"/hop/{n + 1}/{last}")])
                    else:
                        self.answer(200, BODY)
                elif path in ("/loop-a", "/loop-b"):
                    self.answer(301, headers=[("Location", "/loop-b" if path == "/loop-a" else "/loop-a")])
                elif path == "/to-ftp":
                    self.answer(302, headers=[("Location", "ftp://127.0.0.1/file")])
                elif path == "/to-file":
                    self.answer(307, headers=[("Location", "file:///etc/passwd")])
                elif path == "/nowhere":
                    self.answer(302)
                elif path == "/streamed":  # no Content-Length: the size is known only as it arrives
                    self.close_connection = True
                    self.answer(200, BODY, length=False)
                elif path == "/trickle":  # 1 byte every 0.1 s: never quiet for a whole timeout
                    http_trickle(self, 200)
                elif path == "/caf%C3%A9":  # what a client sends for /café
                    self.answer(200, BODY)
                elif path == "/to-utf8":  # a Location in raw UTF-8, which http.client reads as Latin-1
                    self.answer(302, headers=[("Location", "/café".encode().decode("latin-1"))])
                elif path in ("/to-loopback", "/to-http"):
                    self.answer(302, headers=[("Location", f"{outer.url}/body")])
                else:
                    self.answer(404, b"not here")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    server = Server()
    yield server
    server.close()


def client(**options) -> HttpClient:
    return HttpClient(**{"timeout": 2.0, "retries": 1, "backoff": 0.01, **options})


def failure(url: str, **options) -> FetchError:
    with client(**options) as http, pytest.raises(FetchError) as error:
        http.get(url, max_bytes=1_000_000)
    return error.value


def test_a_body_arrives_whole_with_imgtunes_user_agent(server):
    with client(headers={"Accept": "image/*"}) as http:
        assert http.get(server.url + "/body", max_bytes=len(BODY)) == BODY
    sent = server.headers["/body"]
    assert sent["User-Agent"] == user_agent() and user_agent().startswith("imgtune/")
    assert sent["Accept"] == "image/*"


def test_retry_after_is_honoured(server):
    with client() as http:
        assert http.get(server.url + "/busy", max_bytes=len(BODY)) == BODY
    first, second = server.times["/busy"]
    assert server.requests["/busy"] == 2 and second - first >= 0.9  # the server's second, not the 0.01 s backoff


def test_a_long_retry_after_is_capped(server, monkeypatch):
    monkeypatch.setattr(http_client, "MAX_RETRY_AFTER", 0.2)
    start = time.monotonic()
    with client() as http:
        assert http.get(server.url + "/busy-for-long", max_bytes=len(BODY)) == BODY
    assert time.monotonic() - start < 5 and server.requests["/busy-for-long"] == 2


def test_a_garbled_retry_after_falls_back_to_the_backoff(server):
    with client() as http:
        assert http.get(server.url + "/busy-garbled", max_bytes=len(BODY)) == BODY
    assert server.requests["/busy-garbled"] == 2


def test_retries_back_off_exponentially_then_give_up(server):
    start = time.monotonic()
    error = failure(server.url + "/down", retries=2, backoff=0.2)
    assert time.monotonic() - start >= 0.2 + 0.4  # backoff * 2**try before each retry
    assert server.requests["/down"] == 3
    assert error.reason == "HTTP 503 Service Unavailable" and error.transient and error.status == 503


def test_an_error_answer_is_not_retried_unless_it_may_pass(server):
    error = failure(server.url + "/missing")
    assert error.reason == "HTTP 404 Not Found" and not error.transient and error.status == 404
    assert server.requests["/missing"] == 1


def test_a_body_cut_off_is_asked_for_again(server):
    with client() as http:
        assert http.get(server.url + "/cut", max_bytes=len(BODY)) == BODY
    assert server.requests["/cut"] == 2
    server.requests.clear()  # the next answer is cut again
    error = failure(server.url + "/cut", retries=0)
    assert error.reason.startswith("connection broken") and error.transient


def test_redirects_are_followed_up_to_the_cap(server):
    with client(max_redirects=3) as http:
        assert http.get(server.url + "/hop/0/3", max_bytes=len(BODY)) == BODY
    error = failure(server.url + "/hop/0/9", max_redirects=3)
    assert error.reason == "more than 3 redirects" and not error.transient
    assert sum(n for path, n in server.requests.items() if path.endswith("/9")) == 4  # the first URL and 3 hops


def test_a_redirect_loop_is_named(server):
    error = failure(server.url + "/loop-a")
    assert error.reason.startswith("redirect loop (") and error.reason.endswith("/loop-a)") and not error.transient
    assert server.requests["/loop-a"] == 1 and server.requests["/loop-b"] == 1


@pytest.mark.parametrize("path", ["/to-ftp", "/to-file"])
def test_only_http_and_https_are_followed(server, path):
    error = failure(server.url + path)
    assert error.reason.startswith("redirect to a non-http URL") and not error.transient


def test_a_non_http_url_and_a_redirect_without_location_are_refused(server):
    assert failure("file:///etc/passwd").reason.startswith("not an http(s) URL")
    assert failure(server.url + "/nowhere").reason == "HTTP 302 redirect without a Location"


@pytest.mark.parametrize("path, reason", [("/body", "too large (10240 bytes; the limit is 1000)"),
                                          ("/streamed", "too large (over the limit of 1000 bytes)")])
def test_the_size_cap_holds_with_and_without_content_length(server, path, reason):
    with client() as http, pytest.raises(FetchError, match=re.escape(reason)):
        http.get(server.url + path, max_bytes=1000)


def test_a_refused_connection_is_transient_and_quick():
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    error = failure(f"http://127.0.0.1:{port}/x", retries=0)
    assert error.reason.startswith("connection failed (") and error.transient
    assert "refused" in error.detail.lower() and time.monotonic() - start < 2


def test_headers_are_kept_across_redirects_and_the_body_streams(server):
    with client() as http, http.open(server.url + "/hop/0/1", headers={"Range": "bytes=10-"}) as response:
        assert response.status == 200 and b"".join(http.chunks(response, 1000)) == BODY
    assert server.headers["/hop/1/1"]["Range"] == "bytes=10-"


def test_the_proxy_of_the_environment_is_used(server, monkeypatch):
    monkeypatch.setenv("http_proxy", server.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with client() as http:
        assert http.get("http://example.invalid/through-a-proxy", max_bytes=len(BODY)) == BODY
    assert server.requests["http://example.invalid/through-a-proxy"] == 1


def test_a_trickle_ends_at_the_deadline(server):
    # 200 bytes at 10 a second: each read comes well within the timeout, the whole would take 20 s.
    # The URL must end by deadline + timeout (1.5 s); 3 s is the generous bound of this test.
    start = time.monotonic()
    error = failure(server.url + "/trickle", timeout=0.5, deadline=1.0, retries=1)
    assert time.monotonic() - start < 3
    assert error.reason == "too slow (not done after 1 s)" and error.transient
    assert server.requests["/trickle"] == 1  # the deadline is for the URL: no time left for a retry
    assert HttpClient(timeout=0.5).deadline == 5.0  # the default: ten times the timeout


def test_an_iri_is_sent_encoded(server):
    with client() as http:
        assert http.get(server.url + "/café", max_bytes=len(BODY)) == BODY
        assert http.get(server.url + "/to-utf8", max_bytes=len(BODY)) == BODY
    assert server.requests["/caf%C3%A9"] == 2 and not [p for p in server.requests if "%C3%83" in p]
    assert to_uri("http://bücher.example/a b/café?q=é") == "http://xn--bcher-kva.example/a%20b/caf%C3%A9?q=%C3%A9"
    assert to_uri("http://example.com/caf%C3%A9") == "http://example.com/caf%C3%A9"  # escapes kept as they are
    assert failure("http://[::1/x").reason == "not a valid URL (http://[::1/x)"


def test_a_redirect_from_https_to_http_is_refused(server, monkeypatch):
    refused = "redirect to http refused (http://b.example/y)"
    assert redirect_refusal("https://a.example/x", "http://b.example/y") == refused
    assert redirect_refusal("https://a.example/x", "https://b.example/y") is None
    assert redirect_refusal("http://a.example/x", "https://b.example/y") is None
    assert redirect_refusal("http://a.example/x", "http://b.example/y") is None
    # The loopback server speaks plain http: the client is made to believe its first URL is https.
    send = HttpClient._request
    monkeypatch.setattr(HttpClient, "_request", lambda self, url, *rest: send(self, url.replace("https:", "http:"),
                                                                              *rest))
    error = failure(server.url.replace("http:", "https:") + "/to-http")
    assert error.reason == f"redirect to http refused ({server.url}/body)" and not error.transient
    assert server.requests["/to-http"] == 1 and server.requests["/body"] == 0


def public_localhost(monkeypatch):
    """Make the address check believe that ``localhost`` is a public host (the connection still goes to 127.0.0.1)."""
    resolve = http_client._addresses
    monkeypatch.setattr(http_client, "_addresses", lambda host: ["93.184.216.34"] if host == "localhost"
                        else resolve(host))


def test_refuse_private_refuses_a_redirect_to_loopback(server, monkeypatch):
    public_localhost(monkeypatch)
    start = server.url.replace("127.0.0.1", "localhost") + "/to-loopback"
    with client() as http:
        assert http.get(start, max_bytes=len(BODY)) == BODY  # off by default: local servers work
    error = failure(start, refuse_private=True)
    assert error.reason == "private address refused (127.0.0.1 is 127.0.0.1)" and not error.transient
    assert server.requests["/to-loopback"] == 2 and server.requests["/body"] == 1
    # The first URL is checked too, before anything is sent.
    assert failure(server.url + "/body", refuse_private=True).reason.startswith("private address refused")
    assert server.requests["/body"] == 1


@pytest.mark.parametrize("addresses, refused", [
    (["93.184.216.34"], None), (["93.184.216.34", "2606:2800:220:1::"], None),
    (["93.184.216.34", "10.1.2.3"], "10.1.2.3"),  # every address counts, not only the first
    (["::ffff:127.0.0.1"], "127.0.0.1"), (["fe80::1%eth0"], "fe80::1"), (["169.254.169.254"], "169.254.169.254"),
    (["192.168.0.1"], "192.168.0.1"), (["0.0.0.0"], "0.0.0.0"), (["::1"], "::1"),
])
def test_private_addresses_are_recognised(monkeypatch, addresses, refused):
    monkeypatch.setattr(http_client, "_addresses", lambda host: addresses)
    assert private_address("http://photos.example/a.jpg") == (refused and f"photos.example is {refused}")
