"""Reading and writing one file of the module cache's directory (compiled code, component info, digest
memo): only private files of this user are read, and files are replaced whole."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["UNSAFE_BITS", "open_private", "read_private", "write_then_rename"]

#: Mode bits that let someone other than the owner change a file.
UNSAFE_BITS = stat.S_IWGRP | stat.S_IWOTH

log = logging.getLogger("sandbus.cache")


def write_then_rename(directory: Path, target: Path, data: bytes | bytearray, what: str) -> bool:
    """Write ``data`` to a new private file in ``directory`` (mkstemp: mode 0600), then rename it to
    ``target``, so that a concurrent reader sees the old file or the new one, never half of one.

    A failure (read-only, full) is logged and returns False, never raises: a cache file that cannot be
    written costs work the next time, never the load that wanted to write it. ``what`` names the
    writer in the log line ("the module cache /path").
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    except OSError as e:
        log.warning("%s cannot be written: %s", what, e.strerror)
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as e:
        log.warning("%s cannot be written: %s", what, e.strerror)
        Path(tmp).unlink(missing_ok=True)
        return False
    return True


def open_private(path: Path) -> tuple[int | None, str | None]:
    """Open ``path`` for reading if it is a regular file of this user that nobody else may write.

    Checked on the open descriptor, with no symlink followed, so what the caller reads is what was
    checked. Returns ``(fd, None)`` (the caller closes it); ``(None, None)`` when there is no such file;
    ``(None, why)`` when there is one that must not be trusted ("is owned by uid 1001, not by this user").
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as e:  # ELOOP: a symlink planted as an entry
        return None, f"cannot be opened safely ({e.strerror})"
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid != os.geteuid():
        why = f"is owned by uid {st.st_uid}, not by this user"
    elif st.st_mode & UNSAFE_BITS:
        why = f"is writable by group or other users (mode {st.st_mode & 0o7777:04o})"
    if why is not None:
        os.close(fd)
        return None, why
    return fd, None


def read_private(path: Path, cap: int) -> tuple[bytes | None, str | None]:
    """:func:`open_private`, then at most ``cap + 1`` bytes read (more than ``cap`` means too large)."""
    fd, why = open_private(path)
    if fd is None:
        return None, why
    try:
        return os.read(fd, cap + 1), None
    finally:
        os.close(fd)
