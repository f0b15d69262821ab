"""NATS MSG/HMSG frames cut out of a read buffer (sdk/_frames.c)."""

AT_END: int
NEED_MORE: int
OTHER: int
NEED_BODY: int
MAX_LINE: int

def scan(buf: bytes | bytearray | memoryview, /) -> tuple[list[tuple[int, bytes, bytes, bytes | None, bytes]], int,
                                                         int]: ...
