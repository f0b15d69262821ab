"""Writing protocol commands that are already encoded straight into nats-py's write buffer.

Why: nats-py's ``publish`` checks and encodes every header of every message (a regex, strip, translate
and encode per header), several microseconds a message on the hot paths: replies (``bus/wire.py``),
durable acks written in batches (``bus/delivery.py``) and JetStream publishes (``sdk/jspublish.py``),
whose headers the caller checked and encoded itself. These do what ``nats.aio.client.Client.publish``
does after its checks, through nats-py internals (major pinned; tests/bus/test_durable_batching.py
checks that they exist and what arrives on the wire). Without them, or while the connection is not up
or is draining, callers take the public path (:func:`can_write_raw` says which). :func:`write_raw_now`
is the same write for a handler that cannot await (one run inside the read loop: the direct dispatch
of ``sdk/nats_guard.py``).
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

__all__ = ["RAW_WRITES", "can_write_raw", "write_raw", "write_raw_now"]

#: whether this nats-py has the internals a raw write uses (nats-py 2.x)
RAW_WRITES = all(hasattr(Client, name) for name in ("_send_command", "_flush_pending", "_flusher", "is_draining_pubs"))


def can_write_raw(nc: Client) -> bool:
    """Whether a raw write goes out now; if not, use the public ``publish`` (it raises or buffers)."""
    return RAW_WRITES and nc.is_connected and not nc.is_draining_pubs


async def write_raw(nc: Client, command: bytes, messages: int, payload_bytes: int) -> None:
    """Queue ``command`` (``messages`` whole PUB/HPUB commands carrying ``payload_bytes`` of bodies) and
    wake nats-py's flusher, as ``publish`` does. Only after :func:`can_write_raw` said yes."""
    nc.stats["out_msgs"] += messages
    nc.stats["out_bytes"] += payload_bytes
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def write_raw_now(nc: Client, command: bytes, messages: int, payload_bytes: int) -> bool:
    """:func:`write_raw` for a caller that cannot await (a handler run in the read loop): queue
    ``command`` and wake the flusher, as ``_send_command`` and ``_flush_pending`` do when neither
    has to wait. False, with nothing written, whenever one of them would wait or could not write
    now (not connected, draining, the flusher gone, the pending buffer full): the caller then
    takes an awaiting path."""
    if not (RAW_WRITES and nc.is_connected and not nc.is_draining_pubs):
        return False
    queue = nc._flush_queue
    flusher = nc._flusher_task
    if queue is None or flusher is None or flusher.done():
        return False
    limit = nc._max_pending_size
    if limit > 0 and nc._pending_data_size + len(command) > limit:
        return False  # _send_command would force a flush and wait for it
    if queue.empty():
        queue.put_nowait(asyncio.get_running_loop().create_future())
    nc._pending.append(command)
    nc._pending_data_size += len(command)
    nc.stats["out_msgs"] += messages
    nc.stats["out_bytes"] += payload_bytes
    return True
