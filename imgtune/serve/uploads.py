"""What the web demo accepts: requests for its own address, bodies up to a size limit, images it may decode.

A refused request raises :class:`RequestError` with the HTTP status and the one-line reason the
user sees; :class:`BodyLimit` refuses an oversized body before any of it is parsed, and
:class:`LoopbackHostOnly` a request naming another host when the server listens on loopback.
"""

from __future__ import annotations

import ipaddress

from PIL import Image

from imgtune.errors import UnreadableImageError

#: The image formats the demo decodes; PIL's other decoders never see an upload.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_BYTES = 10_000_000
MAX_PIXELS = 40_000_000

#: The HTTP status for each kind of unreadable upload (see :class:`imgtune.errors.UnreadableImageError`).
UPLOAD_STATUS = {"empty": 400, "format": 415, "pixels": 413, "decode": 400}


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and the one-line reason shown to the user."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def decode_upload(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode uploaded bytes into an upright RGB picture, as :func:`imgtune.data.images.decode_image` does.

    Args:
        data: the uploaded file's bytes.
        max_pixels: the most pixels the image may have, read from its header before decoding.

    Returns:
        The RGB picture.

    Raises:
        RequestError: 400 empty or undecodable, 415 not an allowed format, 413 too many pixels.
    """
    from imgtune.data.images import decode_image

    try:
        return decode_image(bytes(data), max_pixels=max_pixels, formats=ALLOWED_FORMATS)
    except UnreadableImageError as error:
        raise RequestError(UPLOAD_STATUS.get(error.kind, 400), str(error)) from None


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, by its Content-Length or as it streams."""

    def __init__(self, app, max_bytes: int):
        """Wrap the ASGI ``app``; ``max_bytes`` is the largest body it lets through."""
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        too_large = f"the request body is larger than the limit of {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, detail = (413, too_large) if length.isdigit() else (400, "invalid Content-Length header")
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body on to its handler.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackHostOnly:
    """ASGI middleware against DNS rebinding: a request whose ``Host`` header is not a loopback address
    (127.0.0.0/8, ``[::1]``) or ``localhost`` with the server's own port gets 421.

    A page on another site whose name the attacker re-points at 127.0.0.1 reaches a server on loopback
    with its own name in ``Host``: refusing that name keeps it from reading or using the model. Add it
    only when the server listens on loopback (see :func:`is_loopback`); on 0.0.0.0 or a real address
    every name the machine is reached by is legitimate.
    """

    def __init__(self, app):
        """Wrap the ASGI ``app``."""
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        port = (scope.get("server") or (None, None))[1]
        if not _names_this_server(host, port):
            detail = (f"this demo answers only requests for a loopback address with its port ({port}), "
                      f"not for {host[:80]!r}; open http://127.0.0.1:{port}/")
            return await JSONResponse({"detail": detail}, status_code=421)(scope, receive, send)
        await self.app(scope, receive, send)


def _names_this_server(host: str, port: int | None) -> bool:
    """Whether a ``Host`` header value names a loopback address or localhost with ``port`` (80 when omitted)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        given = rest[1:] if rest.startswith(":") else None if not rest else "-"
    else:
        name, _, given = host.rpartition(":") if ":" in host else (host, "", None)
    if given is not None and not given.isdigit():
        return False
    return bool(name) and is_loopback(name) and int(given or 80) == port
