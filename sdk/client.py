"""The Python client: call plugins, publish to topics, message plugins, list nodes.

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        reply = await client.request("text_processor", "handle_request", {"action": "get_status"})
        await client.publish("orders.created", {"id": 42})
        # a plugin whose input and output are bytes (Extism): raw bytes both ways
        out = await client.request_raw("count_vowels", "count_vowels", b"Hello")
        out.data, out.content_type   # b'{"count":2,...}', 'application/json'
        # operating: one plugin's state on every node that has it, and its log lines as they come
        states = await client.debug("text_processor")
        async with client.logs("text_processor", level="warning") as lines:
            async for line in lines:
                print(line["node"], line["level"], line["message"])

Depends only on nats-py and sdk: a client app never pulls in wasmtime (nor pydantic: start-up time).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Self

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import trace

from sandbus.sdk.envelope import (
    CONTENT_TYPE,
    ENVELOPE,
    ENVELOPE_CONTENT_TYPE,
    H_CONTENT_TYPE,
    H_FROM,
    H_MSG_ID,
    H_NODE,
    JSON,
    MAX_MESSAGE_ID,
    MAX_SENDER,
    OCTET_STREAM,
    encode_message,
    error_from_reply,
    is_envelope,
    is_json_type,
    nats_size,
    new_message_id,
    valid_media_type,
    valid_message_id,
    valid_sender,
    valid_traceparent,
)
from sandbus.sdk.errors import (
    AbiViolationError,
    BusError,
    InvalidEnvelopeError,
    PayloadTooLargeError,
    PluginNotFoundError,
    RateLimitError,
    RequestTimeoutError,
    SandbusError,
)
from sandbus.sdk.jspublish import JetStreamPublisher
from sandbus.sdk.nats_guard import GuardedNatsClient
from sandbus.sdk.subjects import (
    LOG_PREFIX,
    NODE_SERVICE,
    check_token,
    control_subject,
    log_subject,
    msg_subject,
    request_subject,
    topic_subject,
)
from sandbus.sdk.tracing import H_TRACE_DEBUG, H_TRACE_SPANS, record_error, send_span

__all__ = ["LOG_LEVELS", "Client", "DetailedReply", "LogStream", "check_log_line", "valid_log_line"]

#: A log line's levels, least severe first (``Client.logs(level=...)`` shows that level and above).
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Longest log line (bytes of JSON) a follower accepts: a node's lines are far smaller.
MAX_LOG_LINE = 64 * 1024
#: Log lines a follower buffers before the server drops what it cannot take (a slow consumer).
LOG_PENDING = 10_000
_LOG_STRINGS = ("ts", "node", "plugin", "level", "message")
_LOG_OPTIONAL = ("version", "stream", "trace_id")
_HEX = "0123456789abcdef"
#: Seconds before asking again a node that refused ``debug`` over its rate.
DEBUG_RETRY_S = 0.1


def check_log_line(data: bytes) -> dict[str, Any] | None:
    """A log line received on ``sandbus.log.>`` as a dict, or None when it is not one (anyone allowed to
    publish there may send anything): every key of the record present and of its type."""
    if len(data) > MAX_LOG_LINE:
        return None
    try:
        line = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return valid_log_line(line)


def valid_log_line(line: object) -> dict[str, Any] | None:
    """``line`` when it is a log line's record (every key present and of its type, ``stream`` one of
    the two streams, ``trace_id`` 32 hex digits), else None: what a node's ``debug`` reply holds in
    ``recent_logs`` is checked as what arrives on ``sandbus.log.>`` is."""
    if not isinstance(line, dict):
        return None
    if not all(isinstance(line.get(k), str) for k in _LOG_STRINGS) or line["level"] not in LOG_LEVELS:
        return None
    if not all(k in line and (line[k] is None or isinstance(line[k], str)) for k in _LOG_OPTIONAL):
        return None
    if not all(type(line.get(k)) is int for k in ("seq", "dropped")):
        return None
    if line["stream"] not in (None, "stdout", "stderr"):
        return None
    trace_id = line["trace_id"]
    if trace_id is not None and (len(trace_id) != 32 or trace_id.strip(_HEX)):
        return None
    return line


class LogStream:
    """Log lines as they are published: an async iterator of checked records (:func:`check_log_line`).

    ``async with`` subscribes on entry (a line published after it returns is seen) and unsubscribes on
    exit; iterating without it subscribes on the first line asked for. Lines below ``level`` and
    messages that are not log lines are skipped.
    """

    def __init__(self, nc: NatsClient, subject: str, level: str | None) -> None:
        self._nc = nc
        self.subject = subject
        self._minimum = LOG_LEVELS.index(level) if level is not None else 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe now; returns once the server has the subscription."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(self.subject, pending_msgs_limit=LOG_PENDING)
            await self._nc.flush()

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[dict[str, Any]]:
        await self.start()
        assert self._sub is not None
        try:
            async for msg in self._sub.messages:
                line = check_log_line(msg.data)
                # The line names the node and plugin of its subject (what the NATS permissions let publish).
                if (line is not None and msg.subject == f"{LOG_PREFIX}.{line['node']}.{line['plugin']}"
                        and LOG_LEVELS.index(line["level"]) >= self._minimum):
                    yield line
        finally:  # the loop ended (break, cancel): no subscription is left behind
            await self.close()


def _encode(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else orjson.dumps(payload)


def _tracing_off() -> bool:
    """Whether :func:`send_span` would do nothing (no OpenTelemetry SDK, no trace to carry on): checked
    here so that the common case does not pay for entering a context manager that does nothing."""
    return isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)) and (
        not trace.get_current_span().get_span_context().is_valid)


@functools.lru_cache(maxsize=1024)
def _topic_subject(topic: str) -> str:
    """:func:`topic_subject`, remembered: a publisher uses a few topics, each checked once (a topic
    that breaks a rule raises, and is not remembered)."""
    return topic_subject(topic)


def _media_type(content_type: str) -> str:
    """``content_type`` when it is a valid media type (it goes into a header as it is).

    Raises:
        ValueError: it is not (a CR/LF in it would forge headers).
    """
    if valid_media_type(content_type) is None:
        raise ValueError(f"content_type must be a media type (type/subtype, optional ; key=value parameters, "
                         f"printable ASCII), found {content_type[:64]!r}")
    return content_type


@dataclass(frozen=True, slots=True)
class DetailedReply:
    """A successful reply with what its headers say (see :meth:`Client.request_detailed`).

    Parameters:
        data: the reply body (the plugin's JSON, or a bytes plugin's raw output: see ``content_type``).
        headers: every header of the reply.
        node: the node that answered (``Sandbus-Node``), when it said.
        trace_id: the trace the call belongs to (from the reply's ``traceparent``): the node's span
            when it traced the call, else the caller's own trace context echoed; None without either.
    """

    data: bytes
    headers: dict[str, str]
    node: str | None
    trace_id: str | None

    @property
    def content_type(self) -> str:
        """The reply's media type: ``application/json`` for a JSON plugin (and when the reply says none),
        else what a bytes plugin (Extism) declares, by default ``application/octet-stream``."""
        return self.headers.get(H_CONTENT_TYPE) or CONTENT_TYPE

    def json(self) -> Any:
        """The body, decoded."""
        return orjson.loads(self.data)


class Client:
    """A connection to the PluginBus.

    Parameters:
        nc: a connected nats-py client (see :meth:`connect`).
        sender: the ``from`` of messages this client sends.
    """

    def __init__(self, nc: NatsClient, *, sender: str = "client") -> None:
        self.nc = nc
        self.sender = sender
        self._js_ok: bool | None = None
        #: the last ``sender`` found valid (checked again when it changes)
        self._checked_sender: str | None = None
        self._acks = JetStreamPublisher(nc)

    @classmethod
    async def connect(cls, servers: str | list[str] = "nats://127.0.0.1:4222", *, sender: str = "client",
                      **nats_options: Any) -> Client:
        """Connect; ``nats_options`` go to ``nats.connect`` (user/password, token, user_credentials, tls...)."""
        urls = servers.split(",") if isinstance(servers, str) else servers
        nats_options.setdefault("max_reconnect_attempts", 3)
        nats_options.setdefault("connect_timeout", 3)
        nc = GuardedNatsClient()  # no published message can stop it from reading
        try:
            await nc.connect(servers=urls, **nats_options)
        except Exception as e:
            # nats-py leaves the socket of a refused connection open: close it ourselves.
            with contextlib.suppress(Exception):
                await nc.close()
            raise BusError(f"cannot connect to NATS at {', '.join(urls)}: {e}") from e
        return cls(nc, sender=sender)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()
        await self._acks.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(self, subject: str, data: bytes, timeout: float, headers: dict[str, str],
                       what: str) -> bytes:
        with send_span(subject, headers, message_id=headers.get(H_MSG_ID), body_size=len(data)) as span:
            try:
                return await self._request_raw(subject, data, timeout, headers, what)
            except Exception as e:
                record_error(span, e)
                raise

    async def _request_raw(self, subject: str, data: bytes, timeout: float, headers: dict[str, str],
                           what: str) -> bytes:
        return bytes((await self._request_msg(subject, data, timeout, headers, what)).data)

    async def _request_msg(self, subject: str, data: bytes, timeout: float, headers: dict[str, str],
                           what: str) -> Msg:
        msg = await self._nats_request(subject, data, timeout, headers, what)
        err = error_from_reply(msg.data, msg.headers)
        if err is not None:
            raise err
        return msg

    async def _nats_request(self, subject: str, data: bytes, timeout: float, headers: dict[str, str],
                            what: str) -> Msg:
        """One NATS request, its transport failures as sandbus errors (the reply is not looked at)."""
        self._check_fits(nats_size(data, headers))
        try:
            return await self.nc.request(subject, data, timeout=timeout, headers=headers)
        except NoRespondersError as e:
            # "what" names a plugin ("no node serves plugin 'x'") or a node, which answers for itself.
            why = f"{what} did not answer" if what.startswith("node ") else f"no node serves {what}"
            raise PluginNotFoundError(f"{why} (nobody listens on {subject})") from e
        except NatsTimeoutError as e:
            raise RequestTimeoutError(f"no reply from {what} within {timeout:g} s") from e
        except MaxPayloadError as e:
            raise PayloadTooLargeError(
                f"request of {len(data)} bytes exceeds the server's max payload of {self.nc.max_payload} bytes",
                size=len(data), limit=self.nc.max_payload) from e

    async def request_bytes(self, plugin: str, function: str, payload: bytes, *, timeout: float = 5.0) -> bytes:
        """Call ``function`` of ``plugin`` on whichever node serves it; the raw reply bytes."""
        headers = {**JSON, H_MSG_ID: new_message_id(), H_FROM: self.sender}
        return await self._request(request_subject(plugin, function), payload, timeout, headers, f"plugin {plugin!r}")

    async def request_detailed(self, plugin: str, function: str = "handle_request", payload: Any = None, *,
                               timeout: float = 5.0, headers: dict[str, str] | None = None,
                               content_type: str = CONTENT_TYPE) -> DetailedReply:
        """:meth:`request_bytes` with the reply's headers: the answering node and the trace id.

        ``payload``: bytes as they are, anything else as JSON. ``headers``: extra request headers (e.g.
        a ``traceparent`` of the caller's own; with tracing configured, this client's ``send`` span's is
        injected). ``content_type``: the request's ``Content-Type`` (a JSON plugin takes JSON whatever
        it says; a bytes plugin takes the body as it is). Remote errors raise typed, as with :meth:`request`.

        Raises:
            ValueError: ``content_type`` is not a media type.
        """
        data = _encode(payload)
        if content_type is not CONTENT_TYPE:
            _media_type(content_type)
        request_headers = {**(headers or {}), H_CONTENT_TYPE: content_type, H_MSG_ID: new_message_id(),
                           H_FROM: self.sender}
        return await self._detailed(request_subject(plugin, function), data, timeout, request_headers, plugin)

    async def _detailed(self, subject: str, data: bytes, timeout: float, headers: dict[str, str],
                        plugin: str) -> DetailedReply:
        """One request inside its ``send`` span, and the reply with what its headers say."""
        with send_span(subject, headers, message_id=headers[H_MSG_ID], body_size=len(data)) as span:
            try:
                msg = await self._request_msg(subject, data, timeout, headers, f"plugin {plugin!r}")
            except Exception as e:
                record_error(span, e)
                raise
        reply_headers = dict(msg.headers or {})
        traceparent = valid_traceparent(reply_headers.get("traceparent"))
        return DetailedReply(bytes(msg.data), reply_headers, reply_headers.get(H_NODE),
                             traceparent[3:35] if traceparent else None)

    async def request_raw(self, plugin: str, function: str, data: bytes | bytearray | memoryview, *,
                          content_type: str = OCTET_STREAM, timeout: float = 5.0) -> DetailedReply:
        """Call a plugin whose input and output are bytes (an Extism plugin) with ``data`` as it is.

        The reply's ``data`` is the plugin's output, untouched; its ``content_type`` says what it is
        (``application/octet-stream`` unless the plugin's manifest declares another type). A failed
        call raises typed, as with :meth:`request`: an error reply is told apart by its headers, never
        by its body. (A JSON plugin answers a body that is not JSON with ``InvalidJsonError``.)

        Raises:
            ValueError: ``content_type`` is not a media type.
        """
        return await self.request_detailed(plugin, function, bytes(data), timeout=timeout, content_type=content_type)

    async def trace_request(self, plugin: str, function: str, payload: bytes, *,
                            timeout: float = 5.0) -> tuple[bytes, dict[str, str], list[dict[str, Any]]]:
        """A request the node traces whatever its sampling: (reply, reply headers, the node's spans).

        The caller should have a span current (its trace id is the one to look up later).
        """
        headers = {**JSON, H_MSG_ID: new_message_id(), H_FROM: self.sender, H_TRACE_DEBUG: "1"}
        subject = request_subject(plugin, function)
        with send_span(subject, headers, message_id=headers[H_MSG_ID], body_size=len(payload)):
            msg = await self._nats_request(subject, payload, timeout, headers, f"plugin {plugin!r}")
        reply_headers = dict(msg.headers or {})
        try:  # whatever answered wrote this header: anything but a list of span objects is no spans
            spans = orjson.loads(reply_headers.pop(H_TRACE_SPANS, "[]"))
        except orjson.JSONDecodeError:
            spans = []
        spans = [s for s in spans if isinstance(s, dict)] if isinstance(spans, list) else []
        return bytes(msg.data), reply_headers, spans

    async def request(self, plugin: str, function: str = "handle_request", payload: Any = None, *,
                      timeout: float = 5.0) -> Any:
        """Call a plugin function with a JSON-able payload; the decoded reply. Remote errors raise typed."""
        reply = await self.request_bytes(plugin, function, _encode(payload), timeout=timeout)
        try:
            return orjson.loads(reply)
        except orjson.JSONDecodeError as e:  # a bytes plugin (Extism), or not a sandbus node at all
            raise AbiViolationError(f"the reply from plugin {plugin!r} is not JSON: {e} (a plugin whose output is "
                                    f"bytes, such as an Extism plugin, is called with request_raw)",
                                    plugin=plugin) from e

    async def _jetstream(self) -> bool:
        if self._js_ok is None:
            try:
                await self.nc.jetstream().stream_info("SANDBUS_TOPICS")
                self._js_ok = True
            except Exception:
                self._js_ok = False
        return self._js_ok

    async def publish(self, topic: str, payload: Any = None, *, msg_id: str | None = None,
                      durable: bool = True) -> str:
        """Broadcast onto ``topic``; each subscribing plugin gets it once. Returns the message id.

        With ``durable`` (default) and a JetStream-enabled bus, returns once the stream has stored the
        message (at-least-once from then on); else a core NATS publish (at most once). ``msg_id``: the
        message id (default: a new random one); a publish retried with the same id within the stream's
        duplicate window (2 minutes) is stored once.

        Raises:
            ValueError: ``topic`` breaks the topic rules (``sandbus.sdk.subjects.check_topic``).
            InvalidEnvelopeError: ``msg_id`` or this client's ``sender`` is not one a node accepts.
            SandbusError: ``payload`` is not JSON-serialisable.
            PayloadTooLargeError: the message, headers included, does not fit the server's max payload.
            nats.js.errors.NoStreamResponseError: durable, and no stream stores the topic (now).
            nats.errors.TimeoutError: durable, and the stream did not acknowledge within 5 s.
        """
        subject = _topic_subject(topic) if type(topic) is str else topic_subject(topic)
        if msg_id is None:
            message_id = new_message_id()
        elif valid_message_id(msg_id) is None:
            raise InvalidEnvelopeError(f"msg_id must be 1-{MAX_MESSAGE_ID} characters from A-Z a-z 0-9 . _ : -",
                                       field="id")
        else:
            message_id = msg_id
        sender = self.sender
        if sender is not self._checked_sender:
            if valid_sender(sender) is None:
                raise InvalidEnvelopeError(f"sender must be 1-{MAX_SENDER} printable ASCII characters", field="from")
            self._checked_sender = sender
        try:
            _, data = encode_message(payload, from_=sender, topic=topic, id=message_id)
        except TypeError as e:
            raise SandbusError(f"payload is not JSON-serialisable: {e}") from e
        headers = {**ENVELOPE, H_MSG_ID: message_id, "Nats-Msg-Id": message_id, H_FROM: sender}
        if _tracing_off():  # the common case: no span to start, nothing to inject
            # Every value was checked above: the header block is encoded here, once.
            block = (f"NATS/1.0\r\n{H_CONTENT_TYPE}: {ENVELOPE_CONTENT_TYPE}\r\n{H_MSG_ID}: {message_id}\r\n"
                     f"Nats-Msg-Id: {message_id}\r\n{H_FROM}: {sender}\r\n\r\n").encode()
            self._check_fits(len(data) + len(block))
            await self._publish(subject, data, headers, block, durable)
            return message_id
        with send_span(subject, headers, message_id=message_id, body_size=len(data)):
            self._check_fits(nats_size(data, headers))
            await self._publish(subject, data, headers, None, durable)
        return message_id

    def _check_fits(self, size: int) -> None:
        """The server counts the headers against its max payload too, and closes the connection of a
        publisher that sends more (every request in flight on it would lose its reply)."""
        if size > self.nc.max_payload:
            raise PayloadTooLargeError(f"message of {size} bytes (headers included) exceeds the max payload of "
                                       f"{self.nc.max_payload} bytes", size=size, limit=self.nc.max_payload)

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str], block: bytes | None,
                       durable: bool) -> None:
        if durable and (self._js_ok or (self._js_ok is None and await self._jetstream())):
            await self._acks.publish(subject, data, headers, block=block)
        else:
            await self.nc.publish(subject, data, headers=headers)

    async def publish_raw(self, topic: str, data: bytes | bytearray | memoryview, *,
                          content_type: str = OCTET_STREAM, msg_id: str | None = None, durable: bool = True) -> str:
        """Broadcast raw bytes onto ``topic`` with their ``content_type`` (not JSON: the receiving plugin
        gets them as the base64 text of its envelope's ``payload``, the envelope's ``headers`` saying
        ``Content-Type`` and ``Content-Transfer-Encoding: base64``). Delivery as :meth:`publish`.

        Raises:
            ValueError: ``topic`` breaks the topic rules, or ``content_type`` is not a media type (or is JSON:
                use :meth:`publish`).
            InvalidEnvelopeError / PayloadTooLargeError: as :meth:`publish`.
        """
        subject = topic_subject(topic)
        _media_type(content_type)
        if is_json_type(content_type) or is_envelope({H_CONTENT_TYPE: content_type}):
            raise ValueError(f"content_type {content_type!r} is JSON: publish JSON with publish()")
        message_id = new_message_id() if msg_id is None else msg_id
        if valid_message_id(message_id) is None:
            raise InvalidEnvelopeError(f"msg_id must be 1-{MAX_MESSAGE_ID} characters from A-Z a-z 0-9 . _ : -",
                                       field="id")
        if valid_sender(self.sender) is None:
            raise InvalidEnvelopeError(f"sender must be 1-{MAX_SENDER} printable ASCII characters", field="from")
        body = bytes(data)
        headers = {H_CONTENT_TYPE: content_type, H_MSG_ID: message_id, "Nats-Msg-Id": message_id,
                   H_FROM: self.sender}
        with send_span(subject, headers, message_id=message_id, body_size=len(body)):
            self._check_fits(nats_size(body, headers))
            await self._publish(subject, body, headers, None, durable)
        return message_id

    async def send_raw(self, plugin: str, data: bytes | bytearray | memoryview, *,
                       content_type: str = OCTET_STREAM, timeout: float | None = None) -> DetailedReply | None:
        """A direct message of raw bytes to ``plugin`` (wrapped for it as :meth:`publish_raw` says); with
        ``timeout``, wait for its reply and return it (its ``content_type`` says what it is)."""
        _media_type(content_type)
        body = bytes(data)
        headers = {H_CONTENT_TYPE: content_type, H_MSG_ID: new_message_id(), H_FROM: self.sender}
        subject = msg_subject(plugin)
        if timeout is None:
            with send_span(subject, headers, message_id=headers[H_MSG_ID], body_size=len(body)):
                self._check_fits(nats_size(body, headers))
                await self.nc.publish(subject, body, headers=headers)
            return None
        return await self._detailed(subject, body, timeout, headers, plugin)

    async def send(self, plugin: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """A direct PluginMessage to ``plugin``; with ``timeout``, wait for and return its reply."""
        try:
            message_id, data = encode_message(payload, from_=self.sender, to=plugin)
        except TypeError as e:
            raise SandbusError(f"payload is not JSON-serialisable: {e}") from e
        headers = {**ENVELOPE, H_MSG_ID: message_id, H_FROM: self.sender}
        if timeout is None:
            with send_span(msg_subject(plugin), headers, message_id=message_id):
                self._check_fits(nats_size(data, headers))
                await self.nc.publish(msg_subject(plugin), data, headers=headers)
            return None
        reply = await self._request(msg_subject(plugin), data, timeout, headers, f"plugin {plugin!r}")
        return orjson.loads(reply)

    async def nodes(self, *, timeout: float = 0.5) -> list[dict[str, Any]]:
        """Every node's ``stats`` (id, plugins, their counters), by node id; ``[]`` when no node answers.

        ``$SRV`` has no queue group: answers are gathered until ``timeout``. A node that answers its
        ``stats`` with an error or with something that is not a JSON object is left out.
        """
        ids = await self.node_ids(timeout=timeout)
        views = await asyncio.gather(*(self.control(n, "stats", timeout=max(timeout, 2.0)) for n in ids),
                                     return_exceptions=True)
        return [v for v in views if isinstance(v, dict)]

    async def debug(self, plugin: str, *, node: str | None = None, timeout: float = 2.0) -> list[dict[str, Any]]:
        """``plugin``'s debug state on each node that has it (the ``debug`` control verb; bus/control.py lists
        the keys), by node id. Without ``node`` every node is asked (found as :meth:`nodes` does, within
        half a second); nodes that do not know the plugin are left out, so ``[]`` means every node that
        answered said it has none. A node refusing over its debug rate (``limit.rate``) is asked again
        until ``timeout``.

        Raises:
            PluginNotFoundError: ``node`` given, and it does not know the plugin (or no such node answers).
            SandbusError: no node had the plugin and one failed otherwise (no answer in time, refused):
                that failure, since the plugin may be on that node.
            ValueError: ``plugin`` or ``node`` is not a subject token.
        """
        check_token(plugin, "plugin")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def one(node_id: str) -> dict[str, Any]:
            while True:
                try:
                    answer = await self.control(node_id, "debug", {"plugin": plugin},
                                                timeout=max(deadline - loop.time(), 0.05))
                    break
                except RateLimitError:
                    if loop.time() + DEBUG_RETRY_S >= deadline:
                        raise
                    await asyncio.sleep(DEBUG_RETRY_S)
            if not isinstance(answer, dict):
                raise BusError(f"node {node_id!r} answered debug with a JSON {type(answer).__name__}, not an object")
            return answer

        if node is not None:
            return [await one(check_token(node, "node id"))]
        ids = await self.node_ids(timeout=min(timeout, 0.5))
        deadline = loop.time() + timeout
        answers = await asyncio.gather(*(one(n) for n in ids), return_exceptions=True)
        states = [a for a in answers if isinstance(a, dict)]
        if not states:
            for a in answers:
                if isinstance(a, SandbusError) and not isinstance(a, PluginNotFoundError):
                    raise a
        return states

    def logs(self, plugin: str | None = None, *, level: str | None = None, node: str | None = None) -> LogStream:
        """Log lines of ``plugin`` (default: every plugin) from ``node`` (default: every node) as they are
        published, at ``level`` and above (``"debug"``, ``"info"``, ``"warning"``, ``"error"``)::

            async with client.logs("echo", level="warning") as lines:
                async for line in lines: ...

        Each line is a dict with every key of the record (docs/protocol.md): ``ts``, ``node``, ``plugin``,
        ``version``, ``level``, ``stream``, ``message``, ``trace_id``, ``seq``, ``dropped``.

        Raises:
            ValueError: ``plugin`` or ``node`` is not a subject token, or ``level`` is not a level.
        """
        if level is not None and level not in LOG_LEVELS:
            raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}, found {str(level)[:32]!r}")
        return LogStream(self.nc, log_subject(node or "*", plugin or "*"), level)

    async def node_ids(self, *, timeout: float = 0.5) -> list[str]:
        """The ids of the nodes that answer discovery within ``timeout``, sorted."""
        inbox = self.nc.new_inbox()
        ids: list[str] = []
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(f"$SRV.PING.{NODE_SERVICE}", b"", reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except NatsTimeoutError:
                    break
                try:  # anyone on the account can answer a PING: a reply that is not a node's is skipped
                    node_id = (orjson.loads(msg.data).get("metadata") or {}).get("node_id")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if isinstance(node_id, str) and node_id and node_id not in ids and len(ids) < 1024:
                    ids.append(node_id)
        finally:
            await sub.unsubscribe()
        return sorted(ids)

    async def control(self, node_id: str, verb: str, body: Any = None, *, timeout: float = 5.0) -> Any:
        """Ask one node to list / load / unload / reload / stats.

        Raises:
            BusError: the answer is not JSON (whatever answered is not a sandbus node).
        """
        data = await self._request(control_subject(node_id, verb), _encode(body or {}), timeout, dict(JSON),
                                   f"node {node_id!r}")
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BusError(f"node {node_id!r} answered {verb} with {len(data)} bytes that are not JSON") from None
