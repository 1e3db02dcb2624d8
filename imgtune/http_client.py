"""The one HTTP client of imgtune (urllib3): GET with retries, checked redirects, timeouts and a size cap.

Both downloads use it: the image URL lists of ``imgtune download`` (:mod:`imgtune.curate.download`)
and the dataset archives of the catalogue (:mod:`imgtune.data.catalogue`). urllib3's ``Retry`` retries
a timeout, a refused connection, a 429 or a 5xx answer with exponential backoff and honours
Retry-After. Redirects are followed here rather than by urllib3, so that each one is checked: at most
``max_redirects``, only to http(s) URLs, never back to a URL of the same chain (a loop).

Every failure is a :class:`FetchError` whose ``reason`` is one line for a person (a manifest, a
summary) and whose ``transient`` says whether trying again later may work.
"""

from __future__ import annotations

import contextlib
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


class _TooSlow(ReadTimeoutError):
    """A body that keeps arriving but takes longer than the client's deadline (a read error to ``Retry``)."""

    def __init__(self, reason: str):
        Exception.__init__(self, reason)
        self.reason = reason


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
        timeout: seconds to connect, and between two reads of one response; :meth:`get` allows a
            whole body at most ten times this.
        retries: further tries after a timeout, a connection error, a 429 or a 5xx answer, waiting
            ``backoff * 2**try`` seconds (or the server's Retry-After, up to 30 s) in between.
        backoff: the first wait, in seconds.
        max_redirects: redirects followed at most; a redirect back to a URL seen before is a loop.
        pool_size: connections kept open per host (one per thread that downloads at the same time).
        headers: sent with every request (the User-Agent is :func:`user_agent` unless given here).
    """

    def __init__(self, *, timeout: float = 10.0, retries: int = 2, backoff: float = 1.0, max_redirects: int = 5,
                 pool_size: int = 8, headers: dict[str, str] | None = None):
        self.timeout, self.max_redirects = timeout, max_redirects
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

        A body over ``max_bytes`` is refused (from its Content-Length, or as it streams), and so is
        one that takes over ten times ``timeout`` to arrive; a body cut off or too slow is asked for
        again (from the first URL) while retries are left.

        Raises:
            FetchError: why there is no body.
        """
        retries = self.retry
        while True:
            try:
                with self.open(url, retries=retries) as response:
                    retries = response.retries or retries
                    return self._read_capped(response, max_bytes)
            except (ReadTimeoutError, ProtocolError, SSLError) as error:
                # urllib3 retries up to the response's headers; a failure in its body is retried here.
                try:
                    retries = retries.increment("GET", url, error=error)
                except MaxRetryError:
                    raise self._broken(error) from None
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
            FetchError: an error answer (``status`` set), too many redirects, a loop, a non-http
                URL, or no connection.
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
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise FetchError(f"not an http(s) URL ({url[:80]})")
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
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise FetchError(f"redirect to a non-http URL ({url[:80]})")
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

    def _read_capped(self, response: urllib3.BaseHTTPResponse, max_bytes: int) -> bytes:
        """The whole body, raising urllib3's own errors for a broken or slow one (so that they are retried)."""
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"too large ({int(length)} bytes; the limit is {max_bytes})")
        deadline = time.monotonic() + 10 * self.timeout
        chunks, size = [], 0
        while chunk := response.read(CHUNK, decode_content=False):
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"too large (over the limit of {max_bytes} bytes)")
            if time.monotonic() > deadline:
                raise _TooSlow(f"too slow (over {10 * self.timeout:g} s)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _broken(self, error: Exception) -> FetchError:
        """The FetchError of a body that did not arrive whole."""
        if isinstance(error, _TooSlow):
            return FetchError(error.reason, True)
        if isinstance(error, ReadTimeoutError):
            return FetchError(f"timed out after {self.timeout:g} s", True, detail=_root(error))
        return FetchError(f"connection broken ({_root(error)})", True, detail=_root(error))


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
