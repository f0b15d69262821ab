"""The request path's first file: what the bus does with a request, a direct message or a core topic message.

    NATS message on sandbus.req.<plugin>.<function>   (queue group sandbus.<plugin>)
      -> Requests.on_request      check the function token and the body (JSON, bounded depth; any
                                  bytes for a plugin whose ``Served.body`` is "bytes"): a
                                  client's mistake is answered request.* at once, counted in the
                                  plugin's ``rejected`` and audited (handler.refused); then
                                  handler.request_now: the node runs the call inline when it may
                                  after its turn on the loop when other plugins' inline calls are
                                  waiting (bus/turns.py)
      -> the reply, published with its own headers (never Msg.respond, which echoes the request's)
      or, when request_now says "not now" (None):
      -> Requests._serve_request  a task, so this subscription keeps reading
      -> handler.serve            the node: its per-plugin gate and worker threads (host/node/node.py)
      -> the reply, or a typed error reply

Direct messages (``sandbus.msg.<plugin>``) and core topic messages (``sandbus.topic.<topic>``) are
turned into a PluginMessage envelope (sandbus.sdk.envelope.envelope_for: an explicit envelope when
the Content-Type says so, else the body wrapped) and go to ``handler.serve`` in a task, to the
plugin's message function; durable topic messages take the same envelope and handler path from
bus/delivery.py. Whatever a handler raises is answered (a typed error reply, or an internal error
for a bug), never left to time out; no exception ends a subscription callback.

Every reply carries :meth:`Requests.reply_headers`: ``Content-Type`` (a bytes plugin's successful
reply: its ``Served.content_type``), ``Sandbus-Node``, the request's
``Sandbus-Msg-Id`` when valid, and its ``traceparent``/``tracestate`` when valid -- which the handler
replaces with its own ``process`` span's when it traced the call -- plus the error headers on an
error reply. Replies are the hot path: the dict is built from a template and two regex checks.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

import orjson
from nats.aio.msg import Msg
from nats.protocol.command import hpub_cmd

from sandbus.bus.handler import DEFAULT_FUNCTION, BusHandler
from sandbus.bus.wire import header_block, publish_with_block
from sandbus.sdk.envelope import (
    CONTENT_TYPE,
    H_CONTENT_TYPE,
    H_MSG_ID,
    H_NODE,
    envelope_for,
    error_reply,
    valid_message_id,
    valid_traceparent,
)
from sandbus.sdk.errors import InvalidJsonError, RequestError, SandbusError
from sandbus.sdk.jsonbound import MAX_JSON_DEPTH, too_deep
from sandbus.sdk.natsraw import can_write_raw, write_raw_now
from sandbus.sdk.subjects import MAX_TOKEN_LENGTH
from sandbus.sdk.tracing import valid_tracestate

if TYPE_CHECKING:
    from sandbus.bus.plugin_bus import PluginBus

__all__ = ["Requests", "check_function", "check_json", "envelope_for", "internal_error", "with_error"]

#: room kept for a reply's headers below the max payload before measuring them exactly: node id,
#: message id, traceparent and tracestate are each bounded well under it
_HEADER_ROOM: Final = 2048

log = logging.getLogger("sandbus.bus")

#: :func:`sandbus.sdk.subjects.check_token`'s rule as one compiled match, for the hot path (a test checks
#: they agree).
_FUNCTION = re.compile(rf"[A-Za-z0-9_\-]{{1,{MAX_TOKEN_LENGTH}}}")


def check_json(data: bytes, plugin: str) -> None:
    """A request body is valid JSON, nested at most :data:`MAX_JSON_DEPTH` levels.

    Raises:
        InvalidJsonError: it is not.
    """
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidJsonError(f"request body is not valid JSON: {e}", plugin=plugin) from None
    if too_deep(data, decoded):
        raise InvalidJsonError(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                               plugin=plugin)


def check_function(plugin: str, function: str) -> None:
    """A request's function is one subject token.

    Raises:
        RequestError: it is not (``sandbus.req.<plugin>.a.b`` reaches the subscription with ``a.b``).
    """
    if _FUNCTION.fullmatch(function) is None:
        shown = orjson.dumps(function[:64]).decode() + ("..." if len(function) > 64 else "")
        raise RequestError(f"request to {plugin}: the function must be 1-{MAX_TOKEN_LENGTH} letters, digits, '_' or "
                           f"'-' (one subject token), found {shown}", plugin=plugin)


class Requests:
    """The subscription callbacks for requests, direct messages and core topics of one bus."""

    __slots__ = ("_base", "_base_block", "_typed_blocks", "bus", "handler")

    def __init__(self, bus: PluginBus, handler: BusHandler) -> None:
        self.bus = bus
        self.handler = handler
        self._base = {H_CONTENT_TYPE: CONTENT_TYPE, H_NODE: bus.node_id}
        #: the encoded headers of a reply to a request that sent none of its own (the common case)
        self._base_block = header_block(self._base)
        #: the same for a bytes plugin's reply, by its declared media type (a few per node)
        self._typed_blocks: dict[str, bytes] = {}

    def reply_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """The headers a reply to a message with ``headers`` carries (before the handler adds its trace)."""
        out = self._base.copy()
        if headers:
            message_id = headers.get(H_MSG_ID)
            if message_id is not None and valid_message_id(message_id) is not None:
                out[H_MSG_ID] = message_id
            parent = headers.get("traceparent")
            if parent is not None and valid_traceparent(parent) is not None:
                out["traceparent"] = parent
                state = valid_tracestate(headers.get("tracestate"))
                if state is not None:
                    out["tracestate"] = state
        return out

    def _refused(self, plugin: str, err: RequestError, subject: str) -> None:
        """A client's mistake the bus caught: the handler counts it for the plugin and audits it."""
        try:
            self.handler.refused(plugin, err, subject)
        except Exception:  # counting must not be what leaves a caller without an answer
            log.exception("could not record a refused request to %s", plugin)

    async def on_request(self, msg: Msg) -> None:
        # The bus's hottest code after request_direct (which answers most requests before they reach
        # this callback): a valid request the handler answers at once stays in this callback (no
        # task); everything else becomes a task, so the subscription keeps reading.
        _, _, plugin, function = msg.subject.split(".", 3)
        headers = self.reply_headers(msg.headers)
        served = self.bus.served(plugin)
        # A bytes plugin (Extism) takes any body: its size is the sandbox's to cap.
        raw = served is not None and served.body == "bytes"
        try:
            check_function(plugin, function)
            if not raw:
                check_json(msg.data, plugin)
        except RequestError as e:
            self._refused(plugin, e, msg.subject)
            await self.bus.reply(msg, *with_error(headers, e))
            return
        turns = self.bus.turns
        if turns.due() and self.handler.runs_inline(plugin):
            await turns.wait(plugin)
        pending = self._run(msg, plugin, function, headers, raw)
        if pending is not None:
            await pending

    def request_direct(self, msg: Msg) -> bool:
        """:meth:`on_request` run in the read loop (``GuardedNatsClient.dispatch_directly``): True when
        the request was taken (answered, or handed to a task); False, with nothing done, for one that
        :meth:`on_request` must have: a request it refuses (counted and audited there, once), one
        that must wait for its turn on the loop, or while a reply cannot be written at once.

        Why: a request answered inline then costs no queue hand-off, task wake-up or coroutine, which
        were several microseconds of a node's roughly fifty per request (bench/bench_bus.py).
        """
        subject = msg.subject
        if subject.count(".") < 3:
            return False
        _, _, plugin, function = subject.split(".", 3)
        served = self.bus.served(plugin)
        if served is None or _FUNCTION.fullmatch(function) is None:
            return False
        # Whether it may run now before the body is read: under a flood most requests wait for their
        # turn, and each declined after its JSON check was checked twice (1.8 checks a request).
        turns = self.bus.turns
        nc = self.bus.nc
        if nc is None or not can_write_raw(nc) or (turns.due() and self.handler.runs_inline(plugin)):
            return False
        raw = served.body == "bytes"
        if not raw:
            try:
                check_json(msg.data, plugin)
            except RequestError:
                return False  # on_request refuses it, counted and audited once
        pending = self._run(msg, plugin, function, self.reply_headers(msg.headers), raw)
        if pending is not None:
            self.bus.spawn(pending)
        return True

    def _run(self, msg: Msg, plugin: str, function: str, headers: dict[str, str],
             raw: bool) -> Awaitable[None] | None:
        """Run a checked request whose turn it is: inline when the handler can, with its reply written at
        once (None); else what is left to await: the reply's publish, or the call in a task."""
        self.bus.turns.begin()
        try:
            reply = self.handler.request_now(plugin, function, msg, headers)
        except SandbusError as e:
            return self.bus.reply(msg, *with_error(headers, e))
        except Exception as e:  # a bug must still answer, not leave the caller to time out
            log.exception("request %s failed", msg.subject)
            return self.bus.reply(msg, *with_error(headers, internal_error(e, plugin)))
        if reply is None:
            self.bus.spawn(self._serve_request(msg, plugin, function, time.monotonic(), headers))
            return None
        if raw:
            served = self.bus.served(plugin)
            if served is not None:
                headers[H_CONTENT_TYPE] = served.content_type
        nc = self.bus.nc
        if not msg.reply or nc is None or len(reply) > self.bus.max_payload - _HEADER_ROOM:
            return self.bus.reply(msg, reply, headers)  # measured exactly there
        # Only the base headers (two keys): their encoding is cached.
        if len(headers) != 2:
            block = header_block(headers)
        elif not raw:
            block = self._base_block
        else:
            block = self._typed_block(headers)
        try:
            if write_raw_now(nc, hpub_cmd(msg.reply, "", block, reply), 1, len(reply)):
                return None
        except Exception:  # the call ran: never let it run twice (request_direct's caller would queue it)
            log.exception("could not write the reply to %s at once", msg.subject)
        return publish_with_block(nc, msg.reply, reply, headers, block)

    async def _serve_request(self, msg: Msg, plugin: str, function: str, arrival: float,
                             headers: dict[str, str]) -> None:
        try:
            data, extra = await self.handler.serve(plugin, function, msg.data, msg, arrival=arrival,
                                                   reply_headers=headers)
            self._set_content_type(plugin, headers)
            if extra:
                headers.update(extra)
        except SandbusError as e:
            data, headers = with_error(headers, e)
        except Exception as e:  # a bug must still answer
            log.exception("request %s failed", msg.subject)
            data, headers = with_error(headers, internal_error(e, plugin))
        await self.bus.reply(msg, data, headers)

    def _typed_block(self, headers: dict[str, str]) -> bytes:
        """The encoded base headers with a bytes plugin's media type (validated when its manifest loaded)."""
        content_type = headers[H_CONTENT_TYPE]
        block = self._typed_blocks.get(content_type)
        if block is None:
            block = header_block(headers)
            if len(self._typed_blocks) < 64:  # media types come from manifests: few, but never unbounded
                self._typed_blocks[content_type] = block
        return block

    def _set_content_type(self, plugin: str, headers: dict[str, str]) -> None:
        """A successful reply of a bytes plugin says its declared media type (an error reply stays JSON:
        its error headers are what tell a client the two apart)."""
        served = self.bus.served(plugin)
        if served is not None and served.body == "bytes":
            headers[H_CONTENT_TYPE] = served.content_type

    async def on_direct(self, msg: Msg) -> None:
        self.bus.spawn(self._serve_message(msg, msg.subject.rsplit(".", 1)[1], None, time.monotonic()))

    def topic_handler(self, plugin: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_topic(msg: Msg) -> None:
            self.bus.spawn(self._serve_message(msg, plugin, msg.subject.split(".", 2)[2], time.monotonic()))

        return on_topic

    async def _serve_message(self, msg: Msg, plugin: str, topic: str | None, arrival: float) -> None:
        """A direct or core-topic message: handled, or answered with an error if it has a reply subject."""
        served = self.bus.served(plugin)
        function = served.message_function if served is not None else DEFAULT_FUNCTION
        headers = self.reply_headers(msg.headers)
        try:
            envelope = envelope_for(msg.data, msg.headers, to=None if topic else plugin, topic=topic)
        except RequestError as e:
            self._refused(plugin, e, msg.subject)
            await self.bus.reply(msg, *with_error(headers, e))
            return
        try:
            data, extra = await self.handler.serve(plugin, function, envelope, msg, arrival=arrival,
                                                   reply_headers=headers)
            self._set_content_type(plugin, headers)
            if extra:
                headers.update(extra)
        except SandbusError as e:
            log.warning("message to %s on %s failed: %s", plugin, msg.subject, e)
            data, headers = with_error(headers, e)
        except Exception as e:  # a bug must still answer
            log.exception("message %s failed", msg.subject)
            data, headers = with_error(headers, internal_error(e, plugin))
        await self.bus.reply(msg, data, headers)


def internal_error(e: Exception, plugin: str | None) -> SandbusError:
    """The error a caller gets for a bug of ours: its type only (the traceback goes to the log)."""
    return SandbusError(f"internal error ({type(e).__name__})", plugin=plugin)


def with_error(headers: dict[str, str], err: SandbusError) -> tuple[bytes, dict[str, str]]:
    """An error reply's body, and ``headers`` with the error headers added."""
    data, error_headers = error_reply(err)
    return data, {**headers, **error_headers}
