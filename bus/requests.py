"""The request path's first file: what the bus does with a request, a direct message or a core topic message.

    NATS message on sandbus.req.<plugin>.<function>   (queue group sandbus.<plugin>)
      -> Requests.on_request      check the function token and the body (JSON, bounded depth), then
                                  handler.request_now: the node runs the call inline when it may
      -> the reply, published with its own headers (never Msg.respond, which echoes the request's)
      or, when request_now says "not now" (None):
      -> Requests._serve_request  a task, so this subscription keeps reading
      -> handler.serve            the node: its per-plugin gate and worker threads (host/node/node.py)
      -> the reply, or a typed error reply

Direct messages (``sandbus.msg.<plugin>``) and core topic messages (``sandbus.topic.<topic>``) are
turned into a PluginMessage envelope (:func:`envelope_for`) and go to ``handler.serve`` in a task,
to the plugin's message function; durable topic messages take the same envelope and handler path
from bus/delivery.py. Whatever a handler raises is answered (a typed error reply, or an internal
error for a bug), never left to time out; no exception ends a subscription callback.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import orjson
from nats.aio.msg import Msg

from sandbus.bus.handler import DEFAULT_FUNCTION, BusHandler
from sandbus.sdk.envelope import H_FROM, H_MSG_ID, PluginMessage, error_reply, new_message_id
from sandbus.sdk.errors import AbiViolationError, SandbusError
from sandbus.sdk.jsonbound import MAX_JSON_DEPTH, too_deep
from sandbus.sdk.subjects import MAX_TOKEN_LENGTH, check_token

if TYPE_CHECKING:
    from sandbus.bus.plugin_bus import PluginBus

__all__ = ["Requests", "check_json", "envelope_for"]

log = logging.getLogger("sandbus.bus")

#: :func:`check_token`'s rule as one compiled match, for the hot path (a test checks they agree); a
#: function it refuses goes through :func:`check_token` for the message.
_FUNCTION = re.compile(rf"[A-Za-z0-9_\-]{{1,{MAX_TOKEN_LENGTH}}}")


def check_json(data: bytes, plugin: str) -> None:
    """A request body is valid JSON, nested at most :data:`MAX_JSON_DEPTH` levels.

    Raises:
        AbiViolationError: it is not.
    """
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise AbiViolationError(f"request body is not valid JSON: {e}", plugin=plugin) from e
    if too_deep(data, decoded):
        raise AbiViolationError(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                                plugin=plugin)


def envelope_for(data: bytes, headers: Mapping[str, str] | None, *, topic: str | None, to: str | None) -> bytes:
    """The PluginMessage JSON a plugin receives: the sender's envelope, or one built around a raw payload.

    Raises:
        AbiViolationError: the body is not JSON, is a malformed envelope, or cannot be re-encoded
            (orjson reads 1024 levels of nesting but writes only 254).
    """
    try:
        decoded = orjson.loads(data) if data else None
    except orjson.JSONDecodeError as e:
        raise AbiViolationError(f"message body is not valid JSON: {e}") from e

    def encoded(message: PluginMessage) -> bytes:
        try:
            return message.to_json()
        except TypeError as e:
            raise AbiViolationError(f"message body cannot be re-encoded: {e} (nested too deeply)") from e

    if isinstance(decoded, dict) and "payload" in decoded and "id" in decoded:
        try:
            message = PluginMessage.model_validate(decoded)
        except ValueError as e:
            raise AbiViolationError(f"malformed PluginMessage envelope: {e}") from e
        if topic is not None and message.topic is None:
            return encoded(message.model_copy(update={"topic": topic}))
        return data  # valid, and complete: as the sender wrote it
    headers = headers or {}
    message = PluginMessage(id=headers.get(H_MSG_ID) or new_message_id(), from_=headers.get(H_FROM, "client"),
                            to=to, topic=topic, payload=decoded)
    return encoded(message)


class Requests:
    """The subscription callbacks for requests, direct messages and core topics of one bus."""

    __slots__ = ("bus", "handler")

    def __init__(self, bus: PluginBus, handler: BusHandler) -> None:
        self.bus = bus
        self.handler = handler

    async def on_request(self, msg: Msg) -> None:
        # The bus's hottest code: a valid request the handler answers at once stays in this callback
        # (no task); everything else becomes a task, so the subscription keeps reading.
        _, _, plugin, function = msg.subject.split(".", 3)
        try:
            if _FUNCTION.fullmatch(function) is None:
                try:
                    check_token(function, "function")
                except ValueError as e:
                    raise AbiViolationError(f"request to {plugin}: {e}", plugin=plugin) from None
            check_json(msg.data, plugin)
            reply = self.handler.request_now(plugin, function, msg)
        except SandbusError as e:
            await self.bus.reply(msg, *error_reply(e))
            return
        except Exception as e:  # a bug must still answer, not leave the caller to time out
            log.exception("request %s failed", msg.subject)
            await self.bus.reply(msg, *error_reply(SandbusError(f"internal error: {e}", plugin=plugin)))
            return
        if reply is None:
            self.bus.spawn(self._serve_request(msg, plugin, function, time.monotonic()))
            return
        nc = self.bus.nc
        if msg.reply and nc is not None and len(reply) <= self.bus.max_payload:
            await nc.publish(msg.reply, reply)  # a successful reply has no headers: its size is its length
        else:
            await self.bus.reply(msg, reply, None)

    async def _serve_request(self, msg: Msg, plugin: str, function: str, arrival: float) -> None:
        try:
            data, headers = await self.handler.serve(plugin, function, msg.data, msg, arrival=arrival)
        except SandbusError as e:
            data, headers = error_reply(e)
        except Exception as e:  # a bug must still answer
            log.exception("request %s failed", msg.subject)
            data, headers = error_reply(SandbusError(f"internal error: {e}", plugin=plugin))
        await self.bus.reply(msg, data, headers)

    async def on_direct(self, msg: Msg) -> None:
        self.bus.spawn(self._serve_message(msg, msg.subject.rsplit(".", 1)[1], None, time.monotonic()))

    def topic_handler(self, plugin: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_topic(msg: Msg) -> None:
            self.bus.spawn(self._serve_message(msg, plugin, msg.subject.split(".", 2)[2], time.monotonic()))

        return on_topic

    async def _serve_message(self, msg: Msg, plugin: str, topic: str | None, arrival: float) -> None:
        """A direct or core-topic PluginMessage: handled, or answered with an error if it has a reply."""
        served = self.bus.served(plugin)
        function = served.message_function if served is not None else DEFAULT_FUNCTION
        try:
            envelope = envelope_for(msg.data, msg.headers, topic=topic, to=None if topic else plugin)
            data, headers = await self.handler.serve(plugin, function, envelope, msg, arrival=arrival)
        except SandbusError as e:
            log.warning("message to %s on %s failed: %s", plugin, msg.subject, e)
            data, headers = error_reply(e)
        except Exception as e:  # a bug must still answer
            log.exception("message %s failed", msg.subject)
            data, headers = error_reply(SandbusError(f"internal error: {e}", plugin=plugin))
        await self.bus.reply(msg, data, headers)
