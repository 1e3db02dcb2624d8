"""The one exception type a user sees: a message that names the problem and the way out."""


class ImgtuneError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``str(error)`` on one line and exits with status 1; anything else that escapes
    is a bug in imgtune.
    """


class UnreadableImageError(ImgtuneError):
    """An image file that cannot be decoded (empty, truncated, not an image, too many pixels)."""
