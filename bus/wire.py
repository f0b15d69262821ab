"""Two facts of the NATS wire the bus must respect: what counts against the max payload, and how to
unsubscribe without dropping what the server had already sent."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.subscription import Subscription

from sandbus.sdk.errors import PayloadTooLargeError

__all__ = ["check_fits", "drain", "drain_all", "nats_size"]

log = logging.getLogger("sandbus.bus")


def nats_size(data: bytes, headers: dict[str, str] | None) -> int:
    """What the server counts against its max payload: the body plus the encoded header block
    (nats-py checks the body alone; a larger message makes the server close the connection)."""
    if not headers:
        return len(data)
    # "NATS/1.0\r\n", then "key: value\r\n" per header, then "\r\n"
    return len(data) + 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def check_fits(data: bytes, headers: dict[str, str] | None, max_payload: int, what: str, plugin: str) -> None:
    """Refuse a message the server would refuse: above its max payload, headers included.

    The server answers a larger message by closing the connection (every call in flight loses its
    reply): so every message a plugin makes the bus send is measured here first.

    Raises:
        PayloadTooLargeError: it does not fit.
    """
    size = nats_size(data, headers)
    if size > max_payload:
        raise PayloadTooLargeError(f"{what}: {size} bytes (envelope and headers included) exceed the NATS "
                                   f"max payload of {max_payload} bytes", plugin=plugin, size=size,
                                   limit=max_payload)


async def drain(sub: Subscription) -> None:
    """Unsubscribe, and handle the messages the server had sent before it knew (nats-py's drain).

    nats-py's drain is UNSUB, one PING/PONG round trip, then it stops reading the subscription.
    But the server routes a publisher's message on the publisher's connection: one matched to us
    just before our UNSUB can be queued to us just *after* that PONG, and nats-py then drops it
    unanswered (seen about once in 40 drains under load). So the UNSUB goes first, alone, and
    the drain's round trip comes after another one: such a message is in by then.
    """
    try:
        conn = sub._conn
        await conn._send_unsubscribe(sub._id)
        await conn.flush()
        await sub.drain()  # type: ignore[no-untyped-call]
    except Exception as e:  # already closed, or the connection is gone: nothing left to handle
        log.debug("draining %s: %s", sub.subject, e)


async def drain_all(subs: list[Subscription], timeout: float) -> None:
    """:func:`drain` every one of ``subs`` at once, waiting at most ``timeout`` seconds."""
    if subs:
        await asyncio.wait([asyncio.ensure_future(drain(sub)) for sub in subs], timeout=timeout)
