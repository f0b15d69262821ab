"""Publishing to a JetStream stream and waiting for its acknowledgement, at the cost of a plain publish.

nats-py's ``JetStreamContext.publish`` is a ``request``: per message a NUID and a random token, an
``asyncio.wait_for`` (a second future and its callbacks) and the acknowledgement decoded by the
standard library's ``json`` into a dataclass; and nats-py checks and encodes every header of every
message (a regex, strip, translate and encode each). Together that cost about as much as the rest of a
64-in-flight publisher's work. Here one wildcard subscription on a private inbox takes every
acknowledgement (a publish costs one future, one timer and an orjson decode), and a caller that has
its header block encoded already (values it checked itself) hands it over as it is.

That last part is a raw write (sdk/natsraw.py, as the node's replies and acks); without nats-py's
internals for it, or while the connection is not up, the public ``publish`` is used.

The errors are those of ``JetStreamContext.publish``: no stream listens on the subject
(``NoStreamResponseError``), no acknowledgement in time (nats' ``TimeoutError``, an
``asyncio.TimeoutError``), the stream refused (``APIError`` and its subclasses), the connection
closed while waiting (``ConnectionClosedError``). An acknowledgement that is not one (whoever can
publish on the inbox is not the stream) is a :class:`~sandbus.sdk.errors.BusError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError
from nats.protocol.command import hpub_cmd

from sandbus.sdk.errors import BusError
from sandbus.sdk.natsraw import can_write_raw, write_raw

__all__ = ["DEFAULT_TIMEOUT_S", "JetStreamPublisher"]

#: how long a publish waits for the stream's acknowledgement (nats-py's JetStream default)
DEFAULT_TIMEOUT_S = 5.0
#: the status a server answers with when nobody listens on the subject (no stream stores it)
_NO_RESPONDERS = "503"
#: characters of a bad acknowledgement quoted in the error
_QUOTE = 128


class JetStreamPublisher:
    """Publishes with a reply inbox of its own and matches each acknowledgement to its publish.

    Parameters:
        nc: a connected nats-py client.
        timeout: default seconds to wait for an acknowledgement.
    """

    def __init__(self, nc: NatsClient, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._sub: Subscription | None = None
        self._starting: asyncio.Future[None] | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._next = 0

    @property
    def pending(self) -> int:
        """Publishes waiting for their acknowledgement."""
        return len(self._waiting)

    async def _start(self) -> None:
        """Subscribe the inbox once, however many publishes ask for it at once."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            prefix = self.nc.new_inbox() + "."
            try:
                self._sub = await self.nc.subscribe(prefix + "*", cb=self._on_ack)
            except BaseException as e:
                starting, self._starting = self._starting, None
                starting.set_exception(e)
                starting.exception()  # retrieved: the caller raises it itself
                raise
            self._prefix = prefix
            self._starting.set_result(None)
        await self._starting

    async def _on_ack(self, msg: Msg) -> None:
        # Anything the inbox receives that no publish waits for (a late ack, a stray message) is dropped.
        waiter = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    def _expire(self, token: str) -> None:
        waiter = self._waiting.pop(token, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(NatsTimeoutError())

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None, *,
                      block: bytes | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Publish ``data`` and wait until the stream has stored it; returns the acknowledgement
        (``stream``, ``seq``, and ``duplicate`` when the stream had the message id already).

        ``block``: ``headers`` encoded as a NATS header block, by a caller that checked every value
        (printable ASCII, one line) and the subject, and that the whole fits the server's max payload.
        """
        if self._sub is None:
            await self._start()
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = waiter
        timer = loop.call_later(self.timeout if timeout is None else timeout, self._expire, token)
        try:
            nc = self.nc
            if block is not None and can_write_raw(nc):
                await write_raw(nc, hpub_cmd(subject, self._prefix + token, block, data), 1, len(data))
            else:
                await nc.publish(subject, data, reply=self._prefix + token, headers=headers)
            msg = await waiter
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
        return _acknowledgement(msg)

    async def close(self) -> None:
        """Stop listening; publishes still waiting fail with ``ConnectionClosedError``."""
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(ConnectionClosedError())
        sub, self._sub, self._starting = self._sub, None, None
        if sub is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):  # closing anyway: nothing left to unsubscribe from
                await sub.unsubscribe()


def _acknowledgement(msg: Msg) -> dict[str, Any]:
    """The stream's answer, checked: an acknowledgement, or the error it reports raised."""
    if not msg.data and msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
        raise NoStreamResponseError
    try:
        ack = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        ack = None
    if isinstance(ack, dict):
        err = ack.get("error")
        if isinstance(err, dict):
            code, err_code, description = err.get("code"), err.get("err_code"), err.get("description")
            APIError.from_error({"code": code if isinstance(code, int) else None,
                                 "err_code": err_code if isinstance(err_code, int) else None,
                                 "description": str(description)[:1024] if description is not None else None})
        if isinstance(ack.get("stream"), str) and isinstance(ack.get("seq"), int):
            return ack
    raise BusError(f"JetStream's acknowledgement is not one: {bytes(msg.data[:_QUOTE])!r}")
