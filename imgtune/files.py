"""Writing files so that a crash or a concurrent reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

# mkstemp creates files readable by their owner only; a file written here gets the permissions an
# ordinary open() would give it (0o666 less the umask). The umask is read once, at import, because
# reading it means setting it, which is not safe while other threads create files.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary handle to a temporary file beside ``path`` that replaces ``path`` when the block ends.

    Readers see the old file or the whole new one, never a part: the temporary file is renamed over
    ``path`` (atomic on one filesystem) and removed if the block raises. ``fsync`` also flushes the
    data to disk before the rename, so a power cut cannot leave an empty file under the new name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(handle, "wb") as out:
            yield out
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` through :func:`atomic_writer`; returns ``path``."""
    with atomic_writer(path, fsync=fsync) as out:
        out.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
