"""The one HTTP client of imgtune (urllib3): GET with retries, checked redirects, timeouts and a size cap.

Both downloads use it: the image URL lists of ``imgtune download`` (:mod:`imgtune.curate.download`)
and the dataset archives of the catalogue (:mod:`imgtune.data.catalogue`). urllib3's ``Retry`` retries
a timeout, a refused connection, a 429 or a 5xx answer with exponential backoff and honours
Retry-After. Redirects are followed here rather than by urllib3, so that each one is checked: at most
``max_redirects``, only to http(s) URLs, never from https to plain http, never back to a URL of the
same chain (a loop), and with ``refuse_private`` never to a host that resolves to a loopback, private
or link-local address. A URL with non-ASCII characters (an IRI: ``café`` in its path, an IDN host) is
encoded before it is sent (:func:`to_uri`). :meth:`HttpClient.get` gives up on a body still
arriving ``deadline`` seconds after the first request, however slowly its bytes trickle in.

Every failure is a :class:`FetchError` whose ``reason`` is one line for a person (a manifest, a
summary) and whose ``transient`` says whether trying again later may work.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import urllib.parse
import urllib.request
from itertools import takewhile
from typing import Iterator

import urllib3
from urllib3 import exceptions
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError, SSLError
from urllib3.util.retry import Retry
from urllib3.util.url import parse_url

REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Answers worth asking again for: too many requests, and the server's own errors.
RETRY_STATUSES = frozenset({429, *range(500, 600)})
#: The longest Retry-After honoured, in seconds; a server asking for more gets this.
MAX_RETRY_AFTER = 30.0
CHUNK = 64 * 1024


class FetchError(Exception):
    """Why a URL gave no body.

    Attributes:
        reason: one line for a person: ``HTTP 404 Not Found``, ``timed out after 10 s``, ...
        transient: whether the same request may work later (a timeout, a connection error, a 429, a 5xx).
        status: the HTTP status of an error answer, else ``None``.
        detail: the underlying error's own text (``[Errno 111] Connection refused``), or ``reason``.
    """

    def __init__(self, reason: str, transient: bool = False, *, status: int | None = None,
                 detail: str | None = None):
        super().__init__(reason)
        self.reason, self.transient, self.status = reason, transient, status
        self.detail = detail or reason


class _Retry(Retry):
    """urllib3's Retry with imgtune's schedule: ``backoff * 2**n`` seconds before the retry after
    ``n`` earlier ones (urllib3 would not wait before the first), and a Retry-After of at most
    :data:`MAX_RETRY_AFTER` seconds (one that cannot be parsed is ignored)."""

    # urllib3 would also retry a 413 that carries a Retry-After; a body too large stays too large.
    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def get_backoff_time(self) -> float:
        errors = len(list(takewhile(lambda h: h.redirect_location is None, reversed(self.history))))
        return 0.0 if errors == 0 else min(self.backoff_max, self.backoff_factor * 2 ** (errors - 1))

    def get_retry_after(self, response) -> float | None:
        try:
            seconds = super().get_retry_after(response)
        except exceptions.InvalidHeader:
            return None
        return None if seconds is None else min(seconds, MAX_RETRY_AFTER)


def user_agent() -> str:
    """The User-Agent of every request: ``imgtune/<version> (+image dataset download)``."""
    from imgtune import __version__

    return f"imgtune/{__version__} (+image dataset download)"


class HttpClient:
    """GET over urllib3 connection pools; safe to share between threads. Use it as a context manager
    (or call :meth:`close`) to close its connections. The proxies of the environment (``https_proxy``,
    ``no_proxy``, ...) are used as ``urllib.request`` would.

    Args:
        timeout: seconds to connect, and between two reads of one response.
        deadline: seconds :meth:`get` may spend on one URL, tries and waits between them included
            (default: ten times ``timeout``). It is checked after every read of the body, and a read
            waits at most ``timeout``, so a body ends by ``deadline + timeout``. Before the body, each
            read of the headers is bounded by ``timeout`` and a Retry-After wait by 30 s, not by the
            deadline (a body that follows a wait past the deadline is refused).
        retries: further tries after a timeout, a connection error, a 429 or a 5xx answer, waiting
            ``backoff * 2**try`` seconds (or the server's Retry-After, up to 30 s) in between.
        backoff: the first wait, in seconds.
        max_redirects: redirects followed at most; a redirect back to a URL seen before is a loop.
        refuse_private: refuse a URL, or a redirect, whose host resolves to an address that is not
            public (loopback, private, link-local, ...; see :func:`private_address`). Off by default:
            downloading from a server on your own machine or network is a normal use.
        pool_size: connections kept open per host (one per thread that downloads at the same time).
        headers: sent with every request (the User-Agent is :func:`user_agent` unless given here).
    """

    def __init__(self, *, timeout: float = 10.0, deadline: float | None = None, retries: int = 2,
                 backoff: float = 1.0, max_redirects: int = 5, refuse_private: bool = False, pool_size: int = 8,
                 headers: dict[str, str] | None = None):
        self.timeout, self.max_redirects, self.refuse_private = timeout, max_redirects, refuse_private
        self.deadline = 10 * timeout if deadline is None else deadline
        self.retry = _Retry(total=retries, backoff_factor=backoff, status_forcelist=RETRY_STATUSES,
                            raise_on_status=False, respect_retry_after_header=True)
        self.headers = {"User-Agent": user_agent(), **(headers or {})}
        self._options = dict(maxsize=max(1, pool_size), timeout=urllib3.Timeout(connect=timeout, read=timeout),
                             retries=self.retry)
        self.pool = urllib3.PoolManager(**self._options)
        self._proxies: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for manager in [self.pool, *self._proxies.values()]:
            manager.clear()

    def get(self, url: str, *, max_bytes: int) -> bytes:
        """The body of ``url``, whole.

        A body over ``max_bytes`` is refused (from its Content-Length, or as it streams); a body cut
        off is asked for again (from the first URL) while retries and time are left. The body is read
        a piece at a time (whatever has arrived, up to 64 KiB), and once ``deadline`` seconds have
        passed since the first request the URL fails as ``too slow``, a transient failure.

        Raises:
            FetchError: why there is no body.
        """
        deadline = time.monotonic() + self.deadline
        retries = self.retry
        while True:
            try:
                with self.open(url, retries=retries) as response:
                    retries = response.retries or retries
                    return self._read_capped(response, max_bytes, deadline)
            except (ReadTimeoutError, ProtocolError, SSLError) as error:
                # urllib3 retries up to the response's headers; a failure in its body is retried here.
                try:
                    retries = retries.increment("GET", url, error=error)
                except MaxRetryError:
                    raise self._broken(error) from None
                if time.monotonic() + retries.get_backoff_time() >= deadline:
                    raise self._broken(error) from None  # no time left for another try
                retries.sleep()

    @contextlib.contextmanager
    def open(self, url: str, *, headers: dict[str, str] | None = None,
             retries: Retry | None = None) -> Iterator[urllib3.BaseHTTPResponse]:
        """The response of ``url`` after its redirects, its body not read yet (see :meth:`chunks`).

        Args:
            url: an http(s) URL.
            headers: extra request headers (kept across redirects), e.g. a Range.
            retries: the retry budget left (default: the client's own).

        Raises:
            FetchError: an error answer (``status`` set), too many redirects, a loop, a refused
                redirect (non-http, https -> http), a private address (with ``refuse_private``), an
                invalid URL, or no connection.
        """
        response = self._follow(url, headers or {}, retries or self.retry)
        try:
            yield response
        finally:
            _release(response)

    def chunks(self, response: urllib3.BaseHTTPResponse, size: int = CHUNK) -> Iterator[bytes]:
        """The raw bytes of ``response``'s body (never decompressed), ``size`` at a time.

        Raises:
            FetchError: the connection broke or went quiet for longer than the timeout (transient).
        """
        try:
            while chunk := response.read(size, decode_content=False):
                yield chunk
        except (ReadTimeoutError, ProtocolError, SSLError) as error:
            raise self._broken(error) from None

    def _follow(self, url: str, headers: dict[str, str], retries: Retry) -> urllib3.BaseHTTPResponse:
        url = to_uri(url)
        if _scheme(url) not in ("http", "https"):
            raise FetchError(f"not an http(s) URL ({url[:80]})")
        url = self._checked(url)
        seen = [url]
        while True:
            response = self._request(url, headers, retries)
            retries = response.retries or retries
            if response.status not in REDIRECTS:
                break
            location = response.headers.get("Location")
            _release(response)
            if not location:
                raise FetchError(f"HTTP {response.status} redirect without a Location")
            try:
                target = urllib.parse.urljoin(url, _as_sent(location))
            except ValueError:
                raise FetchError(f"redirect to an invalid URL ({location[:80]})") from None
            refusal = redirect_refusal(url, target)
            if refusal:
                raise FetchError(refusal)
            url = self._checked(to_uri(target))
            if url in seen:
                raise FetchError(f"redirect loop ({' -> '.join(seen[-3:] + [url])})")
            seen.append(url)
            if len(seen) > self.max_redirects + 1:
                raise FetchError(f"more than {self.max_redirects} redirects")
        if response.status >= 400:
            _release(response)
            raise FetchError(f"HTTP {response.status} {response.reason or ''}".rstrip(),
                             response.status in RETRY_STATUSES, status=response.status)
        return response

    def _checked(self, url: str) -> str:
        """``url``, unless ``refuse_private`` is on and its host resolves to an address that is not public."""
        if self.refuse_private:
            where = private_address(url)
            if where:
                raise FetchError(f"private address refused ({where})")
        return url

    def _request(self, url: str, headers: dict[str, str], retries: Retry) -> urllib3.BaseHTTPResponse:
        try:
            return self._manager(url).request("GET", url, headers={**self.headers, **headers}, retries=retries,
                                              redirect=False, preload_content=False, decode_content=False)
        except MaxRetryError as error:
            cause = error.reason or error
            # A refused connection or an unknown name is a NewConnectionError, which urllib3 makes a timeout too.
            if isinstance(cause, exceptions.TimeoutError) and not isinstance(cause, exceptions.NewConnectionError):
                raise FetchError(f"timed out after {self.timeout:g} s", True, detail=_root(cause)) from None
            raise FetchError(f"connection failed ({_root(cause)})", True, detail=_root(cause)) from None
        except (exceptions.HTTPError, OSError) as error:  # e.g. a URL urllib3 cannot parse
            raise FetchError(f"connection failed ({_root(error)})", True, detail=_root(error)) from None

    def _manager(self, url: str) -> urllib3.PoolManager:
        """The direct pool, or the pool of the proxy the environment names for ``url``."""
        parts = urllib.parse.urlsplit(url)
        proxy = urllib.request.getproxies().get(parts.scheme)
        if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
            return self.pool
        proxy = proxy if "://" in proxy else f"http://{proxy}"
        with self._lock:
            if proxy not in self._proxies:
                self._proxies[proxy] = urllib3.ProxyManager(proxy, **self._options)
            return self._proxies[proxy]

    def _read_capped(self, response: urllib3.BaseHTTPResponse, max_bytes: int, deadline: float) -> bytes:
        """The whole body, raising urllib3's own errors for a broken one (so that it is retried).

        ``read1`` returns what one read of the socket gives (``read(n)`` would wait for all ``n``
        bytes, however slowly they come), so the deadline is checked at least every ``timeout`` seconds.
        """
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"too large ({int(length)} bytes; the limit is {max_bytes})")
        chunks, size = [], 0
        while chunk := response.read1(CHUNK, decode_content=False):
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"too large (over the limit of {max_bytes} bytes)")
            if time.monotonic() > deadline:
                raise FetchError(f"too slow (not done after {self.deadline:g} s)", True)
            chunks.append(chunk)
        return b"".join(chunks)

    def _broken(self, error: Exception) -> FetchError:
        """The FetchError of a body that did not arrive whole."""
        if isinstance(error, ReadTimeoutError):
            return FetchError(f"timed out after {self.timeout:g} s", True, detail=_root(error))
        return FetchError(f"connection broken ({_root(error)})", True, detail=_root(error))


def to_uri(url: str) -> str:
    """``url`` as it can go in a request line: a non-ASCII host IDNA-encoded (``bücher.de`` ->
    ``xn--bcher-kva.de``), other characters a URL may not hold (non-ASCII, spaces) percent-encoded as
    UTF-8 (``café`` -> ``caf%C3%A9``); escapes already there are kept.

    Raises:
        FetchError: a URL that cannot be parsed (``http://[::1/x``, a host with a space).
    """
    try:
        return parse_url(url).url
    except (exceptions.LocationParseError, ValueError, UnicodeError):
        raise FetchError(f"not a valid URL ({url[:80]})") from None


def redirect_refusal(origin: str, target: str) -> str | None:
    """Why a redirect from ``origin`` to ``target`` is not followed, or ``None`` when it may be: only
    http(s) targets, and never from https to plain http (the rest of the way would be readable and
    changeable by anyone on the network)."""
    scheme = _scheme(target)
    if scheme not in ("http", "https"):
        return f"redirect to a non-http URL ({target[:80]})"
    if scheme == "http" and _scheme(origin) == "https":
        return f"redirect to http refused ({target[:80]})"
    return None


def private_address(url: str) -> str | None:
    """``"<host> is <address>"`` when the host of ``url`` resolves to any address that is not public
    (loopback, private, link-local, shared, reserved, unspecified or multicast), else ``None``.

    Every address the name resolves to is checked. The connection resolves the name again, so a DNS
    server that answers differently the second time (DNS rebinding) is not stopped by this; nor is a
    proxy's own network.

    Raises:
        FetchError: the name does not resolve (transient, as the connection would fail the same way).
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = _addresses(host)
    except (OSError, UnicodeError) as error:
        raise FetchError(f"connection failed (cannot resolve {host}: {error})", True) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 scope (fe80::1%eth0) is not an address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
        if not ip.is_global or ip.is_multicast:
            return f"{host} is {ip}"
    return None


def _addresses(host: str) -> list[str]:
    """Every address ``host`` resolves to (an IP literal: itself)."""
    return [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]


def _scheme(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def _as_sent(location: str) -> str:
    """A Location header as the server wrote it: http.client decodes header bytes as Latin-1, so
    an IRI sent as UTF-8 arrives garbled (``cafÃ©``) unless its bytes are decoded again."""
    try:
        return location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return location


def _release(response: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back to its pool, closed first unless its body was read to the end (a
    connection with unread bytes would garble the next response on it)."""
    if not response.closed:
        response.close()
    response.release_conn()


def _root(error: BaseException) -> str:
    """The text of the error at the bottom of urllib3's wrapping (``[Errno 111] Connection refused``)."""
    while error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, ProtocolError) and len(error.args) > 1 and isinstance(error.args[1], BaseException):
        return _root(error.args[1])
    return str(error) or type(error).__name__
