"""The one exception type a user sees: a message that names the problem and the way out."""


class ImgtuneError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``str(error)`` on one line and exits with status 1; anything else that escapes
    is a bug in imgtune.
    """


class UnreadableImageError(ImgtuneError):
    """An image that cannot be decoded.

    ``kind`` says why, for callers that answer differently (the web demo's status codes):
    ``"missing"``, ``"empty"``, ``"format"`` (not an image, or not an allowed format),
    ``"pixels"`` (too many: a possible decompression bomb) or ``"decode"`` (truncated or corrupt).

    Args:
        message: one line naming the file and what is wrong.
        kind: one of the kinds above.
    """

    def __init__(self, message: str, kind: str = "decode"):
        super().__init__(message)
        self.kind = kind


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none): what a
    one-line error shows of an exception raised by another library."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def describe(error: BaseException, limit: int = 150) -> str:
    """``"Type: first line"`` of an exception from another library (at most ``limit`` characters of the
    line): how a one-line error names the cause it wraps."""
    text = str(error).strip()
    return f"{type(error).__name__}: {first_line(error)[:limit]}" if text else type(error).__name__
