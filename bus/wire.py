"""Facts of the NATS wire the bus must respect: what counts against the max payload, how to unsubscribe
without dropping what the server had already sent, and what a reply's headers cost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.command import hpub_cmd

from sandbus.sdk.envelope import nats_size
from sandbus.sdk.errors import PayloadTooLargeError
from sandbus.sdk.natsraw import can_write_raw, write_raw

__all__ = ["check_fits", "drain", "drain_all", "header_block", "nats_size", "publish_with_block", "server_info_problem"]

log = logging.getLogger("sandbus.bus")


def server_info_problem(nc: Client) -> str | None:
    """What makes the connected server's INFO unusable, or None.

    nats-py takes the INFO's ``max_payload`` as it comes and compares every publish with it: from
    something that only pretends to be a NATS server (a squatter on the default port), a value that
    is not a positive integer makes every publish fail (TypeError, MaxPayloadError), so the first
    one would end the command as a bug of ours instead of saying what is wrong with the server.
    """
    value = nc.max_payload
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"its INFO gives max_payload {str(value)[:40]!r}, not a positive number of bytes"
    return None


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


def header_block(headers: Mapping[str, str]) -> bytes:
    """The NATS header block of ``headers``, encoded as nats-py would (``tests/bus/test_plugin_bus.py``
    checks they agree). Only for values the bus checked itself: printable ASCII, one line."""
    return ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


async def publish_with_block(nc: Client, subject: str, payload: bytes, headers: dict[str, str],
                             block: bytes) -> None:
    """``nc.publish(subject, payload, headers=headers)``, with ``block`` the headers already encoded
    (:func:`header_block`).

    Why: every reply carries headers, and nats-py checks and encodes each header of each message
    (a regex, strip, translate and encode per header: several microseconds a reply on the hot path).
    A reply's headers are mostly the same for every reply of a node, so their encoding is cached by
    the caller. This does what :meth:`nats.aio.client.Client.publish` does after its checks (the
    subject is a reply subject the server sent, the body fits: the caller measured it); while not
    connected or draining it takes the public path, which raises or buffers as nats-py decides.
    """
    if not can_write_raw(nc):
        await nc.publish(subject, payload, headers=headers)
        return
    await write_raw(nc, hpub_cmd(subject, "", block, payload), 1, len(payload))


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
