"""Writing one file of the module cache's directory (compiled code, component info, digest memo)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

__all__ = ["write_then_rename"]

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
