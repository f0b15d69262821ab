"""Reading a KV bucket's current values, and following its changes, with an end-of-values marker that holds.

nats-py's ``KeyValue.watch`` (and ``keys()``, built on it) decides "the current values are all read" from the
messages this client has processed when the consumer's info comes back. When the server has already sent
them all and the client has not handled them yet, the marker comes *first*: a listing is empty, and a
watcher's caller believes the bucket is empty for a moment. For a node following deploys that moment is
"everything was undeployed". Here the count comes from the server (messages delivered + pending when the
consumer was created), and the marker comes after exactly that many messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

__all__ = ["BucketWatch", "KvEntry", "current_values"]

#: the header nats-server 2.11+ puts on markers it writes itself (a TTL or max-age expiry)
_MARKER_REASON: Final = "Nats-Marker-Reason"
#: changes a watch holds before it stops reading (then NATS holds them, and flow control applies)
MAX_QUEUED: Final = 10_000


@dataclass(frozen=True)
class KvEntry:
    """One value (or deletion) of a key."""

    key: str
    value: bytes
    revision: int
    created: datetime | None
    operation: str | None  # None: a value was put; KV_DEL / KV_PURGE: the key was deleted


def _entry(msg: Msg, prefix: str) -> KvEntry:
    headers = msg.headers or {}
    operation = headers.get(KV_OP)
    if operation is None and _MARKER_REASON in headers:
        operation = KV_DEL if headers[_MARKER_REASON] == "Remove" else KV_PURGE
    meta = msg.metadata
    return KvEntry(msg.subject[len(prefix):], msg.data, int(meta.sequence.stream), meta.timestamp,
                   operation if operation in (KV_DEL, KV_PURGE) else None)


class BucketWatch:
    """The last value of every key of a bucket, then ``None``, then every change, as :class:`KvEntry` s.

    Use ``async with BucketWatch(js, bucket) as watch: async for entry in watch: ...``.
    """

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self._js = js
        self._bucket = bucket
        self._prefix = f"$KV.{bucket}."
        self._queue: asyncio.Queue[KvEntry | None] = asyncio.Queue(MAX_QUEUED)
        self._seen = 0
        self._initial: int | None = None
        self._marked = False
        self._sub: object | None = None

    async def start(self) -> None:
        from nats.js.api import DeliverPolicy

        sub = await self._js.subscribe(f"{self._prefix}>", stream=f"KV_{self._bucket}", cb=self._on_msg,
                                       ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
        self._sub = sub
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        self._initial = int(delivered or 0) + int(info.num_pending or 0)
        await self._mark_if_done()

    async def _on_msg(self, msg: Msg) -> None:
        entry = _entry(msg, self._prefix)
        await self._queue.put(entry)
        self._seen += 1
        await self._mark_if_done()

    async def _mark_if_done(self) -> None:
        if not self._marked and self._initial is not None and self._seen >= self._initial:
            self._marked = True
            await self._queue.put(None)

    def __aiter__(self) -> AsyncIterator[KvEntry | None]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[KvEntry | None]:
        while True:
            yield await self._queue.get()

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]

    async def __aenter__(self) -> BucketWatch:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def current_values(js: JetStreamContext, bucket: str, timeout: float = 5.0) -> list[KvEntry]:
    """The current value of every key of ``bucket`` (deleted keys left out), read within ``timeout``.

    Raises:
        TimeoutError: the values did not all arrive in time.
    """
    values: dict[str, KvEntry] = {}
    async with asyncio.timeout(timeout), BucketWatch(js, bucket) as watch:
        async for entry in watch:
            if entry is None:
                break
            if entry.operation is None:
                values[entry.key] = entry
            else:
                values.pop(entry.key, None)
    return list(values.values())
