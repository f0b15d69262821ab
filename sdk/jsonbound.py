"""How deep JSON from the bus or a guest may nest: what the host can write back.

orjson reads up to 1024 levels of nesting but writes only 254. A body accepted at 300 levels would
then fail wherever the host re-encodes it (an envelope around a message, a plugin's publish), far
from where it came in. So every JSON that enters is held to what can leave.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["MAX_JSON_DEPTH", "too_deep"]

#: Deepest nesting accepted: orjson's write limit.
MAX_JSON_DEPTH = 254


def too_deep(data: bytes, decoded: Any) -> bool:
    """Whether ``decoded`` (what ``data`` decoded to) nests deeper than :data:`MAX_JSON_DEPTH`.

    Each level needs a bracket, so only a body with more brackets than that (counted in C) can be too
    deep, and only such a body pays for the re-encoding that tells.
    """
    if len(data) <= MAX_JSON_DEPTH or data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return False
    try:
        orjson.dumps(decoded)
    except TypeError:
        return True
    return False
