"""What the web demo accepts: request bodies up to a size limit, and images it may decode.

A refused request raises :class:`RequestError` with the HTTP status and the one-line reason the
user sees; :class:`BodyLimit` refuses an oversized body before any of it is parsed.
"""

from __future__ import annotations

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

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


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
